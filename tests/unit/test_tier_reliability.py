"""The host tier under an upload that would exceed its byte budget, over a real store.

Budgets and sizes are chosen by hand: four 300-byte tasks against a 1000-byte host budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_registry import registry, upload

pytestmark = pytest.mark.asyncio


def _host(reg) -> list[str]:
    return sorted(k[0] for k in reg.host._entries)


async def test_an_upload_past_the_host_budget_evicts_cold_entries_never_pinned_or_in_use(
    tmp_path: Path,
) -> None:
    reg = registry(tmp_path / "store", pinned=["pinned"])
    await reg.start()
    for task in ("pinned", "busy", "cold"):
        await upload(reg, tmp_path, task, method="lora", nbytes=300)
    lease = reg.lease("busy")
    await reg.ready(lease)  # a request holds busy's decoded version
    # a cold entry used longest ago would go first by LRU: the pinned one, loaded first, is kept
    assert _host(reg) == ["busy", "cold", "pinned"] and reg.host.bytes == 900

    await upload(reg, tmp_path, "new", method="lora", nbytes=300)  # 1200 > 1000: one must go
    assert _host(reg) == ["busy", "new", "pinned"]
    assert reg.host.bytes == 900
    assert reg.m.tier_evictions.labels(tier="host")._value.get() == 1

    # with nothing cold left, a further upload still succeeds; the held and pinned entries stay
    await upload(reg, tmp_path, "more", method="lora", nbytes=300)
    assert {"busy", "pinned"} <= set(_host(reg)) and "new" not in _host(reg)
    reg.release(lease)
    # the evicted task still serves: its next request decodes it again from the store
    lease = reg.lease("cold")
    assert (await reg.ready(lease)).task == "cold"
    reg.release(lease)
