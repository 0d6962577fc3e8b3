"""The HTTP API as clients use it: real uvicorn servers on loopback, real HTTP (httpx and the
official ``segmind`` SDK), the in-process ``EngineBackend`` on the tiny checkpoints.

Three servers: ``api`` (run twice, on each job store: the embedded SQLite one and the Redis one
of scale-out, with its worker loop in the same process; keys, credits, rate limits, per-key models, one job at a time) for the
contract and the error codes; ``tight_api`` (open, short timeouts and retention, one model whose
checkpoint is missing) for timeouts, an unavailable backend and expiry; ``faulty_api`` (a broken
checkpoint, a faceless portrait, a job deadline) for the mapping of real failures. No stubs:
every error comes from a real component failing. Generations are kept cheap:
img2img at strength 0.1 runs 2 denoising steps.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import PIL.Image
import pytest
import uvicorn
from segmind import InferenceFailed, SegmindClient, SegmindError

from diffserve.api.app import create_app
from diffserve.api.backend_local import EngineBackend
from diffserve.engine.tiny.demo import DEMO_PARAMS, demo_input_image
from diffserve.api.settings import Settings
from diffserve.engine.catalog import CATALOG
from tests.redis_server import redis_server  # noqa: F401 - fixture

KEY = "test-key"
OTHER_KEY = "other-key"
POOR_KEY = "poor-key"
ONE_CREDIT_KEY = "one-credit-key"
LIMITED_KEY = "limited-key"
SCIFI_ONLY_KEY = "scifi-only-key"
MAX_BODY = 256 * 1024


# -- helpers -------------------------------------------------------------------------------------


class ServerThread:
    """Run an app under uvicorn on a free loopback port in a background thread."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


class CountingBackend:
    """Delegates to a real backend and records how many generations ran at once."""

    def __init__(self, inner):
        self.inner = inner
        self.active = 0
        self.peak = 0
        self.calls = 0
        self.started: list[str] = []  # request ids in the order their generations began

    @property
    def slugs(self):
        return self.inner.slugs

    async def generate(self, slug, params, *, request_id, on_progress=None):
        self.active += 1
        self.calls += 1
        self.started.append(request_id)
        self.peak = max(self.peak, self.active)
        try:
            return await self.inner.generate(slug, params, request_id=request_id, on_progress=on_progress)
        finally:
            self.active -= 1

    async def ready(self):
        return await self.inner.ready()

    async def close(self):
        await self.inner.close()


HOLD = "hold until released"


class HoldingBackend:
    """Delegates to a real backend, except that a request whose prompt is ``HOLD`` blocks until the
    test releases it or its caller cancels it. A deadline then fires by construction, whatever the
    host's speed (on a GPU the tiny models finish any request inside the timeouts used here), and
    the test sees whether the cancellation reached the backend."""

    def __init__(self, inner):
        self.inner = inner
        self.release = threading.Event()
        self.held: list[str] = []       # request ids that reached the hold
        self.cancelled: list[str] = []  # request ids whose hold ended in a cancellation

    @property
    def slugs(self):
        return self.inner.slugs

    async def generate(self, slug, params, *, request_id, on_progress=None):
        if params.get("prompt") == HOLD:
            self.held.append(request_id)
            try:
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                self.cancelled.append(request_id)
                raise
        return await self.inner.generate(slug, params, request_id=request_id, on_progress=on_progress)

    async def ready(self):
        return await self.inner.ready()

    async def close(self):
        self.release.set()
        await self.inner.close()


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` until true; ``timeout`` only bounds a hang, it is not what the test checks."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def jpeg_bytes(size=(96, 64), color=(200, 120, 40)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def cheap_img2img(**overrides) -> dict:
    """An img2img request that runs 2 denoising steps (strength 0.1 of 20)."""
    return {"image": base64.b64encode(jpeg_bytes()).decode(), "prompt": "a lake", "strength": 0.1,
            "num_inference_steps": 20, "seed": 7, **overrides}


def wait_status(http: httpx.Client, request_id: str, want: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/v2/requests/{request_id}/status").json()
        if body.get("status") in want:
            return body
        assert time.monotonic() < deadline, f"{request_id} stuck in {body}"
        time.sleep(0.05)


def wait_progress(http: httpx.Client, request_id: str, timeout: float = 120.0) -> dict:
    """Wait until the job is PROCESSING and has reported at least one denoising step."""
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/v2/requests/{request_id}/status").json()
        if body["status"] == "PROCESSING" and body.get("progress", {}).get("step", 0) >= 1:
            return body
        assert body["status"] in ("QUEUED", "PROCESSING"), body
        assert time.monotonic() < deadline, f"{request_id} never made progress: {body}"
        time.sleep(0.02)


def decode_image(data: bytes) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image


# -- fixtures ------------------------------------------------------------------------------------


class _ImageHandler(BaseHTTPRequestHandler):
    image = b""

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path == "/sd-img2img-input.jpeg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server(diffserve_home):
    """Loopback HTTP server holding the seed page's img2img input (a local stand-in)."""
    _ImageHandler.image = demo_input_image(diffserve_home / "demo-inputs" / "sd-img2img-input.jpeg").read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def api(request, tiny_checkpoints, tmp_path_factory):
    store = {}
    if request.param == "redis":
        import uuid

        server = request.getfixturevalue("redis_server")
        server.start()
        store = {"redis_url": server.url, "redis_namespace": f"test-api-{uuid.uuid4().hex[:8]}"}
    settings = Settings(
        **store,
        data_dir=tmp_path_factory.mktemp("api-data"),
        api_keys=[KEY, OTHER_KEY, POOR_KEY, ONE_CREDIT_KEY, LIMITED_KEY, SCIFI_ONLY_KEY],
        credits={POOR_KEY: 0, ONE_CREDIT_KEY: 1},
        rate_limit_per_minute={LIMITED_KEY: 2},
        key_models={SCIFI_ONLY_KEY: ["sd1.5-scifi"]},
        max_priority={KEY: 9},
        max_concurrent_jobs=1,
        max_body_bytes=MAX_BODY,
        image_allow_networks=["127.0.0.0/8"],
        cancel_poll_s=0.05,
    )
    backend = CountingBackend(EngineBackend(tiny_checkpoints))
    holding = HoldingBackend(backend)
    with ServerThread(create_app(settings, holding)) as server:
        server.backend = backend
        server.holding = holding
        server.settings = settings
        yield server
    assert backend.peak <= 1, "max_concurrent_jobs=1 was exceeded"


@pytest.fixture()
def http(api):
    with httpx.Client(base_url=api.url, headers={"x-api-key": KEY}, timeout=120) as client:
        yield client


@pytest.fixture()
def sdk(api):
    client = SegmindClient(base_url=f"{api.url}/v1", api_key=KEY, timeout=120)
    yield client
    client._client.close()  # the SDK never closes its httpx client


# -- the official SDK, unchanged -----------------------------------------------------------------


def test_sdk_run_sync_returns_the_jpeg_with_headers(sdk):
    payload = {**DEMO_PARAMS["sd1.5-scifi"], "num_inference_steps": 20, "img_height": 512}
    response = sdk.run_sync("sd1.5-scifi", **payload)
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-remaining-credits"] == "unlimited"
    assert response.headers["x-seed"] == str(payload["seed"])
    assert len(response.headers["x-request-id"]) == 32
    assert float(response.headers["x-inference-time"]) > 0
    image = decode_image(response.content)
    assert image.format == "JPEG" and image.size == (512, 512)


def test_sdk_run_img2img_with_an_image_url(sdk, api, image_server):
    payload = {**DEMO_PARAMS["sd1.5-img2img"], "image": f"{image_server}/sd-img2img-input.jpeg",
               "num_inference_steps": 20}
    result = sdk.run("sd1.5-img2img", **payload)
    assert result["status"] == "COMPLETED" and result["error"] is None
    assert result["seed"] == payload["seed"]
    assert set(result["metrics"]) >= {"inference_time", "queue_time", "total_time"}
    assert result["metrics"]["inference_time"] > 0
    [url] = result["output"]
    assert url.startswith(api.url + "/v2/requests/" + result["request_id"])
    fetched = httpx.get(url)  # output URLs work without the key, like Segmind's storage links
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert decode_image(fetched.content).size == (512, 512)
    # The decoded input stored for the queued job is gone once it has finished.
    assert api.server.config.app.state.diffserve.store.read_inputs(result["request_id"]) == {}


def test_a_backlog_runs_in_priority_order_and_status_shows_it(api, http):
    with httpx.Client(base_url=api.url, headers={"x-api-key": OTHER_KEY}, timeout=120) as other:
        capped = other.post("/v2/sd1.5-img2img", json=cheap_img2img(), headers={"X-Priority": "1"})
    assert capped.status_code == 403 and "up to 0" in capped.json()["error"]
    for bad in ("10", "-1", "high"):
        refused = http.post("/v2/sd1.5-img2img", json=cheap_img2img(), headers={"X-Priority": bad})
        assert refused.status_code == 400 and "X-Priority" in refused.json()["error"]
    api.holding.release.clear()
    try:
        # One job holds the only worker, so the others queue up behind it.
        blocker = http.post("/v2/sd1.5-img2img", json=cheap_img2img(prompt=HOLD)).json()["request_id"]
        wait_for(lambda: blocker in api.holding.held, "the blocking job started")
        priorities = ["0", "5", "0", "9", "5"]
        ids = [http.post("/v2/sd1.5-img2img", json=cheap_img2img(seed=i),
                         headers={"X-Priority": p}).json()["request_id"] for i, p in enumerate(priorities)]
        expected = [ids[i] for i in (3, 1, 4, 0, 2)]
        positions = [http.get(f"/v2/requests/{request_id}/status").json()["queue_position"] for request_id in expected]
        assert positions == [0, 1, 2, 3, 4]
    finally:
        api.holding.release.set()
    for request_id in ids:
        assert wait_status(http, request_id, {"COMPLETED", "FAILED"})["status"] == "COMPLETED"
    started = [request_id for request_id in api.backend.started if request_id in ids]
    assert started == expected


def test_sdk_submit_async_wait_on_segmind_vega_with_base64(sdk):
    payload = {**DEMO_PARAMS["segmind-vega"], "num_inference_steps": 20, "base64": True}
    job = sdk.submit_async("segmind-vega", **payload)
    assert job.submit_response["status"] == "QUEUED"
    assert job.submit_response["poll_url"] == job.status_url
    result = job.wait(timeout=300, interval=0.25)
    assert result["status"] == "COMPLETED"
    [encoded] = result["output"]
    image = decode_image(base64.b64decode(encoded))
    assert image.format == "JPEG" and image.size == (1024, 1024)


def test_sdk_run_sync_ominicontrol_returns_its_image_format(sdk, image_server):
    # The seed page's example (a JS v1 call), with fewer steps and the local input image.
    payload = {"image": f"{image_server}/sd-img2img-input.jpeg", "prompt": "photo of this orange sofa in a modern "
               "living room", "steps": 4, "seed": 4710825087, "image_format": "png", "image_quality": 90,
               "base64": False}
    response = sdk.run_sync("ominicontrol", **payload)
    assert response.headers["content-type"] == "image/png"
    assert decode_image(response.content).format == "PNG"


def test_sdk_surfaces_http_errors(sdk):
    with pytest.raises(SegmindError) as info:
        sdk.run_sync("sd1.5-scifi", prompt="x", samples=9)
    assert info.value.status == 400 and "samples" in info.value.detail
    wrong = SegmindClient(base_url=sdk.base_url, api_key="wrong")
    with pytest.raises(SegmindError) as info:
        wrong.run("sd1.5-scifi", prompt="x")
    assert info.value.status == 401
    wrong._client.close()


# -- sync responses ------------------------------------------------------------------------------


def test_v1_base64_lists_several_images_and_numbers_may_be_strings(http):
    response = http.post("/v1/sd1.5-img2img", json=cheap_img2img(samples="2", base64="true", strength="0.1"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    images = response.json()["image"]
    assert isinstance(images, list) and len(images) == 2
    assert all(decode_image(base64.b64decode(i)).size == (512, 512) for i in images)

    data_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes()).decode()
    one = http.post("/v1/sd1.5-img2img", json=cheap_img2img(image=data_uri, base64=True)).json()["image"]
    assert isinstance(one, str) and decode_image(base64.b64decode(one)).format == "JPEG"


def test_v1_raw_body_with_several_samples_points_at_the_others(http):
    response = http.post("/v1/sd1.5-img2img", json=cheap_img2img(samples=2))
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-output-count"] == "2"
    urls = response.headers["x-output-urls"].split(", ")
    assert len(urls) == 2 and httpx.get(urls[1]).status_code == 200
    # A sync request is a job too: its result is also at /v2/requests/{id}.
    result = http.get(f"/v2/requests/{response.headers['x-request-id']}").json()
    assert result["status"] == "COMPLETED" and result["output"] == urls


def test_v1_and_v2_share_one_queue_and_concurrency_bound(http, api):
    first = http.post("/v2/sd1.5-img2img", json=cheap_img2img()).json()
    outcome = {}
    sync = threading.Thread(target=lambda: outcome.update(r=http.post("/v1/sd1.5-img2img", json=cheap_img2img())))
    sync.start()
    last = http.post("/v2/sd1.5-img2img", json=cheap_img2img()).json()
    sync.join(120)
    assert outcome["r"].status_code == 200
    for job in (first, last):
        assert wait_status(http, job["request_id"], {"COMPLETED"})["status"] == "COMPLETED"
    assert api.backend.peak == 1


# -- async: status, cancellation, failures -------------------------------------------------------


def test_cancel_running_and_queued_jobs_and_failed_jobs_cost_nothing(sdk, http, api):
    running = sdk.submit_async("sd1.5-scifi", prompt="a long one", samples=4, seed=3)
    assert running.request_id and running.status_url.startswith(api.url)
    wait_progress(http, running.request_id)

    poor = httpx.Client(base_url=api.url, headers={"x-api-key": ONE_CREDIT_KEY}, timeout=120)
    queued = poor.post("/v2/sd1.5-img2img", json=cheap_img2img()).json()
    status = poor.get(f"/v2/requests/{queued['request_id']}/status")
    assert status.status_code == 200 and status.json()["status"] == "QUEUED"
    assert status.json()["queue_position"] == 0
    assert status.headers["x-remaining-credits"] == "0"  # reserved while queued
    # Another key may neither read nor cancel it.
    other = {"x-api-key": OTHER_KEY}
    assert http.get(f"/v2/requests/{queued['request_id']}/status", headers=other).status_code == 403
    assert http.post(f"/v2/requests/{queued['request_id']}/cancel", headers=other).status_code == 403

    cancelled = poor.post(f"/v2/requests/{queued['request_id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "FAILED"
    result = poor.get(f"/v2/requests/{queued['request_id']}")
    assert result.status_code == 422
    assert result.json()["status"] == "FAILED" and result.json()["error"] == "cancelled by client"
    assert poor.post(f"/v2/requests/{queued['request_id']}/cancel").status_code == 409

    assert http.post(f"/v2/requests/{running.request_id}/cancel").status_code == 200
    with pytest.raises(InferenceFailed) as info:
        running.wait(timeout=120, interval=0.1)
    assert info.value.detail == "cancelled by client"
    failed = http.get(f"/v2/requests/{running.request_id}/status")
    assert failed.status_code == 422 and failed.json()["error"] == "cancelled by client"

    # Neither cancelled job was charged: the one credit pays for one image, then 406.
    ok = poor.post("/v1/sd1.5-img2img", json=cheap_img2img())
    assert ok.status_code == 200 and ok.headers["x-remaining-credits"] == "0"
    refused = poor.post("/v1/sd1.5-img2img", json=cheap_img2img())
    assert refused.status_code == 406 and "credits" in refused.json()["error"]
    poor.close()

    metrics = http.get("/metrics").text
    assert 'diffserve_job_failures_total{reason="cancelled",slug="sd1.5-scifi"} 1.0' in metrics
    assert 'diffserve_job_failures_total{reason="cancelled",slug="sd1.5-img2img"} 1.0' in metrics


# -- errors --------------------------------------------------------------------------------------


def test_bad_requests_are_400_with_a_json_error(http):
    cases = [
        ({"json": {"prompt": "x", "samples": 9, "scheduler": "nope"}}, ["samples", "scheduler"]),
        ({"json": {"prompt": "x", "colour": "red"}}, ["colour"]),
        ({"json": {"samples": 1}}, ["prompt"]),
        ({"content": b'{"prompt": "x",'}, ["malformed JSON"]),
        ({"content": b"[1, 2]"}, ["JSON object"]),
        ({"content": b""}, ["empty"]),
        ({"content": b'{"prompt": "\\ud800"}'}, ["Unicode"]),
        ({"json": {"prompt": "x", "seed": 10**30}}, ["seed"]),
    ]
    for kwargs, words in cases:
        for version in ("v1", "v2"):
            response = http.post(f"/{version}/sd1.5-scifi", **kwargs)
            assert response.status_code == 400, (kwargs, response.text)
            assert all(w in response.json()["error"] for w in words), response.json()


def test_bad_images_are_400_at_submission(http, image_server):
    cases = {
        "not base64 !": "base64",
        "http://10.1.2.3/x.jpg": "private address",
        "http://169.254.169.254/latest/meta-data": "metadata",
        f"{image_server}/missing.jpg": "HTTP 404",
        "data:text/plain;base64,aGVsbG8=": "not an image type",
    }
    for value, words in cases.items():
        response = http.post("/v2/sd1.5-img2img", json=cheap_img2img(image=value))
        assert response.status_code == 400, (value, response.text)
        assert words in response.json()["error"], response.json()


def test_auth_errors_and_bearer_tokens(api):
    payload = {"prompt": "x", "samples": 9}  # invalid: authorised calls stop at 400, no generation
    with httpx.Client(base_url=api.url) as client:
        missing = client.post("/v1/sd1.5-scifi", json=payload)
        assert missing.status_code == 401 and "x-api-key" in missing.json()["error"]
        wrong = client.post("/v1/sd1.5-scifi", json=payload, headers={"x-api-key": "nope"})
        assert wrong.status_code == 401 and wrong.json() == {"error": "invalid API key"}
        assert client.get("/v2/requests/" + "0" * 32, headers={"x-api-key": "nope"}).status_code == 401
        bearer = client.post("/v1/sd1.5-scifi", json=payload, headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 400
        forbidden = client.post("/v1/sd1.5-img2img", json=payload, headers={"x-api-key": SCIFI_ONLY_KEY})
        assert forbidden.status_code == 403 and "sd1.5-scifi" in forbidden.json()["error"]


def test_not_found_errors_name_what_is_available(http):
    unknown = http.post("/v1/sdxl-turbo", json={"prompt": "x"})
    assert unknown.status_code == 404
    assert "sd1.5-scifi" in unknown.json()["error"] and "segmind-vega" in unknown.json()["error"]
    for path in ("/v2/requests/" + "0" * 32, "/v2/requests/not-an-id", "/v2/requests/" + "0" * 32 + "/status"):
        assert http.get(path).status_code == 404
    assert http.get("/v2/requests/" + "0" * 32 + "/outputs/0.jpg").status_code == 404
    nowhere = http.get("/v3/anything")
    assert nowhere.status_code == 404 and "error" in nowhere.json()
    wrong_method = http.get("/v1/sd1.5-scifi")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_insufficient_credits_is_406(api):
    response = httpx.post(f"{api.url}/v1/sd1.5-scifi", json={"prompt": "x"}, headers={"x-api-key": POOR_KEY})
    assert response.status_code == 406
    assert response.json()["error"].startswith("insufficient credits")


def test_body_too_large_is_413_by_length_and_by_stream(http):
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10)}).encode()
    declared = http.post("/v1/sd1.5-scifi", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "limit" in declared.json()["error"]

    def chunks():  # no Content-Length: the guard counts what arrives
        for i in range(0, len(big), 16384):
            yield big[i:i + 16384]

    streamed = http.post("/v2/sd1.5-scifi", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]


def test_rate_limit_is_429_with_retry_after(api):
    with httpx.Client(base_url=api.url, headers={"x-api-key": LIMITED_KEY}) as client:
        codes = [client.post("/v1/sd1.5-scifi", json={"samples": 9}).status_code for _ in range(2)]
        assert codes == [400, 400]
        limited = client.post("/v1/sd1.5-scifi", json={"samples": 9})
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1 and "rate limit" in limited.json()["error"]
        # Polling is not rate limited.
        assert client.get("/v2/requests/" + "0" * 32).status_code == 404


# -- operations ----------------------------------------------------------------------------------


def test_health_readiness_metrics_and_docs(http):
    assert http.post("/v1/sd1.5-scifi", json={"samples": 9}).status_code == 400
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["backend"]["segmind-vega"] is True
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for needle in ('diffserve_http_requests_total{code="400",endpoint="/v1/{slug}",method="POST",slug="sd1.5-scifi"}',
                   "diffserve_http_request_duration_seconds_bucket", "diffserve_queue_depth ",
                   'diffserve_jobs{status="COMPLETED"}', "diffserve_jobs_running "):
        assert needle in text, needle
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    assert "/v2/requests/{request_id}/status" in spec["paths"]
    # One operation per served slug and version, each with that slug's own request schema; no
    # free-text slug and no oneOf body for clients to guess from.
    assert "/v1/{slug}" not in spec["paths"] and "/v2/{slug}" not in spec["paths"]
    operation_ids = set()
    for slug, model in CATALOG.items():
        for version in ("v1", "v2"):
            operation = spec["paths"][f"/{version}/{slug}"]["post"]
            # No path parameter; /v2 takes an Idempotency-Key header and a webhook field besides.
            queued = version == "v2"
            assert [p["name"] for p in operation.get("parameters", [])] == ["Idempotency-Key"] * queued, (version, slug)
            operation_ids.add(operation["operationId"])
            body = operation["requestBody"]
            schema = body["content"]["application/json"]["schema"]
            assert body["required"] is True and "oneOf" not in schema
            assert schema["title"] == f"{slug} request" and schema["additionalProperties"] is False
            assert list(schema["properties"]) == [p.name for p in model.params] + ["webhook"] * queued
            assert schema["required"] == [p.name for p in model.params if p.required]
        assert "200" in spec["paths"][f"/v1/{slug}"]["post"]["responses"]
        assert spec["paths"][f"/v2/{slug}"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/SubmitResponse"}
    assert len(operation_ids) == 2 * len(CATALOG)
    scifi = spec["paths"]["/v1/sd1.5-scifi"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert scifi["properties"]["scheduler"]["enum"] == list(CATALOG["sd1.5-scifi"].param("scheduler").choices)


# -- timeouts, an unavailable model, expiry (an open server with tight limits) -------------------


@pytest.fixture(scope="module")
def tight_api(tiny_checkpoints, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tight-api-data")
    settings = Settings(data_dir=data_dir, retention_s=3.0, purge_interval_s=0.2, sync_timeout_s=1.0,
                        cancel_poll_s=0.05)
    checkpoints = {"sd1.5-scifi": tiny_checkpoints["sd1.5-scifi"], "sd1.5-img2img": tiny_checkpoints["sd1.5-img2img"],
                   "segmind-vega": data_dir / "no-such-checkpoint"}
    backend = HoldingBackend(EngineBackend(checkpoints))
    with ServerThread(create_app(settings, backend)) as server:
        server.settings = settings
        server.backend = backend
        yield server


def test_sync_timeout_is_504_and_cancels_the_job(tight_api):
    backend = tight_api.backend
    with httpx.Client(base_url=tight_api.url, timeout=120) as client:
        # The held request never finishes on its own: the 1 s sync timeout fires by construction.
        response = client.post("/v1/sd1.5-scifi", json={"prompt": HOLD})
        assert response.status_code == 504 and "timed out" in response.json()["error"]
        request_id = response.headers["x-request-id"]
        body = wait_status(client, request_id, {"FAILED"}, timeout=60)
        assert body["error"].startswith("timed out") and "sync" in body["error"]
        wait_for(lambda: request_id in backend.cancelled, "the timed-out job's generation was cancelled")


def test_a_disconnected_sync_client_cancels_its_job(tight_api):
    cancelled_before = len(tight_api.backend.cancelled)
    with httpx.Client(base_url=tight_api.url) as client:
        with pytest.raises(httpx.TimeoutException):
            client.post("/v1/sd1.5-scifi", json={"prompt": HOLD}, timeout=0.3)
        wait_for(lambda: len(tight_api.backend.cancelled) > cancelled_before, "the abandoned generation was cancelled")
        deadline = time.monotonic() + 60
        while 'reason="client_gone",slug="sd1.5-scifi"} 1.0' not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the abandoned job was not cancelled"
            time.sleep(0.1)
        assert 'diffserve_jobs{status="PROCESSING"} 0.0' in client.get("/metrics").text


def test_unavailable_model_is_502_sync_and_failed_async(tight_api):
    with httpx.Client(base_url=tight_api.url, timeout=120) as client:
        response = client.post("/v1/segmind-vega", json={"prompt": "x"})
        assert response.status_code == 502 and "unavailable" in response.json()["error"]
        # A catalog model this server has no checkpoint for is a 404 before anything is queued.
        unserved = client.post("/v1/ominicontrol", json={"prompt": "x"})
        assert unserved.status_code == 404 and "not served" in unserved.json()["error"]
        assert "x-remaining-credits" not in response.headers
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["backend"]["segmind-vega"] is False
    sdk = SegmindClient(base_url=f"{tight_api.url}/v1")  # open server: no key needed
    with pytest.raises(InferenceFailed) as info:
        sdk.run("segmind-vega", prompt="x")
    assert "unavailable" in info.value.detail and info.value.status_body["status"] == "FAILED"
    sdk._client.close()


def test_expired_results_are_404_and_their_files_deleted(tight_api):
    with httpx.Client(base_url=tight_api.url, timeout=120) as client:
        request_id = client.post("/v2/sd1.5-img2img", json=cheap_img2img()).json()["request_id"]
        wait_status(client, request_id, {"COMPLETED"})
        result = client.get(f"/v2/requests/{request_id}").json()
        output_dir = tight_api.settings.outputs_dir / request_id
        assert output_dir.is_dir() and client.get(result["output"][0]).status_code == 200
        deadline = time.monotonic() + 30
        while output_dir.exists():
            assert time.monotonic() < deadline, "expired outputs were not deleted"
            time.sleep(0.1)
        for path in (f"/v2/requests/{request_id}", f"/v2/requests/{request_id}/status"):
            gone = client.get(path)
            assert gone.status_code == 404 and "expired" in gone.json()["error"]
        assert client.get(result["output"][0]).status_code == 404


def _files_outside(root: Path, inside: Path) -> dict[str, int]:
    """Files under ``root`` but not under ``inside``, with their modification times. The stores of
    the other servers in this session are left out: their idle SQLite databases and the Redis
    servers' append-only files and logs change on their own schedule (appendfsync everysec)."""
    found = {}
    for path in root.rglob("*"):
        if not path.is_file() or inside in path.parents or ".sqlite" in path.name:
            continue
        if path.parent.name == "appendonlydir" or path.name == "redis.log":
            continue
        found[str(path)] = path.stat().st_mtime_ns
    return found


def test_storage_stays_inside_the_data_dir(tight_api):
    data_dir = Path(tight_api.settings.data_dir).resolve()
    parent = data_dir.parent  # pytest's base temp dir: every other server's data, DIFFSERVE_HOME, checkpoints
    cwd = Path.cwd()
    before, cwd_before = _files_outside(parent, data_dir), {p.name for p in cwd.iterdir()}
    with httpx.Client(base_url=tight_api.url, timeout=120) as client:
        # An async img2img job stores its input, then writes its output, then deletes the input.
        request_id = client.post("/v2/sd1.5-img2img", json=cheap_img2img()).json()["request_id"]
        wait_status(client, request_id, {"COMPLETED"})
        output = client.get(f"/v2/requests/{request_id}").json()["output"][0]
        assert client.get(output).status_code == 200
        # Hostile output names and ids reach nothing outside the outputs of that request.
        for path in (f"/v2/requests/{request_id}/outputs/..%2F..%2Fjobs.sqlite",
                     f"/v2/requests/{request_id}/outputs/%2e%2e", f"/v2/requests/..%2F{request_id}/outputs/0.jpg"):
            assert client.get(path).status_code == 404, path
    assert _files_outside(parent, data_dir) == before  # nothing created or changed outside the data dir
    assert {p.name for p in cwd.iterdir()} == cwd_before  # nor in the working directory (no relative var/)
    assert {"jobs.sqlite", "outputs"} <= {p.name for p in data_dir.iterdir()}
    assert (data_dir / "outputs" / request_id).is_dir()
    # The job's input lived in the job database and was deleted when it finished.
    assert tight_api.server.config.app.state.diffserve.store.read_inputs(request_id) == {}


# -- real failures: a broken deployment, a faceless portrait, a job past its deadline -------------


@pytest.fixture(scope="module")
def faulty_api(tiny_checkpoints, tmp_path_factory):
    """An open server whose sd1.5-scifi checkpoint is broken the way a bad deployment is: its
    tokenizer pads to 100 tokens, the text encoder has 77 positions (it loads, then every request
    fails inside the model). Jobs may run 5 s; absolute URLs use ``public_url``."""
    import shutil

    broken = tmp_path_factory.mktemp("broken") / "sd15"
    shutil.copytree(tiny_checkpoints["sd1.5-scifi"], broken)
    config = broken / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": 100}))
    settings = Settings(data_dir=tmp_path_factory.mktemp("faulty-api-data"), job_timeout_s=5.0,
                        cancel_poll_s=0.05, public_url="https://images.example.com/")
    checkpoints = {"sd1.5-scifi": broken, "sd1.5-img2img": tiny_checkpoints["sd1.5-img2img"],
                   "omni-zero": tiny_checkpoints["omni-zero"]}
    backend = HoldingBackend(EngineBackend(checkpoints))
    with ServerThread(create_app(settings, backend)) as server:
        server.backend = backend
        yield server


def faceless_omni_zero(**overrides) -> dict:
    portrait = base64.b64encode(jpeg_bytes((96, 128), (40, 120, 200))).decode()  # flat blue: no face
    return {"prompt": "A person", "identity_image": portrait, "style_image": portrait, "base_image": portrait,
            "number_of_steps": 2, **overrides}


def test_failures_map_to_status_codes_and_reasons(faulty_api):
    with httpx.Client(base_url=faulty_api.url, timeout=120) as client:
        faceless = client.post("/v1/omni-zero", json=faceless_omni_zero())
        assert faceless.status_code == 400 and "no face" in faceless.json()["error"].lower(), faceless.text
        broken = client.post("/v1/sd1.5-scifi", json={"prompt": "x"})
        assert broken.status_code == 500 and broken.json()["error"] == "generation failed: ValueError", broken.text
        assert "max_position_embeddings" not in broken.text  # details stay in the server log
        # A held request never finishes on its own: the 5 s job timeout fires by construction.
        slow = client.post("/v1/sd1.5-img2img", json=cheap_img2img(prompt=HOLD))
        assert slow.status_code == 504 and "took longer than 5 s" in slow.json()["error"], slow.status_code
        slow_id = slow.headers["x-request-id"]
        wait_for(lambda: slow_id in faulty_api.backend.cancelled, "the job past its deadline was cancelled")
        request_id = client.post("/v2/omni-zero", json=faceless_omni_zero()).json()["request_id"]
        failed = wait_status(client, request_id, {"FAILED"})
        assert "no face" in failed["error"].lower()
        assert client.get(f"/v2/requests/{request_id}").status_code == 422
        metrics = client.get("/metrics").text
        for reason, slug in (("input_rejected", "omni-zero"), ("generation_failed", "sd1.5-scifi"),
                             ("timeout", "sd1.5-img2img")):
            assert f'reason="{reason}",slug="{slug}"' in metrics, reason


def test_absolute_urls_use_the_public_url(faulty_api):
    with httpx.Client(base_url=faulty_api.url, timeout=120) as client:
        submitted = client.post("/v2/sd1.5-img2img", json=cheap_img2img(base64=False)).json()
        request_id = submitted["request_id"]
        assert submitted["status_url"] == f"https://images.example.com/v2/requests/{request_id}/status"
        wait_status(client, request_id, {"COMPLETED"})
        [url] = client.get(f"/v2/requests/{request_id}").json()["output"]
        assert url == f"https://images.example.com/v2/requests/{request_id}/outputs/0.jpg"
        assert client.get(httpx.URL(url).path).headers["content-type"] == "image/jpeg"
