"""``GET /v2/requests/{id}/events``: a request's life as server-sent events, for clients that
would rather listen than poll.

The stream re-reads the job from the store every ``events_poll_s`` and sends an event whenever
what ``GET /v2/requests/{id}/status`` would answer changes: ``queued`` (with ``queue_position``)
and ``progress`` (PROCESSING, with ``progress.step``/``total`` once the backend reports a step),
their ``data`` the status body. It ends with one terminal event whose ``data`` is the body of
``GET /v2/requests/{id}``: ``completed``, ``cancelled`` (FAILED by a cancel) or ``failed``.
Because it reads the store, any API replica streams any job, wherever it runs. Every event has
an ``id:`` (counting on from a reconnecting client's ``Last-Event-ID``); a comment line is sent
after ``events_keepalive_s`` of silence; the store unreachable for a while only pauses events.
Auth, 404 and 403 are the status route's (``OwnedJobDep``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from diffserve.api.deps import AppState, OwnedJobDep, StateDep, read_job
from diffserve.api.jobs import CANCELLED_BY_CLIENT, Job, JobStatus
from diffserve.api.redis_client import StoreUnavailable
from diffserve.api.routes.requests import _ERRORS, _status_body, result_body

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v2/requests", tags=["requests"])

RETRY_MS = 1000
"""The ``retry:`` a browser's EventSource waits before reconnecting a dropped stream."""


def format_event(event: str, data: dict, event_id: int) -> str:
    """One SSE message; ``json.dumps`` writes no newline, so ``data`` is one line."""
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def terminal_event(job: Job) -> str:
    if job.status is JobStatus.COMPLETED:
        return "completed"
    return "cancelled" if job.error == CANCELLED_BY_CLIENT else "failed"


def _last_event_id(request: Request) -> int:
    try:
        return max(0, int(request.headers.get("last-event-id", "0")))
    except ValueError:
        return 0


async def _events(job: Job, request: Request, state: AppState, event_id: int) -> AsyncIterator[str]:
    settings = state.settings
    yield f"retry: {RETRY_MS}\n\n"
    last_data: dict | None = None
    last_sent = time.monotonic()
    paused = False
    while True:
        if job.status.terminal:
            body = await result_body(job, request, state)
            yield format_event(terminal_event(job), body.model_dump(), event_id + 1)
            return
        try:
            data = (await asyncio.to_thread(_status_body, job, state.store)).model_dump(exclude_none=True)
        except StoreUnavailable:  # the queue position could not be read: try again next poll
            data = last_data
        if data != last_data:
            event_id += 1
            yield format_event("queued" if job.status is JobStatus.QUEUED else "progress", data, event_id)
            last_data, last_sent = data, time.monotonic()
        elif time.monotonic() - last_sent >= settings.events_keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(settings.events_poll_s)
        try:
            current = await read_job(state, job.id)
        except StoreUnavailable as exc:
            if not paused:
                logger.warning("events of %s paused until the store answers again: %s", job.id, exc)
            paused = True
            continue
        paused = False
        if current is None:  # purged between two reads (retention over): nothing more will happen
            yield format_event("expired", {"request_id": job.id, "error": "request expired"}, event_id + 1)
            return
        job = current


@router.get("/{request_id}/events", summary="Server-sent events of a request: queued, progress, then its result",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Events `queued`, `progress`, then one of `completed`, `failed`, "
                                            "`cancelled` whose data is the body of GET /v2/requests/{id}"},
                       **_ERRORS})
async def request_events(job: OwnedJobDep, request: Request, state: StateDep) -> StreamingResponse:
    return StreamingResponse(
        _events(job, request, state, _last_event_id(request)), media_type="text/event-stream",
        # no-transform and X-Accel-Buffering keep proxies (nginx) from buffering the stream.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )
