"""``/healthz`` (the process answers, and a Triton server it started is not down for too long),
``/readyz`` (the backend can serve), ``/metrics`` (Prometheus).

None of these needs an API key: they are for load balancers, orchestrators and scrapers. Put
the API behind a proxy that does not expose them publicly if that matters.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from diffserve.api.deps import StateDep
from diffserve.api.metrics import CONTENT_TYPE_LATEST
from diffserve.api.schemas import Health, Readiness

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

READY_TIMEOUT_S = 10.0


@router.get("/healthz", response_model=Health, summary="Liveness: 503 when a Triton server this process started "
            "has been down longer than triton_unhealthy_after_s",
            responses={503: {"model": Health, "description": "Unhealthy: restart this process"}})
async def healthz(state: StateDep) -> JSONResponse:
    # Only a backend that owns its Triton server has this hook: a server someone else runs
    # (--triton-url) going down is a readiness matter, restarting this process would not help.
    liveness_problem = getattr(state.backend, "liveness_problem", None)
    reason = liveness_problem() if liveness_problem is not None else None
    if reason is not None:
        return JSONResponse(Health(status="unhealthy", reason=reason).model_dump(), status_code=503)
    return JSONResponse(Health(status="ok").model_dump(exclude_none=True))


@router.get("/readyz", response_model=Readiness, summary="Readiness: 200 when every served model is ready, else 503",
            responses={503: {"model": Readiness, "description": "Not ready"}})
async def readyz(state: StateDep) -> JSONResponse:
    models = sorted(state.backend.slugs)
    if state.role == "api":  # an api replica's models are those its workers announce
        try:
            models = await asyncio.to_thread(state.served_slugs)
        except Exception:  # noqa: BLE001 - Redis down: reported by the "redis" entry below
            models = []
    try:
        status = await asyncio.wait_for(state.backend.ready(), READY_TIMEOUT_S)
        error = None
    except Exception as exc:  # noqa: BLE001 - any failure to answer means "not ready"
        logger.warning("backend readiness check failed: %s", exc)
        status, error = {"server": False}, f"backend readiness check failed: {type(exc).__name__}"
    ready = bool(status.get("server")) and all(status.get(slug, False) for slug in models)
    # The job store: without it nothing can be queued or read.
    try:
        await asyncio.wait_for(asyncio.to_thread(state.store.ping), READY_TIMEOUT_S)
        status[state.store.name] = True
    except Exception as exc:  # noqa: BLE001 - unreachable, loading, read-only or closed: not ready
        logger.warning("job store (%s) readiness check failed: %s", state.store.name, exc)
        status[state.store.name] = False
        ready = False
    body = Readiness(ready=ready, backend=status, models=models, error=error,
                     unavailable=getattr(state.backend, "unavailable", None) or None)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
