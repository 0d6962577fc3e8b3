"""``POST /v1/{slug}`` (sync: the image in the response) and ``POST /v2/{slug}`` (async submit).

Both validate against the catalog, check credits, fetch and decode image inputs before anything
is queued (a bad image is a 400 at once), and submit a job to the runner; ``/v1`` then awaits
that job, so both share one queue and one concurrency bound.
"""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api.deps import AppState, Caller, JsonBodyDep, ServedModelDep, StateDep, SubmitterDep
from api.errors import ApiError
from api.images import ImageInputError, load_image
from api.jobs import Job, JobStatus
from api.quotas import InsufficientCredits
from api.runner import ClientGone, QueueFull, Submission, SyncTimeout
from api.schemas import Base64ImageResponse, ErrorResponse, SubmitResponse, submit_openapi
from engine.catalog import CATALOG, ModelSpec, ValidationError
from engine.imageio import CONTENT_TYPES

router = APIRouter(tags=["generate"])

_ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "Invalid parameters, body or image input", 401: "Missing or invalid API key",
    403: "Key not allowed to use this model", 404: "Unknown or unserved model", 406: "Insufficient credits",
    413: "Request body too large", 429: "Rate limited or queue full (see Retry-After)",
}.items()}
_OPENAPI = submit_openapi(list(CATALOG.values()))


async def _prepare(spec: ModelSpec, payload: dict, caller: Caller, state: AppState, *, sync: bool) -> Submission:
    try:
        params = spec.validate(payload)
    except ValidationError as exc:
        raise ApiError(400, f"invalid parameters for {spec.slug}: " + "; ".join(exc.errors)) from None
    # Cheap early refusal before fetching images; the runner's reservation is the binding check.
    remaining = state.ledger.remaining(caller.owner)
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
    )


async def _submit(state: AppState, submission: Submission) -> Job:
    try:
        return await state.runner.submit(submission)
    except QueueFull as exc:
        raise ApiError(429, str(exc), {"Retry-After": "5"}) from None
    except InsufficientCredits as exc:
        raise ApiError(406, str(exc)) from None


def output_urls(base: str, job: Job) -> list[str]:
    return [f"{base}/v2/requests/{job.id}/outputs/{rel.rsplit('/', 1)[-1]}" for rel in job.outputs]


@router.post(
    "/v1/{slug}",
    summary="Generate and return the image (sync)",
    response_class=Response,
    openapi_extra=_OPENAPI,
    responses={
        200: {"description": "The image (image/jpeg, image/png or image/webp), or JSON with base64 when "
                             "base64=true",
              "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {},
                          "application/json": {"schema": Base64ImageResponse.model_json_schema()}}},
        **_ERRORS,
        502: {"model": ErrorResponse, "description": "Backend unavailable"},
        504: {"model": ErrorResponse, "description": "Timed out (the request is cancelled)"},
    },
)
async def generate_sync(request: Request, spec: ServedModelDep, caller: SubmitterDep, payload: JsonBodyDep,
                        state: StateDep) -> Response:
    submission = await _prepare(spec, payload, caller, state, sync=True)
    job = await _submit(state, submission)
    request.state.request_id = job.id
    id_header = {"X-Request-Id": job.id}
    try:
        outcome = await state.runner.wait(job.id, state.settings.sync_timeout_s, request.is_disconnected)
    except SyncTimeout as exc:
        raise ApiError(504, f"timed out: {exc}; it was cancelled", id_header) from None
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    done = outcome.job
    if done.status is not JobStatus.COMPLETED:
        raise ApiError(outcome.status_code or 500, done.error or "generation failed", id_header)
    headers = {
        **id_header,
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


@router.post(
    "/v2/{slug}",
    summary="Queue a request (async); poll status_url, then fetch response_url",
    response_model=SubmitResponse,
    openapi_extra=_OPENAPI,
    responses=_ERRORS,
)
async def generate_async(request: Request, spec: ServedModelDep, caller: SubmitterDep, payload: JsonBodyDep,
                         state: StateDep) -> SubmitResponse:
    submission = await _prepare(spec, payload, caller, state, sync=False)
    job = await _submit(state, submission)
    request.state.request_id = job.id
    base = state.public_base(request)
    status_url = f"{base}/v2/requests/{job.id}/status"
    return SubmitResponse(request_id=job.id, status=JobStatus.QUEUED.value, status_url=status_url,
                          response_url=f"{base}/v2/requests/{job.id}", poll_url=status_url)
