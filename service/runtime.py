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
from adapters.generate import Sampling
from adapters.model import BankConfig, MultiTaskModel
from service.auth import KeyRing, load_or_create_admin_key
from service.batcher import Batcher, Row
from service.cache import DeviceSlots
from service.decode import Decoder
from service.engine import Embed, Encoded, Engine, Work
from service.generation import Event, Generation, Generations
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
from store.location import open_store
from store.safetensors_io import SafetensorsLimits

__all__ = ["Answer", "Completion", "Service"]

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
        self._follow_task: asyncio.Task[None] | None = None
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
            open_store, s.store, limits=self.limits, max_store_bytes=s.max_store_bytes
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
            prefetch=s.prefetch,
        )
        self.hypernetworks = Hypernetworks(store=self.store, model=self.model, limits=self.limits)
        self.decoder = Decoder(
            model=self.model,
            limits=self.limits,
            pin_memory=self.backbone.device.type == "cuda",
            hypernetworks=self.hypernetworks,
            device_bytes=s.cache_bytes,
            host_bytes=s.host_cache_bytes,
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
        self.generations: Generations | None = None
        if self.backbone.generative:
            self.generations = Generations(
                engine=self.engine,
                device=self.device_slots,
                metrics=self.metrics,
                max_rows=s.max_batch_size,
                max_tokens_in_flight=s.max_tokens_in_flight,
                eos_token_id=self.backbone.tokenizer.eos_token_id,
            )
            self.generations.start()
        self.started = True
        self._warm_task = asyncio.get_running_loop().create_task(self._warm_up(), name="adapterserve-warmup")
        if s.poll_interval_s > 0:
            self._follow_task = asyncio.get_running_loop().create_task(
                self._follow_store(s.poll_interval_s), name="adapterserve-follow-store"
            )
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
        """Pinned tasks first, then other tasks' current versions while the device budget has room."""
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
                if self.device_slots.bytes + adapter.nbytes > self.device_slots.budget:
                    break  # preloading more would only evict what was just preloaded
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
        if self.generations is not None:
            await self.generations.stop()
        for task in (self._warm_task, self._follow_task):
            if task is not None and not task.done():
                task.cancel()

    async def _follow_store(self, interval: float) -> None:
        """Poll the store for versions other servers made current (a shared S3 store, Ray replicas)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.registry.refresh()
            except AdapterServeError as exc:
                # An outage of the store must not stop the polling: the next round catches up.
                log.warning("could not re-read the store: %s", exc.message)
            except Exception:
                log.exception("could not re-read the store")

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
        raw_scores: bool = False,
        max_new_tokens: int | None = None,
        embed: Embed | None = None,
        normalize: bool | None = None,
        truncate: bool = True,
    ) -> Answer:
        """Run one request's inputs on the task's current version (or the backbone alone).

        Inputs are strings, [text_a, text_b] pairs, or token-id lists (used as they are). With `embed`
        the answer of every row is its sentence vector; an embedding task always answers so, pooled
        and normalised as its head says (`normalize` True or False overrides the norm). `raw_scores`
        adds a classifier's logits by label; `truncate=False` refuses an over-long input with 413.
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
                    norm = pooling.normalize if normalize is None else normalize
                    embed = Embed(pooling=pooling.mode, normalize=norm)
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
                    norm = head.normalize if normalize is None else normalize
                    embed = Embed(pooling=head.pooling, normalize=norm)
                elif embed is not None:
                    if head is None:
                        raise InvalidRequest(f"task {task!r} generates text; it has no sentence embedding")
                    # A task with a head embeds with its adapter, pooled as its head reads the encoder.
                    embed = Embed(pooling=head.pooling, normalize=normalize is not False)
            generates = embed is None and (adapter is None or adapter.head is None)
            if generates and any(not isinstance(x, str) for x in inputs):
                raise InvalidRequest("generation takes prompts (strings), not [text_a, text_b] pairs")
            n_new = min(max_new_tokens or s.max_new_tokens, s.max_new_tokens)
            if generates:
                return await self._generate(
                    task, adapter, version, inputs, max_new_tokens=n_new, truncate=truncate, deadline=deadline
                )
            # Room in the queue first: requests waiting for the tokenizer count against it too.
            try:
                self.batcher.reserve(len(inputs))
            except QueueFull as exc:
                # A refusal waits a moment before it is answered: clients that retry at once would
                # otherwise keep the event loop busy answering them, and the forwards, which share its
                # interpreter lock, slowed to a fifth (bench/http.py at 256 connections).
                await self.pause(min(exc.retry_after, s.refusal_pause_ms / 1000))
                raise
            if adapter is not None:
                # Admitted, so its batch will come: what it prepares is not held for a refused request.
                self.engine.prefetch(adapter)
            try:
                encoded = await self._encode(
                    inputs, max_tokens=self.backbone.pooling.max_tokens if bare else None, truncate=truncate
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
                            raw_scores=raw_scores,
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

    async def _generate(
        self,
        task: str,
        adapter,
        version: int,
        inputs: list,
        *,
        max_new_tokens: int,
        truncate: bool,
        deadline: float,
    ) -> Answer:
        """A predict request's greedy generations, decoded in the loop that serves completions.

        Its rows join the running batch at the next step and leave it when they end, so a long
        generation never holds a short one back; the caller keeps the task's lease until they end.
        """
        encoded = [e.ids for e in await self._encode(inputs, max_tokens=None, truncate=truncate)]
        self._check_budget(encoded, max_new_tokens)
        # the lease stays the caller's: predict releases it once the answer is built
        completion = await self._admit(
            task, adapter, encoded, sampling=Sampling(), max_tokens=max_new_tokens, stop=(), lease=None
        )
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                results = await completion.collect()
        except TimeoutError:
            self.metrics.rejected.labels(reason="deadline").inc()
            raise DeadlineExceeded("the generation did not end before the request's deadline") from None
        finally:
            completion.close()
        return Answer(
            version=version,
            outputs=[{"generated_text": text} for text, _ in results],
            tokens=completion.prompt_tokens,
        )

    async def complete(
        self, task: str, prompts: list[str], *, max_tokens: int, sampling: Sampling, stop: tuple[str, ...]
    ) -> Completion:
        """Admit a completion: every prompt joins the decoding loop; read its events from the answer.

        404 for an unknown task, 400 for a task that does not generate or a prompt and budget over the
        limits (which are named), 429 past the tokens in flight; nothing is queued when any fails.
        """
        s = self.settings
        if self.generations is None:
            raise InvalidRequest(f"the backbone {self.backbone.spec.name!r} does not generate text")
        if len(prompts) > s.max_inputs:
            raise PayloadTooLarge(f"{len(prompts)} prompts; at most {s.max_inputs} per request")
        if max_tokens > s.max_new_tokens:
            raise InvalidRequest(f"max_tokens is {max_tokens}; at most {s.max_new_tokens}")
        if any(len(p) > s.max_input_chars for p in prompts):
            raise PayloadTooLarge(f"a prompt is longer than {s.max_input_chars} characters")
        bare = task == self.backbone.spec.name
        lease = None if bare else self.registry.lease(task)
        try:
            adapter = None
            if lease is not None:
                try:
                    async with asyncio.timeout(s.request_timeout_s):
                        adapter = await self.registry.ready(lease)
                except TimeoutError:
                    self.metrics.rejected.labels(reason="deadline").inc()
                    raise DeadlineExceeded("the adapter did not load before the request's deadline") from None
                if adapter.head is not None:
                    raise InvalidRequest(
                        f"task {task!r} has a {adapter.head.type} head; it does not generate"
                    )
            encoded = await self.engine.tokenize_all(prompts)
            self._check_budget(encoded, max_tokens)
        except BaseException:
            if lease is not None:
                self.registry.release(lease)
            raise
        return await self._admit(
            task, adapter, encoded, sampling=sampling, max_tokens=max_tokens, stop=stop, lease=lease
        )

    async def _admit(
        self,
        task: str,
        adapter,
        encoded: list[list[int]],
        *,
        sampling: Sampling,
        max_tokens: int,
        stop,
        lease,
    ) -> Completion:
        """Put one request's prompts into the decoding loop: a row each, reporting to one events queue.

        Past the tokens in flight it is refused (429) and `lease`, when given, is released.
        """
        assert self.generations is not None
        events: asyncio.Queue[Event] = asyncio.Queue()
        label = self.metrics.task_label(task, registered=True)
        gens = [
            Generation(
                index=i,
                adapter=adapter,
                ids=ids,
                sampling=sampling,
                max_tokens=max_tokens,
                stop=stop,
                events=events,
                task_label=label,
            )
            for i, ids in enumerate(encoded)
        ]
        try:
            self.generations.submit(gens)
        except QueueFull as exc:
            if lease is not None:
                self.registry.release(lease)
            await self.pause(min(exc.retry_after, self.settings.refusal_pause_ms / 1000))
            raise
        self.metrics.tokens.labels(task=label).inc(sum(len(ids) for ids in encoded))
        return Completion(self, gens, events, lease)

    def _check_budget(self, encoded: list[list[int]], max_tokens: int) -> None:
        """A prompt must fit the input limit, and with its budget the decoder's positions."""
        limit = self.engine.max_input_tokens
        positions = self.backbone.spec.max_positions
        for ids in encoded:
            if not ids:
                raise InvalidRequest("a prompt is empty after tokenization; send some text")
            if len(ids) > limit:
                raise InvalidRequest(f"a prompt has {len(ids)} tokens; at most {limit}")
            if self.engine.decoder_only and len(ids) + max_tokens > positions:
                raise InvalidRequest(
                    f"a prompt of {len(ids)} tokens plus max_tokens {max_tokens} exceeds the model's "
                    f"{positions} positions"
                )

    def _check_ids(self, ids: list) -> None:
        """Token ids sent in place of text: ints of the vocabulary, within the input limit."""
        vocab = self.backbone.spec.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"token ids must be integers in [0, {vocab})")
        if len(ids) > self.engine.max_input_tokens:
            raise InvalidRequest(f"{len(ids)} tokens; at most {self.engine.max_input_tokens} per input")

    async def _encode(self, inputs: list, *, max_tokens: int | None, truncate: bool = True) -> list[Encoded]:
        """Tokenize the text inputs; token-id inputs pass as they are."""
        texts = [x for x in inputs if isinstance(x, str) or not x or not isinstance(x[0], int)]
        done = iter(
            await self.engine.tokenize(texts, max_tokens=max_tokens, truncate=truncate) if texts else []
        )
        return [
            next(done)
            if isinstance(x, str) or not x or not isinstance(x[0], int)
            else Encoded(ids=list(x), types=None)
            for x in inputs
        ]


class Completion:
    """An admitted completion: its prompts' generations and the events they report, in order of arrival."""

    def __init__(self, service: Service, gens: list[Generation], events: asyncio.Queue[Event], lease) -> None:
        self.generations = gens
        self.prompt_tokens = sum(len(g.ids) for g in gens)
        self._service = service
        self._events = events
        self._lease = lease
        self._open = len(gens)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, over every prompt."""
        return sum(len(g.tokens) for g in self.generations)

    async def events(self):
        """Every prompt's text as it is generated, then its finish reason; raises the error a row hit."""
        try:
            while self._open:
                event = await self._events.get()
                if event.error is not None:
                    raise event.error
                if event.finish_reason is not None:
                    self._open -= 1
                yield event
        finally:
            self.close()

    async def collect(self) -> list[tuple[str, str]]:
        """Each prompt's whole text and finish reason, in prompt order."""
        texts = [""] * len(self.generations)
        reasons = [""] * len(self.generations)
        async for e in self.events():
            texts[e.index] += e.text
            if e.finish_reason is not None:
                reasons[e.index] = e.finish_reason
        return list(zip(texts, reasons, strict=True))

    def close(self) -> None:
        """Stop every unfinished generation (its row leaves at the next step) and free the task."""
        for g in self.generations:
            if g.finish_reason is None:
                g.cancel()
        if self._lease is not None:
            self._service.registry.release(self._lease)
            self._lease = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's outputs, all from one adapter version (0: the backbone alone), and its tokens."""

    version: int
    outputs: list
    tokens: int
