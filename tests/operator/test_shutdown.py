"""The operator's cleanup stops the reconciles still running before it closes what they use.

kopf runs the cleanup activity while timers it gave up waiting for still run; such a
reconcile then met a closed API client and ended in a traceback (or, before the budget
loops refused late registrations, started a loop that outlived the operator).
"""

from __future__ import annotations

import asyncio

from pgfleet.operator import handlers


async def test_the_cleanup_lets_quick_reconciles_finish_and_cancels_slow_ones() -> None:
    finished: list[str] = []

    async def reconcile(name: str, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.runtime.working.add(task)
        try:
            await asyncio.sleep(seconds)
            finished.append(name)
        finally:
            handlers.runtime.working.discard(task)

    quick = asyncio.create_task(reconcile("quick", 0.05))
    slow = asyncio.create_task(reconcile("slow", 3600))
    await asyncio.sleep(0)  # both have started
    await asyncio.wait_for(handlers._stop_reconciles(grace=1.0), timeout=30)
    assert quick.done() and not quick.cancelled() and finished == ["quick"]
    assert slow.cancelled()
    assert not handlers.runtime.working
