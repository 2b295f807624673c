"""Our own surface: predict, adapter and hypernetwork management, backbone, health and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from service.errors import status_of
from service.metrics import CONTENT_TYPE_LATEST
from service.openapi import (
    ADMIN,
    HEALTH_503,
    METRICS_200,
    UPLOAD_BODY,
    TaskName,
    Version,
    VersionNumber,
    errors,
)
from service.routes.common import ADMIN_KEY, INFERENCE_KEY, counted, orjson_response, service_of
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
from service.uploads import read_upload
from store.base import validate_name
from store.errors import AdapterServeError

__all__ = ["router"]

_T = TypeVar("_T")

router = APIRouter()

# -- health ---------------------------------------------------------------------------------


@router.get("/livez", tags=["health"])
async def livez() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses=HEALTH_503)
async def readyz(request: Request) -> JSONResponse:
    """200 once warmed up; 503 before that and while draining."""
    svc = service_of(request)
    if svc.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
    if not svc.ready.is_set():
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready"})


@router.get("/metrics", tags=["health"], response_class=Response, responses=METRICS_200)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- inference ------------------------------------------------------------------------------


@router.post(
    "/v1/tasks/{task}/predict",
    tags=["inference"],
    dependencies=INFERENCE_KEY,
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=errors(400, 401, 404, 413, 422, 429, 503, 504),
)
async def predict(task: TaskName, body: PredictRequest, request: Request) -> Response:
    """Run the task's current adapter over the inputs."""
    answer = await counted(
        request,
        task,
        lambda svc: svc.predict(
            task,
            list(body.inputs),
            all_scores=body.parameters.return_all_scores,
            max_new_tokens=body.parameters.max_new_tokens,
        ),
    )
    # The outputs are the engine's own dicts (only the fields the head gives): encoding them directly
    # skips a validation and serialization pass of the response model per request.
    return orjson_response(
        {"task": task, "version": answer.version, "outputs": answer.outputs},
        headers={"X-Adapter-Version": str(answer.version)},
    )


@router.get("/v1/backbone", tags=["inference"], dependencies=INFERENCE_KEY, responses=errors(401))
async def backbone(request: Request) -> BackboneInfo:
    """The loaded backbone: architecture, sizes, fingerprint, device."""
    svc = service_of(request)
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


@router.post(
    "/v1/adapters/{task}",
    status_code=201,
    tags=["adapters"],
    dependencies=ADMIN_KEY,
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
    svc = service_of(request)
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


@router.get("/v1/adapters", tags=["adapters"], dependencies=ADMIN_KEY, responses=errors(*ADMIN, 503))
async def list_adapters(request: Request) -> AdapterList:
    """Every task with its current version."""
    return AdapterList(adapters=service_of(request).registry.summary())


@router.get(
    "/v1/adapters/{task}", tags=["adapters"], dependencies=ADMIN_KEY, responses=errors(400, *ADMIN, 404, 503)
)
async def get_adapter(task: TaskName, request: Request) -> AdapterDetail:
    """A task's versions, current version and residency."""
    return AdapterDetail(**await service_of(request).registry.detail(task))


@router.put(
    "/v1/adapters/{task}/current",
    tags=["adapters"],
    dependencies=ADMIN_KEY,
    responses=errors(400, *ADMIN, 404, 409, 422, 503, 507),
)
async def set_current(task: TaskName, body: SetCurrent, request: Request) -> AdapterDetail:
    """Roll forward or back to a stored version (loaded before it serves)."""
    svc = service_of(request)
    svc.admit()
    await svc.registry.set_current(task, body.version)
    return AdapterDetail(**await svc.registry.detail(task))


@router.put(
    "/v1/adapters/{task}/pin",
    tags=["adapters"],
    dependencies=ADMIN_KEY,
    responses=errors(400, *ADMIN, 404, 422, 503),
)
async def pin(task: TaskName, request: Request, pinned: bool = Query(default=True)) -> AdapterDetail:
    """Keep (or stop keeping) the task's current version resident on the device."""
    svc = service_of(request)
    await svc.registry.set_pinned(task, pinned)
    return AdapterDetail(**await svc.registry.detail(task))


@router.delete(
    "/v1/adapters/{task}",
    status_code=204,
    tags=["adapters"],
    dependencies=ADMIN_KEY,
    responses=errors(400, *ADMIN, 404, 503),
)
async def delete_adapter(task: TaskName, request: Request) -> Response:
    """Remove a task; requests already admitted finish."""
    await service_of(request).registry.delete(task)
    return Response(status_code=204)


@router.delete(
    "/v1/adapters/{task}/versions/{version}",
    status_code=204,
    tags=["adapters"],
    dependencies=ADMIN_KEY,
    responses=errors(400, *ADMIN, 404, 409, 422, 503),
)
async def delete_version(task: TaskName, version: VersionNumber, request: Request) -> Response:
    """Remove one version that is not current."""
    await service_of(request).registry.delete_version(task, version)
    return Response(status_code=204)


# -- hypernetworks --------------------------------------------------------------------------


@router.post(
    "/v1/hypernetworks/{name}",
    status_code=201,
    tags=["hypernetworks"],
    dependencies=ADMIN_KEY,
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
    svc = service_of(request)
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


@router.delete(
    "/v1/hypernetworks/{name}",
    status_code=204,
    tags=["hypernetworks"],
    dependencies=ADMIN_KEY,
    responses=errors(400, *ADMIN, 404, 409, 503),
)
async def delete_hypernetwork(name: TaskName, request: Request) -> Response:
    """Remove a hypernetwork and all its versions; 409 while any stored task version names it."""
    await service_of(request).hypernetworks.delete(name)
    return Response(status_code=204)


@router.delete(
    "/v1/hypernetworks/{name}/versions/{version}",
    status_code=204,
    tags=["hypernetworks"],
    dependencies=ADMIN_KEY,
    responses=errors(400, *ADMIN, 404, 409, 422, 503),
)
async def delete_hypernetwork_version(name: TaskName, version: VersionNumber, request: Request) -> Response:
    """Remove one version that is not current (tasks generate from the current one)."""
    await service_of(request).hypernetworks.delete_version(name, version)
    return Response(status_code=204)


@router.get(
    "/v1/hypernetworks", tags=["hypernetworks"], dependencies=ADMIN_KEY, responses=errors(*ADMIN, 503)
)
async def list_hypernetworks(request: Request) -> HypernetworkList:
    """Every shared hypernetwork with its current version."""
    entries = await asyncio.to_thread(service_of(request).hypernetworks.summary)
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
