"""Instructions per login and per transaction, counted by callgrind: pgfleet, PgBouncer, the floor.

    make compiled && .venv/bin/python -P benchmarks/instructions.py \\
        [--variant compiled=build/compiled --variant pgbouncer --variant floor] \\
        [--cases login-trust,login-scram,simple,extended] [--counts 200,1200]

Each variant (as in login.py: a pgfleet build, `pgbouncer`, or `floor`: for a login the
canned uvloop server of loginfloor.py, for a transaction the uvloop forwarder of floor.py)
runs under `valgrind --tool=callgrind` in front of one throwaway PostgreSQL, twice per
case: once for the first of --counts' pgbench transactions, once for the second. The
difference of the two runs' instruction totals divided by the difference of their
transactions is what one more costs in that process's user space: its own code, the
libraries it runs (CPython, uvloop, libevent, OpenSSL) and libc, but not the kernel.

The cases: `login-trust` and `login-scram` are `pgbench -S -C` (each transaction one
login: startup, auth, the welcome, one SELECT, Terminate); `simple` and `extended` are
`pgbench -S -M <mode>` on one connection. Unlike CPU time, the count does not depend on
what else the machine is doing, so the targets compare on a shared machine without
rounds; what moves it a little from run to run is how the events of a transaction happen
to fall into the event loop's turns.

pgbench runs one client (`-c 1`): an event-loop turn handles one event, where 50 clients
would batch several per turn, so every target pays its per-turn overhead once per event.
The counts compare the targets under that same condition; a busy pooler pays less.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pgfleet.devtools.pgbench import PgbenchArgs, pgbench_init, run_pgbench
from pgfleet.devtools.procs import PoolerProcess, pgbouncer_path
from pgfleet.devtools.tempdb import TempPostgres

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import start_floor  # the transaction floor, as floor.py runs it
from login import DB, PASSWORD, ROOT, USER, Combo, scram_secret, start_combo  # the storm's set-up, as login.py's

CASES = ("login-trust", "login-scram", "simple", "extended")


@dataclass
class Count:
    variant: str
    case: str
    totals: dict[int, int]  # transactions -> instructions of the whole run

    def per_transaction(self) -> float:
        (few, few_ir), (many, many_ir) = sorted(self.totals.items())
        return (many_ir - few_ir) / (many - few)


def callgrind_total(out_dir: Path) -> int:
    """The instructions of every process callgrind wrote a file for in `out_dir`."""
    total = 0
    for path in out_dir.glob("callgrind.out.*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total += int(line.split()[1])
                break
    return total


def start(
    label: str, build: str, case: str, pg: TempPostgres, workroot: Path, secret: str, wrapper: list[str]
) -> PoolerProcess:
    auth = "scram" if case == "login-scram" else "trust"
    if build == "floor" and not case.startswith("login"):
        # The transaction floor: floor.py's forwarder, one server connection per client.
        workdir = Path(tempfile.mkdtemp(prefix="forwarder-", dir=workroot))
        return start_floor(pg.port, workdir, wrapper=wrapper, ready_timeout=300)
    return start_combo(Combo(label, build, auth, False), pg, workroot, secret, wrapper=wrapper, ready_timeout=300)


def count_one(
    label: str, build: str, case: str, transactions: int, pg: TempPostgres, workroot: Path, secret: str
) -> int:
    out_dir = Path(tempfile.mkdtemp(prefix=f"callgrind-{label}-{case}-{transactions}-", dir=workroot))
    out_dir.chmod(0o777)  # PgBouncer runs as postgres when we are root
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p"]
    proc = start(label, build, case, pg, workroot, secret, wrapper)
    try:
        login = case.startswith("login")
        args = PgbenchArgs(
            clients=1, jobs=1, transactions=transactions, mode="simple" if login else case, connect=login
        )
        password = PASSWORD if case == "login-scram" else None
        result = run_pgbench(proc.host, proc.port, DB, args, user=USER, password=password, timeout=1800)
        if not result.ok or result.transactions != transactions:
            raise RuntimeError(f"{label} {case}: pgbench: {result.error or result.transactions}\n{proc.log_tail()}")
    finally:
        code = proc.stop(timeout=300)  # callgrind writes its counts as the process exits
    total = callgrind_total(out_dir)
    if not total:
        raise RuntimeError(f"{label} {case}: callgrind wrote no counts (exit {code})\n{proc.log_tail()}")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL=PATH (a compiled tree, or `sources`), `pgbouncer`, or `floor`; repeat "
        "(default: compiled=build/compiled, pgbouncer, floor)",
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--counts", default="200,1200", help="the two runs' lengths, in pgbench transactions")
    parser.add_argument("--out", type=Path, help="markdown report (default: stdout only)")
    parser.add_argument(
        "--keep", action="store_true", help="keep callgrind's files (for callgrind_annotate) and say where"
    )
    opts = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    cases = [c.strip() for c in opts.cases.split(",") if c.strip()]
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    lengths = sorted({int(n) for n in opts.counts.split(",")})
    if len(lengths) != 2:
        parser.error("--counts takes two different lengths")
    variants: list[tuple[str, str]] = []
    for spec in opts.variant or [f"compiled={ROOT / 'build' / 'compiled'}", "pgbouncer", "floor"]:
        if spec in ("pgbouncer", "floor"):
            if spec == "pgbouncer" and pgbouncer_path() is None:
                parser.error("pgbouncer is not installed")
            variants.append((spec, spec))
        else:
            label, _, path = spec.partition("=")
            variants.append((label, path or "sources"))

    workroot = Path(tempfile.mkdtemp(prefix="pgfleet-instructions-"))
    workroot.chmod(0o755)
    counts: list[Count] = []
    pg = TempPostgres(max_connections=100).start()
    try:
        pg.sql(f"CREATE DATABASE {DB}")
        pgbench_init(pg.host, pg.port, DB, scale=1)
        secret = scram_secret(PASSWORD)
        for case in cases:
            for label, build in variants:
                if build == "floor" and case == "login-scram":
                    continue  # canned answers: no password
                totals = {n: count_one(label, build, case, n, pg, workroot, secret) for n in lengths}
                counts.append(Count(label, case, totals))
                print(f"{label} {case}: {counts[-1].per_transaction():,.0f} instructions", flush=True)
    finally:
        pg.cleanup()
        if opts.keep:
            print(f"callgrind's files are under {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)

    labels = [label for label, _ in variants]
    others = [label for label in labels if label != "pgbouncer"]
    by = {(c.variant, c.case): c.per_transaction() for c in counts}
    columns = ["case", *labels, *(f"{label} ÷ pgbouncer" for label in others)]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for case in cases:
        ref = by.get(("pgbouncer", case))
        cells = [f"{by[(v, case)]:,.0f}" if (v, case) in by else "—" for v in labels]
        cells += [f"{by[(v, case)] / ref:.2f}" if ref and (v, case) in by else "—" for v in others]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    report = "\n".join(lines)
    print(report)
    if opts.out:
        opts.out.write_text(f"`benchmarks/instructions.py {' '.join(sys.argv[1:])}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
