#!/usr/bin/env bash
# Install the client drivers the driver tests run (tests/pooler/test_prepared_drivers.py,
# tests/pooler/test_driver_conformance.py)
# when their runtime is there: node-postgres (npm `pg`, into tests/pooler/node) when
# Node.js is installed, pgjdbc (Debian libpostgresql-jdbc-java) when Java is. A missing
# runtime is not an error: those tests skip and say why.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if command -v npm >/dev/null 2>&1 && [ ! -d "$root/tests/pooler/node/node_modules/pg" ]; then
  echo "installing node-postgres for the driver tests"
  (cd "$root/tests/pooler/node" && npm install --no-audit --no-fund --silent)
fi

if command -v java >/dev/null 2>&1 && [ ! -e /usr/share/java/postgresql.jar ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing pgjdbc (libpostgresql-jdbc-java) for the driver tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libpostgresql-jdbc-java >/dev/null
  else
    echo "missing: pgjdbc; install it (Debian: sudo apt-get install libpostgresql-jdbc-java)" >&2
    exit 1
  fi
fi
