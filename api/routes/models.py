"""``POST /v1/{slug}`` (sync: the image in the response) and ``POST /v2/{slug}`` (async submit).

Both validate against the catalog, check credits, fetch and decode image inputs before anything
is queued (a bad image is a 400 at once), and submit a job to the runner; ``/v1`` then awaits
that job, so both share one queue and one concurrency bound. ``/v2`` also takes an
``Idempotency-Key`` (``diffserve.api.idempotency``: a retry gets the original request id, no second job)
and a ``webhook`` field (``diffserve.api.webhooks``: vetted here, recorded in the outbox with the job).

``generation_router(slugs)`` gives every served slug its own two operations (``POST
/v1/sd1.5-scifi`` with that slug's request schema from the catalog, and the same for ``/v2``),
so schema-driven clients see which body goes with which model. Behind them a ``/v{1,2}/{slug}``
route, left out of the schema, answers every other slug with the same checks (404 naming the
served models, 403 for a key not allowed the model). Every one of these routes is labelled
``/v1/{slug}`` or ``/v2/{slug}`` in the metrics, with the slug as its own label.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from diffserve.api import idempotency, webhooks
from diffserve.api.deps import AppState, Caller, JsonBodyDep, ServedModelDep, StateDep, SubmitterDep, served_model
from diffserve.api.errors import ApiError
from diffserve.api.images import ImageInputError, load_image
from diffserve.api.jobs import Job, JobStatus
from diffserve.api.quotas import InsufficientCredits
from diffserve.api.runner import ClientGone, JobOutcome, QueueFull, Submission, SyncTimeout
from diffserve.api.schemas import Base64ImageResponse, ErrorResponse, SubmitResponse, request_body_openapi
from diffserve.api.urls import output_urls, result_url, status_url
from diffserve.engine.catalog import ModelSpec, ValidationError, get_model
from diffserve.engine.imageio import CONTENT_TYPES

_ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "Invalid parameters, body or image input", 401: "Missing or invalid API key",
    403: "Key not allowed to use this model", 404: "Unknown or unserved model", 406: "Insufficient credits",
    413: "Request body too large", 429: "Rate limited or queue full (see Retry-After)",
}.items()}
_ASYNC_RESPONSES = {
    **_ERRORS,
    409: {"model": ErrorResponse, "description": "A request with this Idempotency-Key is still being submitted"},
    422: {"model": ErrorResponse, "description": "This Idempotency-Key was used for a different body"},
}
_SYNC_RESPONSES = {
    200: {"description": "The image (image/jpeg, image/png or image/webp), or JSON with base64 when base64=true",
          "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {},
                      "application/json": {"schema": Base64ImageResponse.model_json_schema()}}},
    **_ERRORS,
    502: {"model": ErrorResponse, "description": "Backend unavailable"},
    504: {"model": ErrorResponse, "description": "Timed out (the request is cancelled)"},
}


async def _prepare(spec: ModelSpec, payload: dict, caller: Caller, state: AppState, *, sync: bool) -> Submission:
    try:
        params = spec.validate(payload)
    except ValidationError as exc:
        raise ApiError(400, f"invalid parameters for {spec.slug}: " + "; ".join(exc.errors)) from None
    # Cheap early refusal before fetching images; the runner's reservation is the binding check.
    remaining = await asyncio.to_thread(state.ledger.remaining, caller.owner)
    cost = spec.image_count(params)
    if remaining is not None and remaining < cost:
        raise ApiError(406, str(InsufficientCredits(remaining, cost)))
    names = [name for name in spec.image_params if params.get(name) is not None]
    try:
        loaded = await asyncio.gather(*(load_image(params[name], name, state.image_policy) for name in names))
    except ImageInputError as exc:
        raise ApiError(400, str(exc)) from None
    images = {name: None for name in spec.image_params} | dict(zip(names, loaded, strict=True))
    return Submission(
        slug=spec.slug,
        params=params,
        images=images,
        owner=caller.owner,
        output_format=params.get("image_format") or spec.output_format,
        want_base64=bool(params.get("base64")),
        sync=sync,
        priority=caller.priority,
    )


async def _submit(state: AppState, submission: Submission) -> Job:
    try:
        return await state.runner.submit(submission)
    except QueueFull as exc:
        raise ApiError(429, str(exc), {"Retry-After": "5"}) from None
    except InsufficientCredits as exc:
        raise ApiError(406, str(exc)) from None


async def run_sync(request: Request, state: AppState, submission: Submission) -> JobOutcome:
    """Submit a prepared ``/v1`` job and await its COMPLETED outcome (also the OpenAI dialect's path).

    Raises ``ApiError`` 504 on the sync timeout and the job's own status when it FAILED (both
    carry ``X-Request-Id``); ``ClientGone`` when the client disconnected (its job is cancelled).
    """
    job = await _submit(state, submission)
    request.state.request_id = job.id
    id_header = {"X-Request-Id": job.id}
    try:
        outcome = await state.runner.wait(job.id, state.settings.sync_timeout_s, request.is_disconnected)
    except SyncTimeout as exc:
        raise ApiError(504, f"timed out: {exc}; it was cancelled", id_header) from None
    done = outcome.job
    if done.status is not JobStatus.COMPLETED:
        raise ApiError(outcome.status_code or 500, done.error or "generation failed", id_header)
    return outcome


async def generate_sync(request: Request, spec: ServedModelDep, caller: SubmitterDep, payload: JsonBodyDep,
                        state: StateDep) -> Response:
    submission = await _prepare(spec, payload, caller, state, sync=True)
    try:
        outcome = await run_sync(request, state, submission)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    done = outcome.job
    headers = {
        "X-Request-Id": done.id,
        "X-Seed": str(done.seed),
        "X-Inference-Time": f"{done.metrics.get('inference_time', 0.0):.4f}",
        "X-Queue-Time": f"{done.metrics.get('queue_time', 0.0):.4f}",
        "X-Output-Count": str(len(outcome.outputs)),
    }
    if done.want_base64:
        images = [base64.b64encode(data).decode("ascii") for data in outcome.outputs]
        return JSONResponse({"image": images[0] if len(images) == 1 else images}, headers=headers)
    if len(outcome.outputs) > 1:
        # A raw body holds one image; the others stay fetchable for the retention period.
        headers["X-Output-Urls"] = ", ".join(output_urls(state.public_base(request), done))
    return Response(outcome.outputs[0], media_type=CONTENT_TYPES[done.output_format], headers=headers)


async def generate_async(request: Request, spec: ServedModelDep, caller: SubmitterDep, payload: JsonBodyDep,
                         state: StateDep) -> JSONResponse:
    base = state.public_base(request)
    try:
        key = idempotency.requested_key(request.headers)
        # Of the whole body, webhook included (taken out of ``payload`` next).
        body_fingerprint = "" if key is None else idempotency.fingerprint(spec.slug, payload)
        webhook = await webhooks.requested_webhook(payload, caller.owner, state.webhook_options)
    except ValueError as exc:  # a malformed key, a refused webhook URL
        raise ApiError(400, str(exc)) from None

    async def record_webhook(job_id: str) -> None:
        if webhook is not None:  # a second record of one job's webhook is a no-op
            delivery = webhooks.Delivery(job_id, webhook, caller.owner, base, next_at=time.time())
            await asyncio.to_thread(state.webhooks.add, delivery)

    async def submit(job_id: str | None) -> str:
        submission = replace(await _prepare(spec, payload, caller, state, sync=False), job_id=job_id)
        job = await _submit(state, submission)
        await record_webhook(job.id)
        return job.id

    async def adopt(job_id: str) -> bool:
        """A lapsed reservation's job exists: its submitter died after creating it."""
        if await asyncio.to_thread(state.store.get, job_id) is None:
            return False
        await record_webhook(job_id)
        return True

    try:
        job_id, replayed = await idempotency.submit_once(state.idempotency, caller.owner, key, body_fingerprint,
                                                         submit, adopt)
    except idempotency.IdempotencyConflict as exc:
        raise ApiError(exc.status, str(exc), {"Retry-After": "1"} if exc.status == 409 else None) from None
    headers = {idempotency.REPLAYED_HEADER: "true"} if replayed else {}
    request.state.request_id = job_id
    body = SubmitResponse(request_id=job_id, status=JobStatus.QUEUED.value, status_url=status_url(base, job_id),
                          response_url=result_url(base, job_id), poll_url=status_url(base, job_id))
    return JSONResponse(body.model_dump(), headers=headers)


# -- routes ----------------------------------------------------------------------------------------


def _bound_to(slug: str, endpoint: Callable) -> Callable:
    """``endpoint`` with its model fixed to ``slug`` (the same checks as the path-parameter route)."""

    async def model(request: Request, caller: SubmitterDep, state: StateDep) -> ModelSpec:
        return await served_model(slug, request, caller, state)

    # Defaults, not annotations: FastAPI resolves string annotations against module globals,
    # where this closure's dependency does not live.
    # The model is checked first (404/403 before the body is read), as on the catch-all route.
    async def bound(request: Request, *, spec: ModelSpec = Depends(model),  # noqa: B008 - FastAPI's idiom
                    caller: SubmitterDep, payload: JsonBodyDep, state: StateDep) -> Any:
        return await endpoint(request, spec, caller, payload, state)

    return bound


def generation_router(slugs: Iterable[str]) -> APIRouter:
    """The ``/v1`` and ``/v2`` submit routes: one operation per served slug, then the catch-all."""
    router = APIRouter(tags=["generate"])
    operations = (
        ("v1", generate_sync, "generate and return the image (sync)",
         {"response_class": Response, "responses": _SYNC_RESPONSES}),
        ("v2", generate_async, "queue a request (async); poll status_url, then fetch response_url",
         {"response_model": SubmitResponse, "responses": _ASYNC_RESPONSES}),
    )
    for version, endpoint, summary, kw in operations:
        for slug in sorted(slugs):
            spec = get_model(slug)
            router.add_api_route(
                f"/{version}/{slug}", _bound_to(slug, endpoint), methods=["POST"], summary=f"{slug}: {summary}",
                description=f"{spec.title}: {spec.description}",
                openapi_extra=request_body_openapi(spec, queued=version == "v2"),
                operation_id=f"{endpoint.__name__}_{slug}".replace(".", "_").replace("-", "_"), **kw)
            _label(router, version, slug)
        # Slugs without an operation of their own: unknown (404), not served (404), or not allowed (403).
        router.add_api_route(f"/{version}/{{slug}}", endpoint, methods=["POST"], include_in_schema=False, **kw)
        _label(router, version, None)
    return router


def _label(router: APIRouter, version: str, slug: str | None) -> None:
    """Metrics labels of the route just added (read by ``diffserve.api.app.RequestGuard``)."""
    route = router.routes[-1]
    route.metrics_path = f"/{version}/{{slug}}"
    route.metrics_slug = slug
