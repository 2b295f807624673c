"""Task-affine request routing for the engine replicas on Ray Serve: each task has a home replica.

Ray Serve's default router sends a multiplexed model id to a replica that already has it loaded, and
a model loaded on no replica to the replicas with the fewest models, which once every replica's cache
is full is any replica. Under a long tail of tasks, then, every replica ends up loading much the same
tasks, and R replicas of C slots hold about C distinct tasks instead of R x C (measured by
bench/scaleout.py: a hit rate of 0.64 for 1,000 Zipf tasks over 2 x 64 slots, what random routing gives).

This router ranks replicas by rendezvous hashing of (task, replica): the first is the task's *home*.
A task's requests go to its home or to a replica that already has it loaded, whichever has the shorter
queue; when all of those carry more than LOAD_BOUND times the mean load, the other replicas join them
(consistent hashing with bounded loads). Only when none of those has accepted the request for `wait_s` (they are at
`max_ongoing_requests`, or did not answer Ray's queue-length probe in time, which happens on a loaded
machine) may it go to any other replica. When replicas come and go, only the tasks homed on them move.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable, Mapping, Sequence

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

__all__ = ["LOAD_BOUND", "WAIT_S", "TaskAffinityRouter", "affinity_ranks", "home_order"]

WAIT_S = 1.0
"""Default seconds a request waits for its task's home (or a holder) before any replica may take it."""
LOAD_BOUND = 1.25
"""Default load bound: a home may carry this many times the mean in flight, plus one, before sharing."""


def _weight(task: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{task}\0{replica}".encode(), digest_size=8).digest()


def home_order(task: str, replicas: Iterable[str]) -> list[str]:
    """Replica ids in the task's rendezvous-hash order: the first is its home."""
    return sorted(replicas, key=lambda replica: _weight(task, replica), reverse=True)


def affinity_ranks(
    task: str,
    replicas: Sequence[str],
    loaded: Iterable[str],
    *,
    queues: Mapping[str, int] | None = None,
    bound: float = LOAD_BOUND,
) -> list[list[str]]:
    """The ranks to try for a task: its home and the replicas that have it loaded, then the rest.

    With `queues` (requests in flight per replica), a first rank whose every replica carries more than
    `bound` times the mean load (plus one) also takes the replicas that do not: consistent hashing
    with bounded loads, so one hot task cannot leave the other replicas idle.
    """
    order = home_order(task, replicas)
    if not order:
        return []
    first = {order[0], *loaded}
    if queues is not None:
        limit = bound * (sum(queues.get(r, 0) for r in order) / len(order)) + 1
        if all(queues.get(r, 0) > limit for r in first):
            first |= {r for r in order if queues.get(r, 0) <= limit}
    ranks = [[r for r in order if r in first], [r for r in order if r not in first]]
    return [rank for rank in ranks if rank]


class TaskAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Ray Serve request router: a task's home replica (or one that has it loaded) first, then any other."""

    def initialize_state(self, *, wait_s: float = WAIT_S, bound: float = LOAD_BOUND, **kwargs) -> None:
        """Ray's hook for `request_router_kwargs`: the wait for a task's home, and the load bound."""
        super().initialize_state(**kwargs)
        self._wait_s, self._bound = wait_s, bound

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """One routing attempt's ranks of replicas, most preferred first."""
        task = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not task:
            # Management and health requests: two random replicas, the shorter queue wins.
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loaded = {rid.unique_id for rid in self._multiplexed_model_id_to_replica_ids.get(task, ())}
        # Ray's cache of each replica's queue length (refreshed by its probes); unknown counts as empty.
        cache = self.replica_queue_len_cache
        queues = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        ids = affinity_ranks(task, list(by_id), loaded & by_id.keys(), queues=queues, bound=self._bound)
        ranks = [[by_id[r] for r in rank] for rank in ids]
        context = pending_request.routing_context
        # Ray's router tries the next rank at once when no replica of one accepts; within the wait
        # window only the first is offered, and Ray backs off between attempts.
        context.should_backoff = True
        if context.multiplexed_start_matching_time is None:
            context.multiplexed_start_matching_time = time.time()
        if time.time() - context.multiplexed_start_matching_time < self._wait_s:
            return ranks[:1]
        return ranks
