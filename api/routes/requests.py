"""``/v2/requests/{id}``: status, result, cancel, and the output images.

A FAILED request is served with HTTP 422 on both the status and the result endpoint, its body
still carrying ``status`` and ``error`` (what Segmind's gateway does and what the SDK expects).
Unknown or expired ids are 404. Output image URLs are capability URLs (128-bit random request
id): they are served without an API key, like the public storage links Segmind returns, so
that browsers and plain HTTP clients can fetch them. They are read through the job store
(``read_output``): from Redis (any replica serves any job's outputs) or the data directory.
"""

from __future__ import annotations

import asyncio
import base64
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from diffserve.api.deps import AppState, OwnedJobDep, StateDep, StoreDep, read_job
from diffserve.api.errors import ApiError
from diffserve.api.jobs import Job, JobStatus
from diffserve.api.queue import JobQueue
from diffserve.api.schemas import ErrorResponse, Progress, ResultResponse, StatusResponse
from diffserve.api.urls import output_urls
from diffserve.engine.imageio import CONTENT_TYPES

router = APIRouter(prefix="/v2/requests", tags=["requests"])

_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    403: {"model": ErrorResponse, "description": "The request belongs to another API key"},
    404: {"model": ErrorResponse, "description": "Unknown or expired request id"},
}
_OUTPUT_NAME_RE = re.compile(r"^(\d{1,3})(?:\.[A-Za-z0-9]{1,10})?$")


def _status_body(job: Job, store: JobQueue) -> StatusResponse:
    body = StatusResponse(request_id=job.id, status=job.status.value)
    if job.status is JobStatus.FAILED:
        body.error = job.error or "failed"
    elif job.status is JobStatus.QUEUED:
        body.queue_position = store.position(job.id)
    elif job.status is JobStatus.PROCESSING:
        if job.progress_step is not None:
            body.progress = Progress(step=job.progress_step, total=job.progress_total)
        if job.cancel_requested:
            body.cancel_requested = True
    return body


def _status_response(body: StatusResponse) -> JSONResponse:
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422 if body.status == "FAILED" else 200)


@router.get("/{request_id}/status", response_model=StatusResponse, response_model_exclude_none=True,
            summary="Status of a queued request",
            responses={**_ERRORS, 422: {"model": StatusResponse, "description": "The request FAILED"}})
async def request_status(job: OwnedJobDep, store: StoreDep) -> JSONResponse:
    return _status_response(_status_body(job, store))


@router.get("/{request_id}", response_model=ResultResponse, summary="Result of a request",
            responses={**_ERRORS, 422: {"model": ResultResponse, "description": "The request FAILED"}})
async def request_result(job: OwnedJobDep, request: Request, state: StateDep) -> JSONResponse:
    body = await result_body(job, request, state)
    return JSONResponse(body.model_dump(), status_code=422 if job.status is JobStatus.FAILED else 200)


async def result_body(job: Job, request: Request, state: AppState) -> ResultResponse:
    """The body of ``GET /v2/requests/{id}`` (also the terminal event of ``/events``)."""
    return await asyncio.to_thread(result_of, job, state.public_base(request), state.store)


def result_of(job: Job, base: str, store: JobQueue) -> ResultResponse:
    """The result of ``job`` with output URLs under ``base`` (also a webhook's body); blocking:
    base64 outputs are read from the store."""
    output = None
    if job.status is JobStatus.COMPLETED:
        output = _read_base64(store, job) if job.want_base64 else output_urls(base, job)
    return ResultResponse(request_id=job.id, status=job.status.value, output=output,
                          error=job.error if job.status is JobStatus.FAILED else None,
                          seed=job.seed, metrics=job.metrics)


def result_json(job: Job, base: str, store: JobQueue) -> bytes:
    """``result_of`` as the JSON bytes a webhook carries."""
    return result_of(job, base, store).model_dump_json().encode()


@router.post("/{request_id}/cancel", response_model=StatusResponse, response_model_exclude_none=True,
             summary="Cancel a queued or running request",
             responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "Already finished"}})
async def cancel_request(job: OwnedJobDep, state: StateDep) -> JSONResponse:
    if job.status.terminal:
        raise ApiError(409, f"request {job.id} already {job.status.value}; nothing to cancel")
    updated = await state.runner.cancel_async(job.id)
    if updated is None:
        raise ApiError(404, f"request {job.id!r} not found")
    # 200 even when the cancel made it FAILED: this answers the cancel, not the job.
    return JSONResponse(_status_body(updated, state.store).model_dump(exclude_none=True))


@router.get("/{request_id}/outputs/{name}", summary="An output image (no API key needed)",
            response_class=Response,
            responses={200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
                       404: {"model": ErrorResponse, "description": "Unknown, expired or not completed"}})
async def output_image(request_id: str, name: str, request: Request, state: StateDep) -> Response:
    job = await read_job(state, request_id)
    match = _OUTPUT_NAME_RE.match(name)
    if job is None or job.status is not JobStatus.COMPLETED or match is None or int(match[1]) >= len(job.outputs):
        raise ApiError(404, f"no output {name!r} for request {request_id!r} (unknown, expired or not completed)")
    request.state.metrics_slug = job.slug
    data = await asyncio.to_thread(state.store.read_output, job.id, int(match[1]))
    if data is None:
        raise ApiError(404, f"output {name!r} of request {request_id!r} has expired")
    return Response(data, media_type=CONTENT_TYPES[job.output_format],
                    headers={"Cache-Control": "private, max-age=3600"})


def _read_base64(store: JobQueue, job: Job) -> list[str]:
    return [base64.b64encode(store.read_output(job.id, i) or b"").decode("ascii") for i in range(len(job.outputs))]
