"""Batches of rows of very different lengths run as several forwards of similar-length rows."""

from __future__ import annotations

import itertools
import random

import pytest
from api_support import Reference, assert_outputs_close, make_artifact, multipart, tiny_backbone
from api_support import admin as admin_headers
from prometheus_client.parser import text_string_to_metric_families

from service.engine import length_splits


def _cost(lengths: list[int], runs: list[list[int]], forward_cost: int) -> int:
    return sum(len(r) * max(lengths[i] for i in r) + forward_cost for r in runs)


def _brute_force(lengths: list[int], forward_cost: int) -> int:
    """The cheapest cost over every way to cut the sorted rows into contiguous runs."""
    ordered = sorted(lengths)
    n = len(ordered)
    best = None
    for cuts in itertools.product([False, True], repeat=n - 1):
        runs, start = [], 0
        for k, cut in enumerate(cuts, start=1):
            if cut:
                runs.append(ordered[start:k])
                start = k
        runs.append(ordered[start:])
        cost = sum(len(r) * r[-1] + forward_cost for r in runs)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_splits_are_optimal_and_cover_every_row_once(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 8), rng.randint(20, 60)]) for _ in range(rng.randint(1, 10))]
    forward_cost = rng.choice([0, 5, 30, 200])
    runs = length_splits(lengths, forward_cost=forward_cost)
    assert sorted(i for r in runs for i in r) == list(range(len(lengths)))
    assert _cost(lengths, runs, forward_cost) == _brute_force(lengths, forward_cost)


def test_a_costly_forward_keeps_one_batch_and_a_free_one_splits_by_length():
    lengths = [5, 50, 6, 48, 7]
    assert length_splits(lengths, forward_cost=10_000) == [[0, 2, 4, 3, 1]]
    assert length_splits(lengths, forward_cost=0) == [[0], [2], [4], [3], [1]]
    assert length_splits([9, 9, 9], forward_cost=0) == [[0, 1, 2]]  # equal lengths are never cut


def _forwards(metrics_text: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    return next(s.value for s in families["adapterserve_batch_size"].samples if s.name.endswith("_count"))


@pytest.mark.asyncio
@pytest.mark.parametrize("split_cost_tokens", [0, 10**9])
async def test_split_batches_answer_like_one_input_at_a_time(running, artifacts, split_cost_tokens):
    """Short and long inputs of two tasks in one request: same answers whether split or not."""
    inputs = ["fun", " ".join(["very good"] * 30), "bad", " ".join(["not", "fun"] * 25), "i loved it"]
    async with running(split_cost_tokens=split_cost_tokens, max_wait_ms=50) as (app, client):
        spec = app.state.service.backbone.spec
        dirs = {
            "a": make_artifact(artifacts, "a", "lora", spec, seed=1),
            "b": make_artifact(artifacts, "b", "bottleneck", spec, seed=2, head="three"),
        }
        for name, d in dirs.items():
            r = await client.post(f"/v1/adapters/{name}", files=multipart(d), headers=admin_headers())
            assert r.status_code == 201
        before = _forwards((await client.get("/metrics")).text)
        answers = {}
        for name in dirs:
            r = await client.post(
                f"/v1/tasks/{name}/predict",
                json={"inputs": inputs, "parameters": {"return_all_scores": True}},
            )
            assert r.status_code == 200, r.text
            answers[name] = r.json()["outputs"]
        forwards = _forwards((await client.get("/metrics")).text) - before
    ref = Reference(tiny_backbone)
    for name, d in dirs.items():
        assert_outputs_close(answers[name], ref.outputs(d, inputs, all_scores=True))
    # each request is one batch: split, it runs as one forward per distinct length
    distinct = len({len(ref.tok(x)["input_ids"]) for x in inputs})
    assert forwards == (2 * distinct if split_cost_tokens == 0 else 2)
