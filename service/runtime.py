"""The running service: builds the parts from settings, warms up, serves predict, and drains."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.backbone import Backbone, load_backbone
from adapters.model import BankConfig, MultiTaskModel
from service.auth import KeyRing, load_or_create_admin_key
from service.batcher import Batcher, Row
from service.cache import DeviceSlots
from service.decode import Decoder
from service.engine import Embed, Encoded, Engine, Work
from service.hypernets import Hypernetworks
from service.metrics import Metrics, MetricsObserver
from service.registry import Registry
from service.settings import Settings
from store.base import ArtifactStore, validate_name
from store.errors import (
    AdapterServeError,
    DeadlineExceeded,
    Draining,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    QueueFull,
)
from store.local import LocalStore
from store.safetensors_io import SafetensorsLimits

__all__ = ["Answer", "Service"]

log = logging.getLogger(__name__)

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter.safetensors"
_HYPER_CONFIG = "hypernetwork_config.json"
_HYPER_WEIGHTS = "hypernetwork.safetensors"


class Service:
    """Everything one server process runs; the app's routes are thin calls into it."""

    def __init__(
        self, settings: Settings, *, backbone: Backbone | None = None, store: ArtifactStore | None = None
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(max_tasks=settings.metrics_max_tasks)
        self._backbone = backbone
        self._store = store
        self.ready = asyncio.Event()
        self.draining = False
        self.started = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._warm_task: asyncio.Task[None] | None = None
        self._drained: asyncio.Task[None] | None = None
        self.pause: Callable[[float], Awaitable[None]] = asyncio.sleep
        """How a refusal waits before it is answered (a seam for tests)."""

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the backbone and open the store (failing fast), then warm up in the background."""
        s = self.settings
        # Forward threads take the interpreter lock back after every torch call; under a flood of
        # requests the event loop holds it for whole switch intervals, and at Python's default 5 ms a
        # forward of a few hundred calls slowed from ~0.1 s to seconds (bench/http.py, 256 connections).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(s.switch_interval_ms / 1000)
        if self._backbone is None:
            self._backbone = await asyncio.to_thread(
                load_backbone, s.backbone, device=s.device, dtype=s.dtype
            )
        self.backbone = self._backbone
        banks = BankConfig(
            slots=s.slots,
            lora_max_rank=s.lora_max_rank,
            bottleneck_max_dim=s.bottleneck_max_dim,
            prefix_max_len=s.prefix_max_len,
            head_max_outputs=s.head_max_outputs,
        )
        self.model = await asyncio.to_thread(MultiTaskModel, self.backbone, banks=banks)
        self.limits = SafetensorsLimits(max_file_bytes=s.max_upload_bytes)
        self.store = self._store or await asyncio.to_thread(
            LocalStore, s.store.expanduser(), limits=self.limits, max_store_bytes=s.max_store_bytes
        )
        admin = list(s.admin_keys) or [await asyncio.to_thread(load_or_create_admin_key, s.key_file)]
        self.keys = KeyRing(admin_keys=admin, api_keys=list(s.api_keys))
        self.device_slots = DeviceSlots(model=self.model, budget_bytes=s.cache_bytes, metrics=self.metrics)
        self.engine = Engine(
            model=self.model,
            device=self.device_slots,
            metrics=self.metrics,
            max_input_tokens=s.max_input_tokens,
            split_cost_tokens=s.split_cost_tokens,
            compute_threads=s.compute_threads,
        )
        self.hypernetworks = Hypernetworks(store=self.store, model=self.model, limits=self.limits)
        self.decoder = Decoder(
            model=self.model,
            limits=self.limits,
            pin_memory=self.backbone.device.type == "cuda",
            hypernetworks=self.hypernetworks,
        )
        self.registry = Registry(
            store=self.store,
            decoder=self.decoder,
            device=self.device_slots,
            metrics=self.metrics,
            host_cache_bytes=s.host_cache_bytes,
            run_on_device=self.engine.call,
            pinned=list(s.pinned),
        )
        self.hypernetworks.listeners.append(self.registry.drop_generated)
        await self.registry.start()
        self.batcher = Batcher(
            run_batch=self.engine.run_batch,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            policy=s.batching,
            observer=MetricsObserver(self.metrics),
        )
        self.batcher.start()
        self.started = True
        self._warm_task = asyncio.get_running_loop().create_task(self._warm_up(), name="adapterserve-warmup")
        log.info(
            "adapterserve: backbone %s (%s) on %s/%s, %d slots",
            self.backbone.spec.name,
            self.backbone.spec.family,
            self.backbone.device,
            str(self.backbone.dtype).removeprefix("torch."),
            self.model.num_slots,
        )

    async def _warm_up(self) -> None:
        try:
            if not self.registry.names() and self.settings.seed_dir is not None:
                await self.seed(self.settings.seed_dir)
            if self.settings.warmup:
                await self.engine.call(self.engine.warm_up)
                await self._preload()
        except Exception:
            log.exception("warm-up failed; serving without it")
        if not self.draining:
            self.ready.set()
            self.metrics.ready.set(1)
            log.info("adapterserve: ready")

    async def _preload(self) -> None:
        """Pinned tasks first, then other tasks' current versions while device slots are free."""
        names = self.registry.names()
        order = [n for n in names if self.registry.is_pinned(n)] + [
            n for n in names if not self.registry.is_pinned(n)
        ]
        for name in order[: self.model.num_slots]:
            try:
                lease = self.registry.lease(name)
            except AdapterServeError:
                continue
            try:
                adapter = await self.registry.ready(lease)
                await self.engine.call(self.device_slots.assign, [adapter])
            except AdapterServeError as exc:
                log.warning("could not preload task %s: %s", name, exc.message)
            finally:
                self.registry.release(lease)

    async def seed(self, root: Path) -> int:
        """Import every artifact directory under `root` (each named after its task); returns how many."""
        if not root.is_dir():
            log.warning("seed directory %s does not exist", root)
            return 0
        # Hypernetworks first: the tasks generated from them name them.
        await self._seed_hypernetworks(root / "hypernetworks")
        count = 0
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            config, weights = sub / _CONFIG, sub / _WEIGHTS
            if not (config.is_file() and weights.is_file()):
                continue
            try:
                validate_name(sub.name)
                await self.registry.upload(
                    sub.name, config_bytes=config.read_bytes(), weights_path=weights, activate=True
                )
                count += 1
            except AdapterServeError as exc:
                log.warning("seed %s skipped: %s", sub.name, exc.message)
        log.info("seeded %d tasks from %s", count, root)
        return count

    async def _seed_hypernetworks(self, root: Path) -> None:
        if not root.is_dir():
            return
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            config, weights = sub / _HYPER_CONFIG, sub / _HYPER_WEIGHTS
            if not (config.is_file() and weights.is_file()):
                continue
            try:
                await self.hypernetworks.upload(
                    sub.name, config_bytes=config.read_bytes(), weights_path=weights, activate=True
                )
                log.info("seeded hypernetwork %s", sub.name)
            except AdapterServeError as exc:
                log.warning("seed hypernetwork %s skipped: %s", sub.name, exc.message)

    def begin_drain(self) -> None:
        """Stop taking new work: /readyz answers 503 and new requests are refused."""
        if not self.draining:
            log.info("adapterserve: draining")
        self.draining = True
        self.ready.clear()
        self.metrics.ready.set(0)

    async def drain(self, timeout: float) -> None:
        """Let admitted requests finish (at most `timeout` seconds), then stop the batcher."""
        self.begin_drain()
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_task(self._drain(timeout))
        await asyncio.shield(self._drained)

    async def _drain(self, timeout: float) -> None:
        if not self.started:
            return
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("drain: %d requests still running after %.1f s", self._active, timeout)
        remaining = max(deadline - time.monotonic(), 0.0)
        await self.batcher.stop(drain=remaining > 0, timeout=remaining)
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()

    async def close(self) -> None:
        """Release the threads; call after drain."""
        if self.started:
            await asyncio.to_thread(self.engine.close)
            sys.setswitchinterval(self._switch_interval)

    # -- admission ------------------------------------------------------------------------------

    def admit(self) -> None:
        """Refuse work while warming up or draining."""
        if self.draining:
            raise Draining("the service is shutting down; retry on another instance")
        if not self.ready.is_set():
            raise NotReady("the service is warming up; retry shortly")

    def enter(self) -> None:
        """Count a request that must finish before the process exits."""
        self.admit()
        self._active += 1
        self._idle.clear()

    def leave(self) -> None:
        """Uncount a finished request."""
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    # -- predict --------------------------------------------------------------------------------

    def knows(self, task: str) -> bool:
        """Whether `task` names a registered task or the backbone itself."""
        return task == self.backbone.spec.name or self.registry.is_registered(task)

    async def models(self) -> list[tuple[str, str | None]]:
        """The backbone and every task with a current version, with what each answers."""
        spec = self.backbone.spec
        out: list[tuple[str, str | None]] = [(spec.name, "generate" if not spec.num_layers else "embed")]
        for name in self.registry.names():
            try:
                _, kind = await self.registry.describe(name)
            except AdapterServeError:  # deleted meanwhile
                continue
            out.append((name, kind))
        return out

    async def predict(
        self,
        task: str,
        inputs: list,
        *,
        all_scores: bool = False,
        max_new_tokens: int | None = None,
        embed: Embed | None = None,
    ) -> Answer:
        """Run one request's inputs on the task's current version (or the backbone alone).

        Inputs are strings, [text_a, text_b] pairs, or token-id lists (used as they are). With `embed`
        the answer of every row is its sentence vector; an embedding task always answers so, pooled
        and normalised as its head says.
        """
        s = self.settings
        if len(inputs) > s.max_inputs:
            raise PayloadTooLarge(f"{len(inputs)} inputs; at most {s.max_inputs} per request")
        for x in inputs:
            if isinstance(x, str):
                texts = (x,)
            elif x and isinstance(x[0], int):
                self._check_ids(x)
                continue
            else:
                texts = x
            if any(len(t) > s.max_input_chars for t in texts):
                raise PayloadTooLarge(f"an input is longer than {s.max_input_chars} characters")
        deadline = time.monotonic() + s.request_timeout_s
        bare = task == self.backbone.spec.name
        lease = None if bare else self.registry.lease(task)
        try:
            if lease is None:
                adapter, version = None, 0
                if embed is not None:
                    pooling = self.backbone.pooling
                    embed = Embed(pooling=pooling.mode, normalize=pooling.normalize)
                elif not self.backbone.generative:
                    raise InvalidRequest(
                        f"{task!r} is the backbone itself: it has no head to predict with; ask it for "
                        "embeddings, or name a task"
                    )
            else:
                version = lease.version
                try:
                    async with asyncio.timeout(s.request_timeout_s):
                        adapter = await self.registry.ready(lease)
                except TimeoutError:
                    self.metrics.rejected.labels(reason="deadline").inc()
                    raise DeadlineExceeded("the adapter did not load before the request's deadline") from None
                head = adapter.head
                if head is not None and head.type == "embedding":
                    embed = Embed(pooling=head.pooling, normalize=head.normalize)
                elif embed is not None:
                    if head is None:
                        raise InvalidRequest(f"task {task!r} generates text; it has no sentence embedding")
                    # A task with a head embeds with its adapter, pooled as its head reads the encoder.
                    embed = Embed(pooling=head.pooling, normalize=True)
            generates = embed is None and (adapter is None or adapter.head is None)
            if generates and any(not isinstance(x, str) for x in inputs):
                raise InvalidRequest("generation takes prompts (strings), not [text_a, text_b] pairs")
            n_new = min(max_new_tokens or s.max_new_tokens, s.max_new_tokens)
            # Room in the queue first: requests waiting for the tokenizer count against it too.
            try:
                self.batcher.reserve(len(inputs))
            except QueueFull as exc:
                # A refusal waits a moment before it is answered: clients that retry at once would
                # otherwise keep the event loop busy answering them, and the forwards, which share its
                # interpreter lock, slowed to a fifth (bench/http.py at 256 connections).
                await self.pause(min(exc.retry_after, s.refusal_pause_ms / 1000))
                raise
            try:
                encoded = await self._encode(
                    inputs, max_tokens=self.backbone.pooling.max_tokens if bare else None
                )
                rows = [
                    Row(
                        task=task,
                        version=version,
                        length=len(e.ids),
                        payload=Work(
                            adapter=adapter,
                            encoded=e,
                            all_scores=all_scores,
                            max_new_tokens=n_new,
                            embed=embed,
                        ),
                    )
                    for e in encoded
                ]
            except BaseException:
                self.batcher.unreserve(len(inputs))
                raise
            results = await self.batcher.submit(rows, deadline=deadline, reserved=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            label = self.metrics.task_label(task, registered=True)
            tokens = sum(len(e.ids) for e in encoded)
            self.metrics.tokens.labels(task=label).inc(tokens)
            return Answer(version=version, outputs=results, tokens=tokens)
        finally:
            if lease is not None:
                self.registry.release(lease)

    def _check_ids(self, ids: list) -> None:
        """Token ids sent in place of text: ints of the vocabulary, within the input limit."""
        vocab = self.backbone.spec.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"token ids must be integers in [0, {vocab})")
        if len(ids) > self.engine.max_input_tokens:
            raise InvalidRequest(f"{len(ids)} tokens; at most {self.engine.max_input_tokens} per input")

    async def _encode(self, inputs: list, *, max_tokens: int | None) -> list[Encoded]:
        """Tokenize the text inputs; token-id inputs pass as they are."""
        texts = [x for x in inputs if isinstance(x, str) or not x or not isinstance(x[0], int)]
        done = iter(await self.engine.tokenize(texts, max_tokens=max_tokens) if texts else [])
        return [
            next(done)
            if isinstance(x, str) or not x or not isinstance(x[0], int)
            else Encoded(ids=list(x), types=None)
            for x in inputs
        ]


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's outputs, all from one adapter version (0: the backbone alone), and its tokens."""

    version: int
    outputs: list
    tokens: int
