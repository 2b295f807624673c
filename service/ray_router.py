"""Task-affine request routing for the engine replicas on Ray Serve: each task has a home replica.

Ray Serve's default router sends a multiplexed model id to a replica that already has it loaded, and
a model loaded on no replica to the replicas with the fewest models, which once every replica's cache
is full is any replica. Under a long tail of tasks, then, every replica ends up loading much the same
tasks, and R replicas of C slots hold about C distinct tasks instead of R x C (measured by
bench/scaleout.py: a hit rate of 0.64 for 1,000 Zipf tasks over 2 x 64 slots, what random routing gives).

This router ranks replicas by rendezvous hashing of (task, replica): the first is the task's *home*.
A task's requests go to its home or to a replica that already has it loaded, whichever has the shorter
queue. Only when none of those has accepted the request for `wait_s` (they are at
`max_ongoing_requests`, or did not answer Ray's queue-length probe in time, which happens on a loaded
machine) may it go to any other replica. When replicas come and go, only the tasks homed on them move.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable, Sequence

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

__all__ = ["TaskAffinityRouter", "affinity_ranks", "home_order"]


def _weight(task: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{task}\0{replica}".encode(), digest_size=8).digest()


def home_order(task: str, replicas: Iterable[str]) -> list[str]:
    """Replica ids in the task's rendezvous-hash order: the first is its home."""
    return sorted(replicas, key=lambda replica: _weight(task, replica), reverse=True)


def affinity_ranks(task: str, replicas: Sequence[str], loaded: Iterable[str]) -> list[list[str]]:
    """The ranks to try for a task: its home and the replicas that have it loaded, then the rest."""
    order = home_order(task, replicas)
    if not order:
        return []
    first = {order[0], *loaded}
    ranks = [[r for r in order if r in first], [r for r in order if r not in first]]
    return [rank for rank in ranks if rank]


class TaskAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Ray Serve request router: a task's home replica (or one that has it loaded) first, then any other."""

    def initialize_state(self, *, wait_s: float = 1.0, **kwargs) -> None:
        """Ray's hook for `request_router_kwargs`: how long a request waits for its home before spilling."""
        super().initialize_state(**kwargs)
        self._wait_s = wait_s

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
        ranks = [
            [by_id[r] for r in rank] for rank in affinity_ranks(task, list(by_id), loaded & by_id.keys())
        ]
        context = pending_request.routing_context
        # Ray's router tries the next rank at once when no replica of one accepts; within the wait
        # window only the first is offered, and Ray backs off between attempts.
        context.should_backoff = True
        if context.multiplexed_start_matching_time is None:
            context.multiplexed_start_matching_time = time.time()
        if time.time() - context.multiplexed_start_matching_time < getattr(self, "_wait_s", 1.0):
            return ranks[:1]
        return ranks
