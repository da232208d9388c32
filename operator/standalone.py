"""`pgfleet-operator budget`: the budget loop without Kubernetes, pods from a list of URLs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .control import BudgetLoop, Fleet, PeriodReport
from .observe import ServerObserver


def pod_names(urls: Sequence[str]) -> dict[str, str]:
    """Pod name -> URL; the name is the URL's host:port."""
    out = {}
    for url in urls:
        base = url.rstrip("/")
        out[base.split("://", 1)[-1]] = base
    return out


def report_json(report: PeriodReport) -> dict[str, Any]:
    server = report.server
    fleets = {}
    for name, fleet in report.fleets.items():
        limits = fleet.limits
        fleets[name] = {
            "budget": fleet.budget.budget,
            "wanted": fleet.budget.wanted,
            "fleet_backends": fleet.fleet_backends,
            "held": fleet.budget.held,
            "waiting": fleet.budget.waiting,
            "reasons": [reason.value for reason in fleet.budget.reasons],
            "pods": {
                pod: {
                    "limit": limits.get(pod),
                    "target": fleet.budget.limits.get(pod),
                    "servers": r.held,
                    "clients": r.clients,
                    "waiting": r.waiting,
                    "reachable": r.reachable,
                }
                for pod, r in fleet.push.reports.items()
            },
            "unconfirmed": fleet.unconfirmed,
        }
    return {
        "at": round(report.at, 3),
        "took_ms": round(report.took * 1000, 1),
        "error": report.error or None,
        "usable": server.usable,
        "others": server.others,
        "headroom": server.headroom,
        "fleets": fleets,
    }


def report_line(report: PeriodReport) -> str:
    server = report.server
    head = time.strftime("%H:%M:%S", time.localtime(report.at))
    if report.error:
        head += f" database not observed ({report.error}): limits may only go down"
    else:
        head += f" usable {server.usable} others {server.others} headroom {server.headroom}"
    parts = [head]
    for name, fleet in report.fleets.items():
        pods = " ".join(
            f"{pod}={r.limit if r.reachable else '?'}/{r.held}s/{r.waiting}w" for pod, r in fleet.push.reports.items()
        )
        reasons = ",".join(reason.value for reason in fleet.budget.reasons)
        parts.append(
            f"{name}: budget {fleet.budget.budget} backends {fleet.fleet_backends} {pods}"
            + (f" [{reasons}]" if reasons else "")
        )
    return " | ".join(parts)


async def _main(args: argparse.Namespace, token: str) -> int:
    pods = pod_names(args.pooler)

    async def list_pods() -> dict[str, str]:
        return pods

    loop = BudgetLoop(ServerObserver(args.dsn, timeout=min(5.0, args.period * 2)), period=args.period)
    loop.set_fleet(
        Fleet(
            name="fleet",
            token=token,
            pods=list_pods,
            role=args.role,
            database=args.database,
            max_backends=args.max_backends,
            max_backends_percent=args.max_backends_percent,
            reserve=args.reserve,
            workers=args.workers,
        )
    )
    periods = 0
    done = asyncio.Event()

    def show(report: PeriodReport) -> None:
        nonlocal periods
        print(json.dumps(report_json(report)) if args.json else report_line(report), flush=True)
        periods += 1
        if args.periods and periods >= args.periods:
            done.set()

    running = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        running.add_signal_handler(signum, done.set)
    task = asyncio.create_task(loop.run(show))
    try:
        await done.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await loop.close()
    return 0


def run_standalone(args: argparse.Namespace) -> int:
    if args.max_backends < 1:
        print("pgfleet-operator budget: --max-backends must be at least 1", file=sys.stderr)
        return 2
    try:
        token = Path(args.token_file).read_text().strip()
        return asyncio.run(_main(args, token))
    except OSError as exc:
        print(f"pgfleet-operator budget: {exc}", file=sys.stderr)
        return 1
