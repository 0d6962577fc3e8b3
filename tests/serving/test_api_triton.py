"""The HTTP API in front of a real Triton server: the official SDK end to end on every slug's
seed example, ominicontrol's output formats, and Triton going away mid-job (the job fails
clearly, the API stays up and reports not ready, and recovers). The Triton server is the
session's shared one (``triton`` in conftest); the API runs as a ``diffserve serve`` process."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import PIL.Image
import pytest
from segmind import InferenceFailed, SegmindClient

from diffserve.engine.tiny.demo import DEMO_PARAMS
from diffserve.engine.catalog import CATALOG, get_model
from diffserve.engine.imageio import CONTENT_TYPES
from diffserve.engine.models.omni_zero.tiny import write_demo_inputs
from diffserve.engine.processes import ChildProcess
from tests.serving.processes import start_cli

pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


KEY = "triton-e2e-key"
SLUGS = list(CATALOG)

SEED_PAYLOADS = {  # the seed pages' examples; the img2img input URL points at a loopback server
    "sd1.5-scifi": {
        "prompt": "futuristic sci-fi high-tech city of Atlantis in late afternoon light, wispy clouds in a blue sky",
        "negative_prompt": "blurry, blurred, amateur, ugly, low quality, sketch, low resolution, warped, crooked, "
                           "deformed, cartoony, low detail",
        "scheduler": "dpmpp_2m", "num_inference_steps": 30, "guidance_scale": 5, "samples": 1,
        "seed": 516797155652, "img_width": 512, "img_height": 768, "base64": False},
    "sd1.5-img2img": {
        "image": "{url}/sd-img2img-input.jpeg", "samples": 1, "prompt": "A fantasy landscape, trending on artstation, mystical sky",
        "negative_prompt": "nude, disfigured, blurry", "scheduler": "DDIM", "num_inference_steps": 25,
        "guidance_scale": 10.5, "strength": 0.75, "seed": 98877465625, "img_width": 512, "img_height": 512,
        "base64": False},
    "segmind-vega": {
        "prompt": "cinematic photo detailed closeup portrait of a Beautiful cyberpunk woman, robotic parts",
        "negative_prompt": "(worst quality, low quality)", "samples": 1, "scheduler": "UniPC",
        "num_inference_steps": 25, "guidance_scale": 9, "seed": 1232788698, "img_width": 1024,
        "img_height": 1024, "base64": False},
    # The seed pages' examples with their image URLs on the loopback server (diffserve.engine.tiny.demo.DEMO_PARAMS).
    "omni-zero": {k: {"<omni-base>": "{url}/omni-zero-base.png", "<omni-style>": "{url}/omni-zero-style.png",
                      "<omni-identity>": "{url}/omni-zero-identity.png"}.get(v, v) if isinstance(v, str) else v
                  for k, v in DEMO_PARAMS["omni-zero"].items()},
    "ominicontrol": DEMO_PARAMS["ominicontrol"] | {"image": "{url}/sd-img2img-input.jpeg"},
}
EXPECTED_SIZE = {"omni-zero": (768, 1024), "ominicontrol": (512, 512)}
"""(width, height) of the outputs of slugs without img_width/img_height: the 96x128 portraits fit
within 1024 keeping their aspect ratio; OminiControl renders 512x512."""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_url(tmp_path_factory):
    """Base URL of a loopback server holding the seed examples' input images (local stand-ins)."""
    root = tmp_path_factory.mktemp("images")
    PIL.Image.new("RGB", (512, 512), (40, 120, 200)).save(root / "sd-img2img-input.jpeg", format="JPEG")
    write_demo_inputs(root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def start_api(triton, repository: Path, data_dir: Path, **env: str) -> tuple[ChildProcess, str]:
    """``diffserve serve --backend triton`` on the shared Triton server; returns (process, URL)."""
    log = data_dir / "api.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    return start_cli(["serve", "--backend", "triton", "--repository", str(repository), "--triton-url",
                      triton.grpc_url, "--port", "0", "--data-dir", str(data_dir), "--api-key", KEY], log,
                     env={"DIFFSERVE_IMAGE_ALLOW_NETWORKS": "127.0.0.1/32", "DIFFSERVE_CANCEL_POLL_S": "0.05", **env})


def stop_api(proc: ChildProcess) -> None:
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    proc.kill()  # what is left of its group


@pytest.fixture(scope="module")
def api(triton, demo_repository, tmp_path_factory):
    proc, url = start_api(triton, demo_repository.repository, tmp_path_factory.mktemp("api-data"))
    yield url
    stop_api(proc)


@pytest.fixture()
def sdk(api):
    client = SegmindClient(api_key=KEY, base_url=f"{api}/v1")
    yield client
    close = getattr(getattr(client, "_client", None), "close", None)
    if close:
        close()


def payload(slug: str, image_url: str) -> dict:
    return {k: (v.format(url=image_url) if isinstance(v, str) and "{url}" in v else v)
            for k, v in SEED_PAYLOADS[slug].items()}


@pytest.mark.parametrize("slug", SLUGS)
def test_official_sdk_against_triton(slug, sdk, api, image_url):
    body = payload(slug, image_url)
    spec = get_model(slug)
    content_type = CONTENT_TYPES[body.get("image_format", spec.output_format)]
    response = sdk.run_sync(slug, **body)
    assert response.status_code == 200 and response.headers["content-type"] == content_type
    with PIL.Image.open(io.BytesIO(response.content)) as im:
        assert im.size == EXPECTED_SIZE.get(slug, (body.get("img_width"), body.get("img_height")))
    assert response.headers["x-remaining-credits"]

    result = sdk.run(slug, **body)
    assert result["status"] == "COMPLETED" and result["metrics"]["inference_time"] > 0
    image = httpx.get(result["output"][0], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == content_type
    # same seed, same parameters, same runtime: the same picture through /v1 and /v2
    assert image.content == response.content

    job = sdk.submit_async(slug, **body)
    assert job.request_id
    assert job.wait(timeout=600, interval=0.5)["status"] == "COMPLETED"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_ominicontrol_output_follows_image_format_through_v1_and_v2(fmt, api, image_url):
    body = payload("ominicontrol", image_url) | {"image_format": fmt, "image_quality": 60, "steps": 4}
    with httpx.Client(base_url=api, headers={"x-api-key": KEY}, timeout=300) as client:
        sync = client.post("/v1/ominicontrol", json=body)
        assert sync.status_code == 200 and sync.headers["content-type"] == CONTENT_TYPES[fmt]
        with PIL.Image.open(io.BytesIO(sync.content)) as im:
            assert im.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt] and im.size == (512, 512)
        encoded = client.post("/v1/ominicontrol", json=body | {"base64": True})
        assert encoded.headers["content-type"] == "application/json"
        assert base64.b64decode(encoded.json()["image"]) == sync.content
        job = client.post("/v2/ominicontrol", json=body).json()
        deadline = time.monotonic() + 300
        while (status := client.get(job["status_url"]).json())["status"] not in ("COMPLETED", "FAILED"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        [url] = client.get(job["response_url"]).json()["output"]
        assert url.endswith("." + {"jpeg": "jpg"}.get(fmt, fmt))
        served = client.get(url)
        assert served.headers["content-type"] == CONTENT_TYPES[fmt] and served.content == sync.content


def test_omni_zero_errors_through_triton(api, image_url):
    body = payload("omni-zero", image_url)
    with httpx.Client(base_url=api, headers={"x-api-key": KEY}, timeout=300) as client:
        for name in ("base_image_strength", "identity_image_strength", "style_image_strength",
                     "composition_image_strength", "depth_image_strength"):
            for bad in (-0.1, 1.5):
                response = client.post("/v1/omni-zero", json=body | {name: bad})
                assert response.status_code == 400 and name in response.json()["error"], (name, bad)
        # A portrait without a face is the pipeline model's INVALID_ARG: a 400 that says so.
        faceless = client.post("/v1/omni-zero", json=body | {"identity_image": f"{image_url}/sd-img2img-input.jpeg",
                                                              "number_of_steps": 2})
        assert faceless.status_code == 400 and "face" in faceless.json()["error"].lower()


@pytest.fixture(scope="module")
def holding_triton(tmp_path_factory):
    """A Triton server whose ``sd1.5-scifi`` pipeline model (the real pipeline model's config) holds
    every request until Triton cancels it (``holding_pipeline_model.py``)."""
    from diffserve.export.repository import RepositoryOptions, pipeline_config
    from diffserve.triton_serving.manifest import MANIFEST
    from diffserve.triton_serving.server import TritonServer, TritonServerConfig
    from diffserve.triton_serving.stub_params import PipelineModelParams

    repo = tmp_path_factory.mktemp("holding-repository")
    params = PipelineModelParams(slug="sd1.5-scifi", mode="fused", checkpoint="", fused_runtime="torch")
    (repo / "sd1.5-scifi" / "1").mkdir(parents=True)
    (repo / "sd1.5-scifi" / "config.pbtxt").write_text(
        pipeline_config("sd1.5-scifi", params, RepositoryOptions(modes=("fused",))))
    (repo / "sd1.5-scifi" / "1" / "model.py").write_text(
        (Path(__file__).parent / "holding_pipeline_model.py").read_text())
    (repo / MANIFEST).write_text(json.dumps({"pipelines": {"sd1.5-scifi": {
        "slug": "sd1.5-scifi", "mode": "fused", "default": True, "depends_on": [], "devices": ["cpu"]}},
        "components": {}, "unavailable": {}}))
    server = TritonServer(TritonServerConfig(repository=repo, log_file=repo.parent / "holding-triton.log",
                                             exit_timeout_s=5))
    server.start()
    yield server, repo
    server.stop()


def test_triton_deadline_is_a_504_and_triton_cancels_the_request(holding_triton, tmp_path):
    server, repo = holding_triton
    model_dir = repo / "sd1.5-scifi"
    proc, url = start_api(server, repo, tmp_path / "data", DIFFSERVE_TRITON_TIMEOUT_S="1")
    try:
        with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=120) as client:
            # The pipeline model holds the request until Triton cancels it: only the deadline ends it.
            response = client.post("/v1/sd1.5-scifi", json={"prompt": "held", "num_inference_steps": 20})
            assert response.status_code == 504 and "did not answer in time" in response.json()["error"]
            assert [p.name for p in model_dir.glob("received-*")] == ["received-0"]  # reached the model once
            deadline = time.monotonic() + 60  # bounds a hang only
            while not list(model_dir.glob("cancelled-*")):
                assert time.monotonic() < deadline, "Triton never told the model its request was cancelled"
                time.sleep(0.05)
            assert client.get("/readyz").status_code == 200  # a slow request is not an outage
            metrics = client.get("/metrics").text
            assert 'reason="backend_timeout",slug="sd1.5-scifi"' in metrics
    finally:
        stop_api(proc)


def test_triton_stopping_mid_job_fails_the_job_and_the_api_recovers(api, triton, sdk):
    server = triton
    headers = {"x-api-key": KEY}
    with httpx.Client(base_url=api, headers=headers, timeout=60) as client:
        job = client.post("/v2/sd1.5-scifi", json={"prompt": "long", "num_inference_steps": 100, "seed": 1}).json()
        deadline = time.monotonic() + 300
        while client.get(job["status_url"]).json().get("progress", {}).get("step", 0) < 2:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        # Triton goes away without a drain (no grace: SIGTERM, then SIGKILL of its process group at once),
        # so the job in flight fails whatever the host's speed; a graceful stop lets a short job finish
        # inside Triton's exit timeout.
        server.stop(timeout=0)
        try:
            while (status := client.get(job["status_url"])).json()["status"] not in ("FAILED", "COMPLETED"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert status.status_code == 422 and status.json()["status"] == "FAILED"
            assert "unavailable" in status.json()["error"].lower()
            with pytest.raises(InferenceFailed):
                sdk.run("sd1.5-scifi", prompt="while triton is down")
            assert client.get("/healthz").status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503
        finally:
            server.start()  # the same ports: the API's Triton URL is still right (and the next tests' server)
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the API did not see Triton come back"
            time.sleep(0.5)
        result = sdk.run("sd1.5-scifi", prompt="after the restart", seed=7)
        assert result["status"] == "COMPLETED"
