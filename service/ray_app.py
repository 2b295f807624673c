"""The adapterserve API as a Ray Serve application: many engine replicas, task-affine routing, one store.

Two deployments:

- ``Ingress`` (FastAPI, no model): reads which task a request is for (the path of the native and v2
  routes, the ``model`` field of the OpenAI and TEI ones) and forwards the request, as it came, to the
  engine deployment with that task as the *multiplexed model id*. Ray Serve's router sends a model id
  to a replica that already has it loaded, so a task's requests land where it is resident; our router
  (service/ray_router.py) also gives each task a home replica, so tasks not yet loaded anywhere are
  split between the replicas instead of being loaded on all of them.
  Management requests (uploads, deletes) carry no model id and go to any replica.
- ``Engine``: each replica runs the whole adapterserve service in process (backbone, slot banks,
  batcher, registry) and answers through the same FastAPI app as the single server, so every route,
  status code and error body is the same. Uploads go to the shared store (``s3://...`` or a shared
  directory); every replica follows the store's current pointers (``ADAPTERSERVE_STORE_POLL_S``).

The multiplexed cache is the replica's own device-slot cache: Ray's per-replica model limit is the slot
count, a model is "loaded" by loading the task's current version, and Ray's eviction evicts the
task's slots, so there is one LRU, not two competing ones.

Metrics: each replica pushes its Prometheus text to a small named actor every second; the ingress's
``/metrics`` serves them merged, every sample labelled ``replica``. Ray's own metrics stay on.
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI views need real annotations.
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request, Response
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray import serve

from service.errors import protocol_body
from service.ray_router import LOAD_BOUND, WAIT_S

__all__ = ["Engine", "Ingress", "RaySettings", "build_app", "merge_metrics", "run", "task_of"]

log = logging.getLogger(__name__)

_BOARD = "adapterserve-metrics"
_NAMESPACE = "adapterserve"
_TASK_PATH = re.compile(r"/v1/tasks/([^/]+)/|/v2/models/([^/]+)(?:/|$)")
_MODEL_ROUTES = {"/v1/completions", "/v1/embeddings", "/embed", "/predict", "/rerank", "/tokenize", "/decode"}
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}
# Forwarded to the replicas, which start in fresh worker processes.
_ENV_PREFIXES = ("ADAPTERSERVE_", "AWS_", "HF_", "TRANSFORMERS_")


class RaySettings(BaseSettings):
    """How the Ray Serve application scales; each field is the env var `ADAPTERSERVE_RAY_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="ADAPTERSERVE_RAY_", extra="ignore")

    replicas: int = Field(
        default=2, ge=1, le=1024, description="Engine replicas (the minimum when autoscaling)."
    )
    max_replicas: int | None = Field(
        default=None, ge=1, le=1024, description="Autoscale up to this many replicas; empty: a fixed count."
    )
    target_ongoing_requests: float = Field(
        default=16.0, gt=0, description="Autoscaling target of requests in flight per replica."
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests one replica takes at once before Ray queues them."
    )
    gpus_per_replica: float = Field(default=0.0, ge=0, description="GPUs reserved per replica (0: CPU).")
    cpus_per_replica: float = Field(default=1.0, gt=0, description="CPUs reserved per replica.")
    routing: Literal["affinity", "ray"] = Field(
        default="affinity",
        description=(
            "affinity: each task has a home replica by rendezvous hashing (service/ray_router.py), so the "
            "replicas hold different tasks; ray: Ray Serve's default multiplexed routing."
        ),
    )
    affinity_wait_s: float = Field(
        default=WAIT_S,
        ge=0,
        description=(
            "With affinity routing: how long a request waits for its task's home replica (or one that has "
            "the task loaded) to accept it before any other replica may take it."
        ),
    )
    affinity_load_bound: float = Field(
        default=LOAD_BOUND,
        ge=1.0,
        description=(
            "With affinity routing: a task's home (and the replicas that have it loaded) may carry this "
            "many times the mean requests in flight, plus one, before the other replicas share its load."
        ),
    )
    access_log: bool = Field(
        default=False,
        description=(
            "Ray Serve's access log: a line per request from the proxy, the ingress and the replica "
            "(shipped to the driver by Ray's log monitor, several ms of CPU per request)."
        ),
    )
    slots: int = Field(
        default_factory=lambda: int(os.environ.get("ADAPTERSERVE_SLOTS", "16")),
        ge=2,
        description="Device slots per replica (ADAPTERSERVE_SLOTS): Ray's multiplexed-model limit is one less.",
    )


def task_of(method: str, path: str, body: bytes) -> str | None:
    """The task a request is for (the multiplexed model id), or None for management and health routes."""
    match = _TASK_PATH.match(path)
    if match:
        return match.group(1) or match.group(2)
    if method == "POST" and path in _MODEL_ROUTES and body[:1] == b"{":
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return None
        return model if isinstance(model, str) and 0 < len(model) <= 200 else None
    return None


# -- metrics ------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?(\s.+)$")


def _label(line: str, replica: str) -> str:
    match = _SAMPLE.match(line)
    if match is None:
        return line
    name, _, labels, rest = match.groups()
    extra = f'replica="{replica}"'
    return f"{name}{{{extra},{labels}}}{rest}" if labels else f"{name}{{{extra}}}{rest}"


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one exposition: families merged, samples labelled by replica."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for replica, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                headers, _ = families.setdefault(family, ([], []))
                if line not in headers:
                    headers.append(line)
            elif line and not line.startswith("#") and family is not None:
                families[family][1].append(_label(line, replica))
    out = []
    for headers, samples in families.values():
        out += headers + samples
    return "\n".join(out) + "\n"


class MetricsBoard:
    """A named actor holding the latest metrics text of every replica."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def put(self, replica: str, text: str) -> None:
        """Record a replica's latest exposition."""
        self.texts[replica] = text

    def drop(self, replica: str) -> None:
        """Forget a replica that stopped."""
        self.texts.pop(replica, None)

    def get(self) -> dict[str, str]:
        """Every replica's latest exposition."""
        return dict(self.texts)


def _board() -> Any:
    import ray

    return (
        ray.remote(num_cpus=0)(MetricsBoard)
        .options(name=_BOARD, namespace=_NAMESPACE, get_if_exists=True, lifetime="detached")
        .remote()
    )


# -- the engine replica -------------------------------------------------------------------------------


class _Resident:
    """What Ray's multiplexed cache holds for a task; dropping it evicts the task's device slots."""

    def __init__(self, service: Any, task: str, loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.task, self._loop = service, task, loop

    def __del__(self) -> None:
        # Ray calls this (in a thread) when its LRU drops the task; garbage collection may call it too.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._evict()))

    async def _evict(self) -> None:
        registry, device = self.service.registry, self.service.device_slots
        try:
            state = registry.state(self.task)
        except Exception:
            return
        keys = [state.key(v) for v in device.versions(self.task, state.uid)]
        pinned = registry.is_pinned(self.task)
        if keys and not pinned:
            await self.service.engine.call(device.evict_where, keys)


_SLOTS = RaySettings().slots


@serve.deployment(name="Engine")
class Engine:
    """One replica: the whole adapterserve service, answering forwarded requests through its own app."""

    async def __init__(self, env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})
        from service.app import create_app
        from service.settings import Settings

        settings = Settings()
        logging.basicConfig(level=settings.log_level.upper())
        # The in-process client's line per forwarded request is noise here (Ray's access log has it).
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.app = create_app(settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.service = self.app.state.service
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://replica", timeout=None
        )
        context = serve.get_replica_context()
        replica_id = getattr(context, "replica_id", None)
        self.replica = str(
            getattr(replica_id, "unique_id", None) or getattr(context, "replica_tag", "replica")
        )
        self._board = _board()
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                text = (await self.client.get("/metrics")).text
                await self._board.put.remote(self.replica, text)
            await asyncio.sleep(1.0)

    @serve.multiplexed(max_num_models_per_replica=max(_SLOTS - 1, 1))
    async def resident(self, task: str) -> _Resident:
        """Load a task's current version here (best effort: an unknown task answers 404 on its request)."""
        registry = self.service.registry
        with contextlib.suppress(Exception):
            if registry.is_registered(task):
                lease = registry.lease(task)
                try:
                    await registry.ready(lease)
                finally:
                    registry.release(lease)
        return _Resident(self.service, task, asyncio.get_running_loop())

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one forwarded HTTP request through this replica's app."""
        task = serve.get_multiplexed_model_id()
        if task:
            await self.resident(task)
        response = await self.client.request(
            request["method"],
            request["path"],
            params=request["query"],
            headers=request["headers"],
            content=request["body"],
        )
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _HOP_HEADERS]
        return {
            "status": response.status_code,
            "headers": [*headers, ("x-adapterserve-replica", self.replica)],
            "body": response.content,
        }

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._pusher.cancel()
            await self._board.drop.remote(self.replica)
            await self._lifespan.__aexit__(None, None, None)


# -- the ingress --------------------------------------------------------------------------------------

ingress_app = FastAPI(title="adapterserve on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="Ingress")
@serve.ingress(ingress_app)
class Ingress:
    """Forwards every request to the engine replicas, with the task as the multiplexed model id."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._board = _board()

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        """Every replica's metrics, labelled `replica`."""
        texts = await self._board.get.remote()
        return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
    async def forward(self, request: Request, path: str) -> Response:
        """Send the request, as it came, to a replica chosen by Ray's multiplexed routing."""
        body = await request.body()
        task = task_of(request.method, request.url.path, body)
        from ray.exceptions import RayActorError

        handle = self.engine.options(multiplexed_model_id=task) if task else self.engine
        payload = {
            "method": request.method,
            "path": request.url.path,
            "query": list(request.query_params.multi_items()),
            "headers": [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS],
            "body": body,
        }
        # Requests for a task change nothing, so one that lost its replica (killed, or gone mid-load)
        # runs again on another; a management request may already have been applied: say so.
        for attempt in range(2 if task else 1):
            try:
                out = await handle.remote(payload)
                break
            except RayActorError:
                log.warning("a replica stopped during %s %s (attempt %d)", request.method, path, attempt + 1)
        else:
            message = (
                "the replica serving this request stopped; retry it"
                if task
                else "the replica handling this request stopped; check whether it was applied, then retry"
            )
            body_ = protocol_body(request.url.path, "replica_unavailable", message, 503)
            return Response(
                json.dumps(body_),
                status_code=503,
                media_type="application/json",
                headers={"Retry-After": "1"},
            )
        response = Response(content=out["body"], status_code=out["status"])
        for key, value in out["headers"]:
            response.headers.append(key, value)
        return response


def build_app(ray_settings: RaySettings | None = None, *, env: dict[str, str] | None = None) -> Any:
    """The Ray Serve application (for `serve.run`, `serve run deploy.ray_serve:app` or `serve deploy`)."""
    rs = ray_settings or RaySettings()
    env = env if env is not None else {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
    # Every replica polls the shared store, so an upload through one is served by all.
    env.setdefault("ADAPTERSERVE_STORE_POLL_S", "2")
    logging_config = _logging_config(rs)
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": rs.cpus_per_replica,
            "num_gpus": rs.gpus_per_replica,
            # In the worker's environment before this module is imported there: the multiplexed
            # limit is read at import (ADAPTERSERVE_SLOTS), and the settings at start.
            "runtime_env": {"env_vars": {**env, "PYTHONPATH": _pythonpath()}},
        },
        "max_ongoing_requests": rs.max_ongoing_requests,
        "logging_config": logging_config,
    }
    if rs.routing == "affinity":
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="service.ray_router:TaskAffinityRouter",
            request_router_kwargs={"wait_s": rs.affinity_wait_s, "bound": rs.affinity_load_bound},
        )
    if rs.max_replicas is not None and rs.max_replicas > rs.replicas:
        options["autoscaling_config"] = {
            "min_replicas": rs.replicas,
            "max_replicas": rs.max_replicas,
            "target_ongoing_requests": rs.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = rs.replicas
    engine = Engine.options(**options).bind(env)
    # Ray's default of 5 requests in flight per replica would make the one ingress the bottleneck: it
    # takes as many as all the engine replicas together, which is where overload is answered.
    ingress_ongoing = rs.max_ongoing_requests * max(rs.replicas, rs.max_replicas or 0)
    return Ingress.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=ingress_ongoing,
        logging_config=logging_config,
    ).bind(engine)


def _logging_config(rs: RaySettings) -> dict[str, Any]:
    """Ray Serve's logging for our deployments and proxy: our log level, its access log only on request."""
    from service.settings import Settings

    return {"log_level": Settings().log_level.upper(), "enable_access_log": rs.access_log}


def _pythonpath() -> str:
    """This checkout first, so workers import the same code as the driver."""
    repo = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))


def run(*, replicas: int, host: str, port: int) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy the application and serve until a signal."""
    import ray

    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None, runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}}
    )
    settings = RaySettings(replicas=replicas) if replicas else RaySettings()
    serve.start(http_options={"host": host, "port": port}, logging_config=_logging_config(settings))
    serve.run(build_app(settings), name="adapterserve", route_prefix="/")
    log.info("adapterserve on Ray Serve: %d replicas at http://%s:%d", settings.replicas, host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
