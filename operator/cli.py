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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "crd":
        from .crd import crd_yaml

        sys.stdout.write(crd_yaml())
        return 0

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
