"""`pgfleet-operator`: run the operator, or print the CRD it serves."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgfleet-operator", description="The pgfleet PgPool operator.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the operator (all namespaces unless --namespace is given)")
    run.add_argument("--namespace", "-n", action="append", default=[], help="watch only this namespace (repeatable)")
    run.add_argument("--pooler-image", help="image for pooler pods (default: the operator's own image)")
    run.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL to serve (default: %(default)s; empty to disable)",
    )
    run.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    commands.add_parser("crd", help="print the PgPool CustomResourceDefinition as YAML")
    budget = commands.add_parser(
        "budget",
        help="keep poolers on plain machines inside a backend budget (no Kubernetes)",
        description="Observe one PostgreSQL server and keep the poolers given by --pooler inside the backends it "
        "can give: the budget loop of the operator, with pods from a list of URLs.",
    )
    budget.add_argument("--dsn", required=True, help="the observer's connection (it is kept open)")
    budget.add_argument(
        "--pooler", action="append", required=True, metavar="URL", help="a pooler's HTTP control port (repeatable)"
    )
    budget.add_argument("--token-file", required=True, help="file holding the poolers' http_token_file token")
    budget.add_argument("--max-backends", type=int, required=True, help="most backends the fleet may hold")
    budget.add_argument("--max-backends-percent", type=int, help="and at most this share of usable connections")
    budget.add_argument("--reserve", type=int, default=0, help="backends kept free for others (default 0)")
    budget.add_argument("--period", type=float, default=2.0, help="seconds between periods (default 2)")
    budget.add_argument("--workers", type=int, default=1, help="worker processes per pooler (each pod's floor)")
    budget.add_argument("--role", default="", help="the poolers' PostgreSQL role, for its CONNECTION LIMIT")
    budget.add_argument("--database", default="", help="the PostgreSQL database, for its CONNECTION LIMIT")
    budget.add_argument("--json", action="store_true", help="print one JSON object per period")
    budget.add_argument("--periods", type=int, default=0, help="stop after this many periods (default: run on)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "crd":
        from .crd import crd_yaml

        sys.stdout.write(crd_yaml())
        return 0

    if args.command == "budget":
        from .standalone import run_standalone

        return run_standalone(args)

    if args.pooler_image:
        # Read by the handlers module when it loads, as every other setting.
        os.environ["PGFLEET_POOLER_IMAGE"] = args.pooler_image
    import kopf

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.FULL)
    from . import handlers  # registers the handlers with kopf

    del handlers
    kopf.run(
        standalone=True,  # one replica with the Recreate strategy; no peering objects needed
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
