"""Pooled bank rows: slots sized to each adapter, heterogeneous ranks side by side, compaction and growth.

References are plain torch on the artifact's own tensors; byte counts are arithmetic by hand.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from adapters.banks import LoRABank
from adapters.router import Router

D_IN, D_OUT = 6, 5


def _lora(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"A": torch.randn(r, D_IN, generator=g), "B": torch.randn(D_OUT, r, generator=g)}


def _ref(w: dict[str, torch.Tensor], x: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * (x @ w["A"].t() @ w["B"].t())


def test_ranks_1_to_300_share_a_bank_each_taking_only_its_own_rows() -> None:
    router = Router()
    bank = LoRABank(d_in=D_IN, d_out=D_OUT, slots=5, router=router)
    ranks = {1: 1, 2: 300, 3: 8, 4: 64}
    weights = {s: _lora(r, seed=s) for s, r in ranks.items()}
    for slot, w in weights.items():
        bank.load(slot, **w, scaling=0.5)
    row = (D_IN + D_OUT) * 4  # one rank unit of A and B, float32
    for slot, r in ranks.items():
        assert bank.slot_bytes(slot) == r * row
    # no slot reserves the largest rank: the pool holds the rows loaded (plus row 0 and growth room)
    assert bank.allocated_bytes() < 1.3 * (1 + sum(ranks.values())) * row
    x = torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(9))
    with router.route(torch.tensor([2, 1, 4, 3])):
        mixed = bank.delta(x)
    for i, slot in enumerate([2, 1, 4, 3]):
        torch.testing.assert_close(mixed[i], _ref(weights[slot], x[i], 0.5), rtol=1e-5, atol=1e-5)
    for slot in ranks:
        with router.route(torch.tensor([slot])):
            torch.testing.assert_close(
                bank.delta(x[:1])[0], _ref(weights[slot], x[0], 0.5), rtol=1e-5, atol=1e-5
            )


def test_churn_compacts_and_grows_without_changing_any_resident_adapter() -> None:
    router = Router()
    bank = LoRABank(d_in=D_IN, d_out=D_OUT, slots=4, router=router)
    keep = _lora(4, seed=1)
    bank.load(1, **keep, scaling=1.0)
    x = torch.randn(1, 2, D_IN, generator=torch.Generator().manual_seed(3))
    reclaimed = 0
    loaded = {1: keep}
    for step in range(60):
        slot = 2 + step % 2
        before = bank.pool.top
        w = _lora(1 + step % 7, seed=100 + step)
        bank.load(slot, **w, scaling=1.0)
        reclaimed += bank.pool.top <= before  # rows reused, or compacted: nothing appended
        loaded[slot] = w
        if step % 3 == 0:
            bank.evict(slot)
            loaded.pop(slot)
        for s, w in loaded.items():  # every resident adapter, wherever compaction moved its rows
            with router.route(torch.tensor([s])):
                torch.testing.assert_close(bank.delta(x), _ref(w, x, 1.0), rtol=1e-5, atol=1e-5)
    assert reclaimed > 0  # dead rows were reclaimed, not only appended
    live = int(bank.pool.count.sum())
    # the pool stays near what is live: compaction keeps it from growing with every load
    assert bank.pool.capacity <= 2 * (1 + live) + 8
    bank.evict(1)
    with router.route(torch.tensor([1, 0])):
        assert not bank.active()


def _assert_serves(bank: LoRABank, router: Router, loaded: dict[int, dict[str, torch.Tensor]]) -> None:
    x = torch.randn(1, 2, D_IN, generator=torch.Generator().manual_seed(5))
    for s, w in loaded.items():
        with router.route(torch.tensor([s])):
            torch.testing.assert_close(bank.delta(x), _ref(w, x, 1.0), rtol=1e-5, atol=1e-5)


def test_an_evicted_adapters_rows_are_taken_by_the_next_of_its_size_without_moving_anything() -> None:
    router = Router()
    bank = LoRABank(d_in=D_IN, d_out=D_OUT, slots=6, router=router)
    loaded = {s: _lora(8, seed=s) for s in range(1, 5)}
    for s, w in loaded.items():
        bank.load(s, **w, scaling=1.0)
    pool = bank.pool
    freed, top, buffers = int(pool.offset[2]), pool.top, pool.buffer("A")
    bank.evict(2)
    loaded.pop(2)
    loaded[5] = _lora(8, seed=50)
    bank.load(5, **loaded[5], scaling=1.0)
    assert int(pool.offset[5]) == freed and pool.top == top
    assert pool.buffer("A") is buffers  # no compaction, no growth: the same buffer
    # a smaller one takes the front of a freed range, and another fits in what it left
    bank.evict(3)
    loaded.pop(3)
    loaded[3] = _lora(3, seed=60)
    bank.load(3, **loaded[3], scaling=1.0)
    loaded[2] = _lora(5, seed=61)
    bank.load(2, **loaded[2], scaling=1.0)
    assert pool.top == top
    assert sorted([int(pool.offset[3]), int(pool.offset[2])]) == [1 + 16, 1 + 16 + 3]
    _assert_serves(bank, router, loaded)


def test_random_churn_never_overlaps_two_adapters_rows() -> None:
    """Hundreds of loads and evictions of ranks 1-16: live ranges stay disjoint and every adapter serves."""
    router = Router()
    bank = LoRABank(d_in=D_IN, d_out=D_OUT, slots=11, router=router)
    pool = bank.pool
    rng = torch.Generator().manual_seed(0)
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(400):
        slot = int(torch.randint(1, 11, (1,), generator=rng))
        if slot in loaded and step % 3 == 0:
            bank.evict(slot)
            loaded.pop(slot)
        else:
            loaded[slot] = _lora(int(torch.randint(1, 17, (1,), generator=rng)), seed=1000 + step)
            bank.load(slot, **loaded[slot], scaling=1.0)
        spans = sorted((int(pool.offset[s]), int(pool.offset[s] + pool.count[s])) for s in loaded)
        assert all(a[1] <= b[0] for a, b in pairwise(spans)), spans
        assert all(start >= 1 and end <= pool.top for start, end in spans)  # row 0 stays the identity
        if step % 40 == 0:
            _assert_serves(bank, router, loaded)
    _assert_serves(bank, router, loaded)
    assert pool.capacity <= 2 * (1 + 10 * 16)
