"""A paused PgPool: nothing of the new generation is computed, so observedGeneration stays."""

from __future__ import annotations

from typing import Any

from pgfleet.operator import reconcile

from .conftest import pgpool_body


async def test_paused_does_not_claim_the_new_generation() -> None:
    body = pgpool_body(paused=True)
    body["metadata"]["generation"] = 2
    body["status"] = {"observedGeneration": 1, "budget": {"total": 36}}
    # Paused returns before any API or database call: no client is needed.
    ctx: Any = reconcile.Context(client=None, probe=None, pooler_image="pgfleet:test")  # type: ignore[arg-type]
    outcome = await reconcile.reconcile(ctx, body)
    assert outcome.status["observedGeneration"] == 1
    (ready,) = outcome.status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "Paused")
    # Never reconciled before: no observedGeneration at all (the status patch leaves it unset).
    del body["status"]
    outcome = await reconcile.reconcile(ctx, body)
    assert "observedGeneration" not in outcome.status
