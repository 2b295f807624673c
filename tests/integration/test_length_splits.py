"""Batches of rows of very different lengths run as several forwards of similar-length rows."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
from api_support import Reference, assert_outputs_close, make_artifact, multipart, tiny_backbone
from api_support import admin as admin_headers
from prometheus_client.parser import text_string_to_metric_families

from service.engine import balance, length_splits


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
@pytest.mark.parametrize(("split_cost_tokens", "compute_threads"), [(0, 1), (10**9, 1), (10**9, 2), (0, 2)])
async def test_split_batches_answer_like_one_input_at_a_time(
    running, artifacts, split_cost_tokens, compute_threads
):
    """Short and long inputs of two tasks in one request: same answers whether split or not, on any threads."""
    inputs = ["fun", " ".join(["very good"] * 30), "bad", " ".join(["not", "fun"] * 25), "i loved it"]
    settings = {"split_cost_tokens": split_cost_tokens, "max_wait_ms": 50, "compute_threads": compute_threads}
    async with running(**settings) as (app, client):
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
    if compute_threads == 1:
        assert forwards == (2 * distinct if split_cost_tokens == 0 else 2)
    else:
        # two threads: even one unsplit batch is cut in pieces, one per thread at least
        assert forwards >= (2 * distinct if split_cost_tokens == 0 else 4)


@pytest.mark.parametrize("seed", range(40))
def test_balanced_pieces_cover_every_row_once_in_length_order(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 8), rng.randint(20, 60)]) for _ in range(rng.randint(1, 40))]
    parts = rng.choice([1, 2, 3, 4])
    runs = length_splits(lengths, forward_cost=rng.choice([0, 30, 10**6]))
    pieces = balance(runs, lengths, parts=parts)
    assert sorted(i for p in pieces for i in p) == list(range(len(lengths)))

    def cost(piece):
        return len(piece) * max(lengths[i] for i in piece)

    for piece in pieces:
        # a piece is a contiguous stretch of one run: rows stay sorted by length
        assert [lengths[i] for i in piece] == sorted(lengths[i] for i in piece)
        assert any(piece == run[k : k + len(piece)] for run in runs for k in range(len(run)))
    assert [cost(p) for p in pieces] == sorted((cost(p) for p in pieces), reverse=True)
    if parts == 1:
        assert sorted(map(tuple, pieces)) == sorted(map(tuple, runs))
        return
    share = sum(cost(r) for r in runs) / parts
    biggest = pieces[0]
    assert len(pieces) >= 4 * parts or len(biggest) == 1 or cost(biggest) <= 1.25 * share


def test_balance_halves_one_even_run_for_two_threads():
    lengths = [10] * 8
    assert balance([list(range(8))], lengths, parts=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert balance([[0]], [7], parts=2) == [[0]]


@pytest.mark.asyncio
async def test_the_pieces_of_one_batch_run_on_two_threads_at_once(running, artifacts):
    """Each piece's forward waits at a barrier for the other: run one after the other, they would never meet."""
    inputs = ["fun", "bad", "i loved it", "a dull mess"]
    async with running(split_cost_tokens=10**9, compute_threads=2, max_wait_ms=50) as (app, client):
        svc = app.state.service
        d = make_artifact(artifacts, "a", "lora", svc.backbone.spec, seed=1)
        r = await client.post("/v1/adapters/a", files=multipart(d), headers=admin_headers())
        assert r.status_code == 201
        barrier = threading.Barrier(2, timeout=20)
        classify = svc.model.classify
        threads: set[str] = set()

        calls = itertools.count()

        def meeting(*args, **kwargs):
            threads.add(threading.current_thread().name)
            if next(calls) < 2:  # the first two pieces must be running at the same time
                barrier.wait()
            return classify(*args, **kwargs)

        svc.model.classify = meeting
        try:
            r = await client.post("/v1/tasks/a/predict", json={"inputs": inputs})
        finally:
            svc.model.classify = classify
    assert r.status_code == 200, r.text
    assert len(threads) == 2 and all(t.startswith("adapterserve-compute") for t in threads)
    ref = Reference(tiny_backbone)
    assert_outputs_close(r.json()["outputs"], ref.outputs(d, inputs))
