"""The HTTP API in front of a real Triton server: the official SDK end to end, and Triton going
away mid-job (the job fails clearly, the API stays up and reports not ready, and recovers)."""

from __future__ import annotations

import functools
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import PIL.Image
import pytest
from segmind import InferenceFailed, SegmindClient

from api.triton_server import TritonServer, TritonServerConfig, find_free_port

REPO = Path(__file__).resolve().parents[1]
KEY = "triton-e2e-key"
SLUGS = ("sd1.5-scifi", "sd1.5-img2img", "segmind-vega")

SEED_PAYLOADS = {  # the seed pages' examples; the img2img input URL points at a loopback server
    "sd1.5-scifi": {
        "prompt": "futuristic sci-fi high-tech city of Atlantis in late afternoon light, wispy clouds in a blue sky",
        "negative_prompt": "blurry, blurred, amateur, ugly, low quality, sketch, low resolution, warped, crooked, "
                           "deformed, cartoony, low detail",
        "scheduler": "dpmpp_2m", "num_inference_steps": 30, "guidance_scale": 5, "samples": 1,
        "seed": 516797155652, "img_width": 512, "img_height": 768, "base64": False},
    "sd1.5-img2img": {
        "image": "{image_url}", "samples": 1, "prompt": "A fantasy landscape, trending on artstation, mystical sky",
        "negative_prompt": "nude, disfigured, blurry", "scheduler": "DDIM", "num_inference_steps": 25,
        "guidance_scale": 10.5, "strength": 0.75, "seed": 98877465625, "img_width": 512, "img_height": 512,
        "base64": False},
    "segmind-vega": {
        "prompt": "cinematic photo detailed closeup portrait of a Beautiful cyberpunk woman, robotic parts",
        "negative_prompt": "(worst quality, low quality)", "samples": 1, "scheduler": "UniPC",
        "num_inference_steps": 25, "guidance_scale": 9, "seed": 1232788698, "img_width": 1024,
        "img_height": 1024, "base64": False},
}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    PIL.Image.new("RGB", (512, 512), (40, 120, 200)).save(root / "sd-img2img-input.jpeg", format="JPEG")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/sd-img2img-input.jpeg"
    server.shutdown()


@pytest.fixture(scope="module")
def repository(tmp_path_factory, tiny_checkpoints):
    from export.repository import RepositoryOptions, build_repository, demo_deployments

    deployments = [d for d in demo_deployments(tiny_checkpoints) if d.slug in SLUGS]
    repo = tmp_path_factory.mktemp("api-repository")
    build_repository(repo, deployments, RepositoryOptions(modes=("bls",), pipeline_instances=1))
    return repo


@pytest.fixture(scope="module")
def triton_config(repository, tmp_path_factory):
    config = TritonServerConfig(repository=repository, startup_timeout_s=600, http_port=find_free_port(),
                                grpc_port=find_free_port(), metrics_port=find_free_port(),
                                log_file=tmp_path_factory.mktemp("triton") / "triton.log")
    # Ports are fixed in the config, so a restarted server comes back on the same addresses.
    return {"config": config, "server": TritonServer(config)}


@pytest.fixture(scope="module")
def api(triton_config, repository, tmp_path_factory):
    server = triton_config["server"]
    server.start()
    data_dir = tmp_path_factory.mktemp("api-data")
    log = data_dir / "api.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--backend", "triton", "--repository", str(repository),
         "--triton-url", server.grpc_url, "--port", "0", "--data-dir", str(data_dir), "--api-key", KEY],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True,
        env=dict(os.environ, DIFFSERVE_IMAGE_ALLOW_NETWORKS="127.0.0.1/32", DIFFSERVE_CANCEL_POLL_S="0.05"),
    )
    url = None
    for line in proc.stdout:
        if "ready at" in line:
            url = line.split("ready at", 1)[1].split()[0]
            break
    assert url, f"API did not start:\n{log.read_text()[-3000:]}"
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    triton_config["server"].stop()


@pytest.fixture()
def sdk(api):
    client = SegmindClient(api_key=KEY, base_url=f"{api}/v1")
    yield client
    close = getattr(getattr(client, "_client", None), "close", None)
    if close:
        close()


def payload(slug: str, image_url: str) -> dict:
    return {k: (v.format(image_url=image_url) if isinstance(v, str) and "{image_url}" in v else v)
            for k, v in SEED_PAYLOADS[slug].items()}


@pytest.mark.parametrize("slug", SLUGS)
def test_official_sdk_against_triton(slug, sdk, api, image_url):
    body = payload(slug, image_url)
    response = sdk.run_sync(slug, **body)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    width, height = body["img_width"], body["img_height"]
    with PIL.Image.open(io.BytesIO(response.content)) as im:
        assert im.size == (width, height)
    assert response.headers["x-remaining-credits"]

    result = sdk.run(slug, **body)
    assert result["status"] == "COMPLETED" and result["metrics"]["inference_time"] > 0
    image = httpx.get(result["output"][0], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    # same seed, same parameters, same runtime: the same picture through /v1 and /v2
    assert image.content == response.content

    job = sdk.submit_async(slug, **body)
    assert job.request_id
    assert job.wait(timeout=600, interval=0.5)["status"] == "COMPLETED"


def test_triton_stopping_mid_job_fails_the_job_and_the_api_recovers(api, triton_config, sdk):
    server = triton_config["server"]
    headers = {"x-api-key": KEY}
    with httpx.Client(base_url=api, headers=headers, timeout=60) as client:
        job = client.post("/v2/sd1.5-scifi", json={"prompt": "long", "num_inference_steps": 100, "seed": 1}).json()
        deadline = time.monotonic() + 300
        while client.get(job["status_url"]).json().get("progress", {}).get("step", 0) < 2:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        server.stop()
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

        triton_config["server"] = TritonServer(triton_config["config"])
        triton_config["server"].start()
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the API did not see Triton come back"
            time.sleep(0.5)
        result = sdk.run("sd1.5-scifi", prompt="after the restart", seed=7)
        assert result["status"] == "COMPLETED"
