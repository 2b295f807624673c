"""Task-affine routing: rendezvous hashing of (task, replica), checked against hashes computed here."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

pytest.importorskip("ray.serve")

from service.ray_router import affinity_ranks, home_order

pytestmark = pytest.mark.ray

REPLICAS = ["r-a1", "r-b2", "r-c3", "r-d4"]
TASKS = [f"task{i}" for i in range(1000)]


def by_hand(task: str, replicas: list[str]) -> str:
    """The replica with the largest blake2b-64 of task NUL replica, big-endian as bytes compare."""
    weights = {
        r: int.from_bytes(hashlib.blake2b(f"{task}\0{r}".encode(), digest_size=8).digest(), "big")
        for r in replicas
    }
    return max(weights, key=weights.__getitem__)


def test_the_home_is_the_replica_of_largest_weight_whatever_the_order_given() -> None:
    for task in TASKS[:50]:
        assert home_order(task, REPLICAS)[0] == by_hand(task, REPLICAS)
        assert home_order(task, REPLICAS[::-1]) == home_order(task, REPLICAS)


def test_tasks_spread_over_the_replicas() -> None:
    homes = Counter(home_order(task, REPLICAS)[0] for task in TASKS)
    assert set(homes) == set(REPLICAS)
    # 1,000 tasks over 4 replicas: 250 each, a binomial standard deviation of about 14
    assert all(190 <= n <= 310 for n in homes.values()), homes


def test_a_replica_leaving_moves_only_the_tasks_homed_on_it() -> None:
    before = {task: home_order(task, REPLICAS)[0] for task in TASKS}
    after = {task: home_order(task, REPLICAS[:3])[0] for task in TASKS}
    moved = {task for task in TASKS if before[task] != after[task]}
    assert moved == {task for task in TASKS if before[task] == REPLICAS[3]}
    # and each moves to its second choice
    assert all(after[task] == home_order(task, REPLICAS)[1] for task in moved)


def test_ranks_put_the_home_and_the_holders_first_and_the_rest_after() -> None:
    task = "sst2"
    order = home_order(task, REPLICAS)
    holder = order[2]
    first, rest = affinity_ranks(task, REPLICAS, {holder})
    assert first == [order[0], holder]
    assert rest == [order[1], order[3]]
    assert affinity_ranks(task, REPLICAS, set()) == [[order[0]], order[1:]]
    assert affinity_ranks(task, REPLICAS[:1], set()) == [REPLICAS[:1]]
    assert affinity_ranks(task, [], set()) == []


def test_a_home_over_the_load_bound_shares_with_the_replicas_under_it() -> None:
    task = "sst2"
    home, second, third, fourth = home_order(task, REPLICAS)
    # mean 20, limit 1.25 * 20 + 1 = 26: the home at 40 is over it, the others under it join
    queues = {home: 40, second: 10, third: 20, fourth: 10}
    (first,) = affinity_ranks(task, REPLICAS, set(), queues=queues)
    assert first == [home, second, third, fourth]
    # at 26 (the limit itself) the home keeps its tasks
    queues = {home: 26, second: 18, third: 18, fourth: 18}  # mean 20
    assert affinity_ranks(task, REPLICAS, set(), queues=queues)[0] == [home]
    # one replica far over the bound stays out of the shared rank
    queues = {home: 60, second: 60, third: 0, fourth: 0}  # mean 30, limit 38.5
    assert affinity_ranks(task, REPLICAS, set(), queues=queues) == [[home, third, fourth], [second]]
    # a holder under the bound keeps the request among home and holders
    queues = {home: 60, second: 0, third: 10, fourth: 10}  # mean 20, limit 26
    assert affinity_ranks(task, REPLICAS, {fourth}, queues=queues)[0] == [home, fourth]
