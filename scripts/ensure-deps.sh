#!/usr/bin/env bash
# Install the system packages the tests, the demo and the benchmarks need, when they are
# missing: PostgreSQL's server and client (initdb, pg_ctl, psql, pgbench), and the client
# drivers of the prepared-statement tests (ensure-driver-deps.sh); with the argument
# `compiler` instead, a C compiler and Python's headers for the mypyc build. Installs only
# as root on Debian/Ubuntu; otherwise says what to install and fails.
set -euo pipefail

have_server() {
  command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}

missing=()
if [ "${1:-}" = compiler ]; then
  # The mypyc build (make compiled): the C compiler Python builds extensions with, and
  # the headers of the Python in $PYTHON.
  python="${PYTHON:-python3}"
  cc=$("$python" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')
  command -v "$cc" >/dev/null 2>&1 || missing+=(gcc libc6-dev)
  "$python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || missing+=(python3-dev)
else
  have_server || missing+=(postgresql)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
  command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-client)
  for extra in "$@"; do
    case "$extra" in
      pgbouncer) command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer) ;;
      *) dpkg -s "$extra" >/dev/null 2>&1 || missing+=("$extra") ;;
    esac
  done
  bash "$(dirname "$0")/ensure-driver-deps.sh"
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian package starts a cluster of its own; the tests start their own servers.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
      pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
  fi
else
  echo "missing: ${missing[*]}; install them (Debian: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
