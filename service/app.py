"""FastAPI app factory and routes: thin calls into the Service, errors mapped in service.errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import orjson
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

from adapters.backbone import Backbone
from service.auth import require_admin, require_inference
from service.disconnect import unless_disconnected
from service.errors import install_handlers, status_of
from service.metrics import CONTENT_TYPE_LATEST
from service.openapi import ADMIN, HEALTH_503, METRICS_200, UPLOAD_BODY, TaskName, Version, errors
from service.runtime import Service
from service.schemas import (
    AdapterDetail,
    AdapterList,
    BackboneInfo,
    HypernetworkList,
    PredictRequest,
    PredictResponse,
    SetCurrent,
    UploadResult,
)
from service.settings import Settings
from service.uploads import read_upload
from store.base import ArtifactStore, validate_name
from store.errors import AdapterServeError

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_ADMIN = [Depends(require_admin)]
_INFER = [Depends(require_inference)]


def _svc(request: Request) -> Service:
    return request.app.state.service


def create_app(
    settings: Settings | None = None, *, backbone: Backbone | None = None, store: ArtifactStore | None = None
) -> FastAPI:
    """Build the app; `backbone` and `store` may be injected (tests use tiny in-process models)."""
    settings = settings or Settings()
    service = Service(settings, backbone=backbone, store=store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        app.state.keys = service.keys
        try:
            yield
        finally:
            await service.drain(settings.drain_timeout_s)
            await service.close()

    app = FastAPI(
        title="adapterserve",
        version="0.1.0",
        summary="One frozen backbone, many hot-swapped adapters, mixed-task batches.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_handlers(app)
    _routes(app)
    return app


def _routes(app: FastAPI) -> None:
    # -- health ---------------------------------------------------------------------------------

    @app.get("/livez", tags=["health"])
    async def livez() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses=HEALTH_503)
    async def readyz(request: Request) -> JSONResponse:
        """200 once warmed up; 503 before that and while draining."""
        svc = _svc(request)
        if svc.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        if not svc.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], response_class=Response, responses=METRICS_200)
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        return Response(_svc(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- inference ------------------------------------------------------------------------------

    @app.post(
        "/v1/tasks/{task}/predict",
        tags=["inference"],
        dependencies=_INFER,
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=errors(400, 401, 404, 413, 422, 429, 503, 504),
    )
    async def predict(task: TaskName, body: PredictRequest, request: Request) -> Response:
        """Run the task's current adapter over the inputs."""
        svc = _svc(request)
        started = time.perf_counter()
        registered = svc.started and svc.registry.is_registered(task)
        label = svc.metrics.task_label(task, registered=registered)
        status = 500
        svc.metrics.requests_in_flight.inc()
        try:
            svc.enter()
            try:
                version, outputs = await unless_disconnected(
                    request,
                    svc.predict(
                        task,
                        list(body.inputs),
                        all_scores=body.parameters.return_all_scores,
                        max_new_tokens=body.parameters.max_new_tokens,
                    ),
                )
            finally:
                svc.leave()
            status = 200
        except AdapterServeError as exc:
            status = status_of(exc)
            raise
        finally:
            svc.metrics.requests_in_flight.dec()
            svc.metrics.requests.labels(task=label, status=str(status)).inc()
            svc.metrics.request_duration.labels(task=label).observe(time.perf_counter() - started)
        # The outputs are the engine's own dicts (only the fields the head gives): encoding them directly
        # skips a validation and serialization pass of the response model per request.
        return Response(
            orjson.dumps({"task": task, "version": version, "outputs": outputs}),
            media_type="application/json",
            headers={"X-Adapter-Version": str(version)},
        )

    @app.get("/v1/backbone", tags=["inference"], dependencies=_INFER, responses=errors(401))
    async def backbone(request: Request) -> BackboneInfo:
        """The loaded backbone: architecture, sizes, fingerprint, device."""
        svc = _svc(request)
        spec = svc.backbone.spec
        return BackboneInfo(
            name=spec.name,
            architecture=spec.family,
            model_type=spec.model_type,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_decoder_layers=spec.num_decoder_layers,
            num_heads=spec.num_heads,
            fingerprint=spec.fingerprint,
            generative=svc.backbone.generative,
            device=str(svc.backbone.device),
            dtype=str(svc.backbone.dtype).removeprefix("torch."),
            slots=svc.model.num_slots,
        )

    # -- management -----------------------------------------------------------------------------

    @app.post(
        "/v1/adapters/{task}",
        status_code=201,
        tags=["adapters"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 409, 413, 415, 422, 503, 507),
        openapi_extra=UPLOAD_BODY,
    )
    async def upload(
        task: TaskName,
        request: Request,
        activate: bool = Query(default=True),
        version: Version = None,
    ) -> UploadResult:
        """Upload a version (multipart: `config` JSON, `weights` safetensors); current unless activate=false."""
        svc = _svc(request)
        info, adapter, current = await _counted_upload(
            svc,
            request,
            name=task,
            store=lambda config, weights: svc.registry.upload(
                task, config_bytes=config, weights_path=weights, activate=activate, version=version
            ),
        )
        return UploadResult(
            task=task,
            version=info.version,
            sha256=info.sha256,
            method=adapter.method,
            num_parameters=adapter.num_parameters,
            size_bytes=info.size_bytes,
            current=current,
        )

    @app.get("/v1/adapters", tags=["adapters"], dependencies=_ADMIN, responses=errors(*ADMIN, 503))
    async def list_adapters(request: Request) -> AdapterList:
        """Every task with its current version."""
        return AdapterList(adapters=_svc(request).registry.summary())

    @app.get(
        "/v1/adapters/{task}", tags=["adapters"], dependencies=_ADMIN, responses=errors(400, *ADMIN, 404, 503)
    )
    async def get_adapter(task: TaskName, request: Request) -> AdapterDetail:
        """A task's versions, current version and residency."""
        return AdapterDetail(**await _svc(request).registry.detail(task))

    @app.put(
        "/v1/adapters/{task}/current",
        tags=["adapters"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 404, 409, 422, 503, 507),
    )
    async def set_current(task: TaskName, body: SetCurrent, request: Request) -> AdapterDetail:
        """Roll forward or back to a stored version (loaded before it serves)."""
        svc = _svc(request)
        svc.admit()
        await svc.registry.set_current(task, body.version)
        return AdapterDetail(**await svc.registry.detail(task))

    @app.put(
        "/v1/adapters/{task}/pin",
        tags=["adapters"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 404, 422, 503),
    )
    async def pin(task: TaskName, request: Request, pinned: bool = Query(default=True)) -> AdapterDetail:
        """Keep (or stop keeping) the task's current version resident on the device."""
        svc = _svc(request)
        await svc.registry.set_pinned(task, pinned)
        return AdapterDetail(**await svc.registry.detail(task))

    @app.delete(
        "/v1/adapters/{task}",
        status_code=204,
        tags=["adapters"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 404, 503),
    )
    async def delete_adapter(task: TaskName, request: Request) -> Response:
        """Remove a task; requests already admitted finish."""
        await _svc(request).registry.delete(task)
        return Response(status_code=204)

    @app.delete(
        "/v1/adapters/{task}/versions/{version}",
        status_code=204,
        tags=["adapters"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 404, 409, 422, 503),
    )
    async def delete_version(task: TaskName, version: int, request: Request) -> Response:
        """Remove one version that is not current."""
        await _svc(request).registry.delete_version(task, version)
        return Response(status_code=204)

    # -- hypernetworks --------------------------------------------------------------------------

    @app.post(
        "/v1/hypernetworks/{name}",
        status_code=201,
        tags=["hypernetworks"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 409, 413, 415, 422, 503, 507),
        openapi_extra=UPLOAD_BODY,
    )
    async def upload_hypernetwork(
        name: TaskName,
        request: Request,
        activate: bool = Query(default=True),
        version: Version = None,
    ) -> UploadResult:
        """Upload a shared hypernetwork version (multipart: `config` JSON, `weights` safetensors)."""
        svc = _svc(request)
        info, config, params, current = await _counted_upload(
            svc,
            request,
            name=name,
            store=lambda config, weights: svc.hypernetworks.upload(
                name, config_bytes=config, weights_path=weights, activate=activate, version=version
            ),
        )
        return UploadResult(
            task=name,
            version=info.version,
            sha256=info.sha256,
            method=config.method,
            num_parameters=params,
            size_bytes=info.size_bytes,
            current=current,
        )

    @app.delete(
        "/v1/hypernetworks/{name}",
        status_code=204,
        tags=["hypernetworks"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 404, 409, 503),
    )
    async def delete_hypernetwork(name: TaskName, request: Request) -> Response:
        """Remove a hypernetwork and all its versions; 409 while any stored task version names it."""
        await _svc(request).hypernetworks.delete(name)
        return Response(status_code=204)

    @app.delete(
        "/v1/hypernetworks/{name}/versions/{version}",
        status_code=204,
        tags=["hypernetworks"],
        dependencies=_ADMIN,
        responses=errors(400, *ADMIN, 404, 409, 422, 503),
    )
    async def delete_hypernetwork_version(name: TaskName, version: int, request: Request) -> Response:
        """Remove one version that is not current (tasks generate from the current one)."""
        await _svc(request).hypernetworks.delete_version(name, version)
        return Response(status_code=204)

    @app.get("/v1/hypernetworks", tags=["hypernetworks"], dependencies=_ADMIN, responses=errors(*ADMIN, 503))
    async def list_hypernetworks(request: Request) -> HypernetworkList:
        """Every shared hypernetwork with its current version."""
        entries = await asyncio.to_thread(_svc(request).hypernetworks.summary)
        return HypernetworkList(hypernetworks=entries)


async def _counted_upload(
    svc: Service,
    request: Request,
    *,
    name: str,
    store: Callable[[bytes, Path], Awaitable[_T]],
) -> _T:
    """Read a multipart upload into `store(config, weights_path)`, counting the outcome in the uploads metric.

    Adapter and hypernetwork uploads share this so both admit, clean up their temporary file and
    label `uploads` the same way.
    """
    result = "error"
    try:
        validate_name(name)
        svc.enter()
        try:
            up = await read_upload(
                request, max_bytes=svc.settings.max_upload_bytes, tmp_dir=svc.settings.upload_tmp_dir
            )
            try:
                stored = await store(up.config, up.weights_path)
            finally:
                up.remove()
        finally:
            svc.leave()
        result = "ok"
    except AdapterServeError as exc:
        result = _snake_result(exc)
        raise
    finally:
        svc.metrics.uploads.labels(result=result).inc()
    return stored


def _snake_result(exc: AdapterServeError) -> str:
    return {
        400: "invalid_request",
        413: "too_large",
        415: "unsupported_media_type",
        422: "invalid_artifact",
        409: "conflict",
        507: "store_full",
        501: "not_implemented",
    }.get(status_of(exc), "error")
