"""``GET /v2/requests/{id}/events`` as a client reads it: a real uvicorn server on loopback, the
in-process ``EngineBackend`` on the tiny checkpoints, the SQLite store, one job at a time, and
``httpx-sse`` (a real SSE parser) on the stream. The backend is wrapped so that the order of
events does not depend on the host's speed: a request whose prompt is ``HOLD`` waits until the
test releases it, and every denoising step lasts at least ``STEP_S``. Streaming through another
replica on Redis is in ``tests/serving/test_scale_out.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from diffserve.api.app import create_app
from diffserve.api.backend_local import EngineBackend
from diffserve.api.settings import Settings
from tests.serving.test_api import ServerThread, wait_status

KEY = "events-key"
SLUG = "sd1.5-scifi"
QUICK = {"prompt": "a city", "num_inference_steps": 20, "seed": 11}
HOLD = {"prompt": "HOLD", "num_inference_steps": 20, "seed": 3}
STEP_S = 0.1


class PacedBackend:
    """Delegates to a real backend; holds ``HOLD`` requests until ``release``; paces every step."""

    def __init__(self, inner):
        self.inner = inner
        self.release = threading.Event()

    @property
    def slugs(self):
        return self.inner.slugs

    async def generate(self, slug, params, *, request_id, on_progress=None):
        while params.get("prompt") == HOLD["prompt"] and not self.release.is_set():
            await asyncio.sleep(0.02)  # a cancel ends the hold by cancelling this task

        def paced(done: int, total: int) -> None:  # called on the pipeline's thread after each step
            time.sleep(STEP_S)
            if on_progress is not None:
                on_progress(done, total)

        return await self.inner.generate(slug, params, request_id=request_id, on_progress=paced)

    async def ready(self):
        return await self.inner.ready()

    async def close(self):
        self.release.set()
        await self.inner.close()


@pytest.fixture(scope="module")
def api(tiny_checkpoints, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("events-data"), api_keys=[KEY], max_concurrent_jobs=1,
                        cancel_poll_s=0.05, events_poll_s=0.05, events_keepalive_s=0.2)
    backend = PacedBackend(EngineBackend({SLUG: tiny_checkpoints[SLUG]}))
    with ServerThread(create_app(settings, backend)) as server:
        server.backend = backend
        yield server


@pytest.fixture()
def http(api):
    with httpx.Client(base_url=api.url, headers={"x-api-key": KEY}, timeout=120) as client:
        yield client


def read_events(http: httpx.Client, request_id: str, headers: dict | None = None) -> list:
    with connect_sse(http, "GET", f"/v2/requests/{request_id}/events", headers=headers or {}) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        # httpx-sse also yields the retry field and keep-alive comments as data-less messages;
        # a browser's EventSource dispatches no event for them.
        return [event for event in source.iter_sse() if event.data]


def test_a_queued_job_streams_its_position_progress_then_the_result(http, api):
    api.backend.release.clear()
    first = http.post(f"/v2/{SLUG}", json=HOLD).json()["request_id"]
    wait_status(http, first, {"PROCESSING"})
    ahead = http.post(f"/v2/{SLUG}", json=QUICK).json()["request_id"]
    second = http.post(f"/v2/{SLUG}", json=QUICK).json()["request_id"]  # one queued request ahead of it
    events = []
    with connect_sse(http, "GET", f"/v2/requests/{second}/events") as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            if not event.data:
                continue
            events.append(event)
            if len(events) == 1:  # queued behind `ahead`: cancelling it moves this one up
                assert http.post(f"/v2/requests/{ahead}/cancel").status_code == 200
            elif len(events) == 2:
                api.backend.release.set()

    names = [e.event for e in events]
    assert names[0] == "queued" and names[-1] == "completed", names
    assert names.count("completed") == 1
    queued = [json.loads(e.data) for e in events if e.event == "queued"]
    assert queued[0] == {"request_id": second, "status": "QUEUED", "queue_position": 1}
    assert queued[1] == {"request_id": second, "status": "QUEUED", "queue_position": 0}
    steps = [json.loads(e.data)["progress"]["step"] for e in events if e.event == "progress"
             and "progress" in json.loads(e.data)]
    assert steps and steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert all(json.loads(e.data)["status"] == "PROCESSING" for e in events if e.event == "progress")
    # The terminal event carries the body of GET /v2/requests/{id}.
    assert json.loads(events[-1].data) == http.get(f"/v2/requests/{second}").json()
    assert json.loads(events[-1].data)["output"][0].startswith(api.url)
    ids = [int(e.id) for e in events]
    assert ids == list(range(1, len(events) + 1))
    # The first job had finished before the second ran: its stream is its result at once.
    [done] = read_events(http, first)
    assert done.event == "completed" and json.loads(done.data)["status"] == "COMPLETED"


def test_a_cancelled_job_ends_with_a_cancelled_event_and_keep_alives_while_nothing_changes(http, api):
    api.backend.release.clear()
    running = http.post(f"/v2/{SLUG}", json=HOLD).json()["request_id"]
    queued = http.post(f"/v2/{SLUG}", json=QUICK).json()["request_id"]
    with http.stream("GET", f"/v2/requests/{queued}/events") as response:
        lines = response.iter_lines()
        seen = []
        for line in lines:
            seen.append(line)
            if line == ": keep-alive":  # the queued job's status has not changed for events_keepalive_s
                break
        assert any(line == "event: queued" for line in seen), seen
        assert http.post(f"/v2/requests/{queued}/cancel").status_code == 200
        rest = list(lines)
    assert "event: cancelled" in rest, rest
    data = json.loads(next(line for line in rest if line.startswith("data:") and "FAILED" in line)[5:])
    assert data["status"] == "FAILED" and data["error"] == "cancelled by client"
    http.post(f"/v2/requests/{running}/cancel")


def test_errors_are_the_status_routes(http, api):
    assert http.get("/v2/requests/0123456789abcdef0123456789abcdef/events").status_code == 404
    assert http.get("/v2/requests/not-an-id/events").status_code == 404
    request_id = http.post(f"/v2/{SLUG}", json=QUICK).json()["request_id"]
    missing = httpx.get(f"{api.url}/v2/requests/{request_id}/events", timeout=30)
    assert missing.status_code == 401 and "error" in missing.json()
    # A reconnecting client's Last-Event-ID: ids count on from it.
    events = read_events(http, request_id, headers={"Last-Event-ID": "41"})
    assert int(events[0].id) == 42 and events[-1].event == "completed"
