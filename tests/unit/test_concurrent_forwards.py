"""Several threads run forwards on one model at once: each sees only its own rows' routing."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import config_for, make_batch, random_tensors, wrap

from adapters.banks import SublayerBanks
from adapters.model import BankConfig
from adapters.router import SharedLock

_CONFIGS = [
    {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]},
    {"method": "bottleneck", "bottleneck_dim": 8},
    {"method": "parallel", "bottleneck_dim": 8},
    {"method": "prefix", "prefix_length": 3},
]


@pytest.fixture(scope="module")
def model():
    m = wrap("bert", banks=BankConfig(slots=len(_CONFIGS) + 1))
    head = {"head": {"type": "classification", "labels": ["a", "b", "c"]}}
    for slot, raw in enumerate(_CONFIGS, start=1):
        cfg = config_for({**raw, **head}, m.spec)
        m.load(slot, cfg, random_tensors(cfg, m.spec, seed=slot))
    return m


def test_forwards_on_two_threads_at_once_equal_the_same_forwards_one_after_the_other(model):
    """A barrier inside the forward holds both threads mid-pass, so their routing overlaps for sure."""
    batch = make_batch([5, 9, 3, 7], family="bert", seed=3)
    slot_sets = {"t0": [1, 2, 0, 3], "t1": [4, 3, 2, 1]}
    alone = {k: model.classify(batch.input_ids, batch.attention_mask, s).logits for k, s in slot_sets.items()}

    barrier = threading.Barrier(2, timeout=30)
    apply = SublayerBanks.apply

    def meeting(self, y):
        # Both threads walk the same layers: meeting at every sublayer keeps them in lockstep, each
        # with its own rows routed and its own sublayer input stashed while the other's is too.
        barrier.wait()
        return apply(self, y)

    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            got[name] = model.classify(batch.input_ids, batch.attention_mask, slot_sets[name]).logits
        except BaseException as exc:  # the test thread reports it
            errors.append(exc)

    SublayerBanks.apply = meeting
    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in slot_sets]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        SublayerBanks.apply = apply
    assert not errors, errors
    for name in slot_sets:
        assert torch.equal(got[name], alone[name]), name


def test_a_slot_write_waits_for_running_forwards_and_forwards_do_not_wait_for_each_other():
    lock = SharedLock()
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def forward(name: str) -> None:
        with lock.shared():
            order.append(f"{name} in")
            inside.set()
            release.wait(10)
            order.append(f"{name} out")

    def write() -> None:
        with lock.exclusive():
            order.append("write")

    f1 = threading.Thread(target=forward, args=("f1",))
    f1.start()
    assert inside.wait(10)
    # a second shared holder gets in while the first is still inside
    second = threading.Event()

    def quick() -> None:
        with lock.shared():
            second.set()

    q = threading.Thread(target=quick)
    q.start()
    assert second.wait(10)
    w = threading.Thread(target=write)
    w.start()
    w.join(0.2)
    assert w.is_alive() and "write" not in order  # the write waits for the running forward
    release.set()
    f1.join(10)
    w.join(10)
    q.join(10)
    assert order == ["f1 in", "f1 out", "write"]


def test_the_exclusive_holder_may_take_the_lock_again_in_either_mode():
    lock = SharedLock()
    with lock.exclusive():
        with lock.exclusive(), lock.shared():
            pass
        # still held: another thread cannot take it
        taken = threading.Event()

        def other() -> None:
            with lock.shared():
                taken.set()

        t = threading.Thread(target=other)
        t.start()
        assert not taken.wait(0.2)
    t.join(10)
    assert taken.is_set()
