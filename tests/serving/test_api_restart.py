"""``diffserve serve`` in front of Triton as a process: kill -9 with work queued, restart on the
same data dir, and every accepted request still reaches a terminal state; SIGTERM shuts down
cleanly. Triton (the session's shared server) keeps running while the API dies."""

from __future__ import annotations

import base64
import io
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import PIL.Image
import pytest

from diffserve.engine.processes import ChildProcess
from tests.serving.processes import start_cli

pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


KEY = "restart-key"


def start_server(data_dir: Path, log: Path, triton, repository: Path) -> tuple[ChildProcess, str]:
    # the CLI prints one line when the server is ready
    return start_cli(["serve", "--backend", "triton", "--triton-url", triton.grpc_url, "--repository",
                      str(repository), "--port", "0", "--data-dir", str(data_dir), "--api-key", KEY], log,
                     env={"DIFFSERVE_CANCEL_POLL_S": "0.05"}, timeout_s=180)


def image_b64() -> str:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (80, 60), (10, 200, 90)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_kill_9_then_restart_finishes_every_accepted_request(tmp_path, triton, demo_repository):
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    repository = demo_repository.repository
    proc, url = start_server(data_dir, log, triton, repository)
    headers = {"x-api-key": KEY}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            submitted = [
                client.post("/v2/sd1.5-scifi", json={"prompt": "first", "seed": 1}),
                client.post("/v2/sd1.5-img2img", json={"image": image_b64(), "prompt": "b", "strength": 0.2}),
                client.post("/v2/sd1.5-img2img", json={"image": image_b64(), "prompt": "c", "strength": 0.1,
                                                        "seed": -1}),
                client.post("/v2/sd1.5-img2img", json={"image": image_b64(), "prompt": "d", "strength": 0.1,
                                                        "base64": True}),
            ]
            assert [r.status_code for r in submitted] == [200] * 4, [r.text for r in submitted]
            ids = [r.json()["request_id"] for r in submitted]
            # A sync request queued behind them: its client dies with the server.
            threading.Thread(target=lambda: _quiet_post(url, "/v1/sd1.5-img2img",
                                                        {"image": image_b64(), "prompt": "sync",
                                                         "strength": 0.1}),
                             daemon=True).start()
            deadline = time.monotonic() + 120
            while job_count(client) < 5:
                assert time.monotonic() < deadline, "the sync request was not queued"
                time.sleep(0.02)
            while True:
                first = client.get(f"/v2/requests/{ids[0]}/status").json()
                if first.get("progress", {}).get("step", 0) >= 1 or first["status"] == "COMPLETED":
                    break
                assert time.monotonic() < deadline, "the first job never started"
                time.sleep(0.02)
        proc.signal(signal.SIGKILL)
        proc.wait(30)

        proc, url = start_server(data_dir, log, triton, repository)
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            final = {}
            deadline = time.monotonic() + 240
            while len(final) < len(ids):
                for request_id in ids:
                    body = client.get(f"/v2/requests/{request_id}/status").json()
                    if body["status"] in ("COMPLETED", "FAILED"):
                        final[request_id] = body
                assert time.monotonic() < deadline, f"not terminal after restart: {set(ids) - set(final)}"
                time.sleep(0.1)
            assert all(b["status"] == "COMPLETED" for b in final.values()), final
            # The interrupted job ran again; img2img jobs found their stored input images.
            results = [client.get(f"/v2/requests/{request_id}").json() for request_id in ids]
            assert results[0]["seed"] == 1 and results[2]["seed"] != -1
            assert httpx.get(results[1]["output"][0]).headers["content-type"] == "image/jpeg"
            assert PIL.Image.open(io.BytesIO(base64.b64decode(results[3]["output"][0]))).size == (512, 512)

        # The sync job was not forgotten: nobody waits for it any more, so it FAILED.
        with sqlite3.connect(f"file:{data_dir / 'jobs.sqlite'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT status, error FROM jobs WHERE params LIKE '%\"_sync\": true%'").fetchall()
            left = db.execute("SELECT COUNT(*) FROM job_inputs").fetchone()[0]
        assert len(rows) == 1 and rows[0][0] == "FAILED" and "interrupted" in rows[0][1], rows
        assert left == 0, "inputs of finished jobs were left behind"

        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()  # SIGKILL to what is left of its group (nothing, once it has exited)


def job_count(client: httpx.Client) -> int:
    """Jobs in the store, whatever their state (from the ``diffserve_jobs`` gauge)."""
    lines = client.get("/metrics").text.splitlines()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("diffserve_jobs{")))


def _quiet_post(url: str, path: str, payload: dict) -> None:
    try:
        httpx.post(url + path, json=payload, headers={"x-api-key": KEY}, timeout=120)
    except httpx.HTTPError:
        pass  # the server is killed under it
