"""Scale-out over Redis, every server a real process on loopback: one ``redis-server``, two API
replicas (``diffserve serve --role api``) and two workers (``diffserve worker``), each worker
with its own Triton server over a repository holding only ``sd1.5-scifi`` (fused), to bound
memory. The official SDK through either replica; a job submitted on one replica and polled,
fetched and cancelled on the other; a worker killed with SIGKILL mid-job (its job finishes on
the other worker, once, charged once, with the delivery count in its metrics); a job's events
streamed by the other replica; Redis stopped under load (503s, never a 500) and started again
(accepted jobs complete, new ones succeed).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from segmind import SegmindClient

from tests.redis_server import RedisServer
from tests.serving.processes import start_cli

pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


KEY = "scale-out-key"
SLUG = "sd1.5-scifi"
CREDITS = 1000
NAMESPACE = "diffserve"
QUICK = {"prompt": "a city", "num_inference_steps": 20, "img_width": 512, "img_height": 512, "seed": 11}
SLOW = {"prompt": "a long one", "num_inference_steps": 100, "samples": 4, "img_width": 512, "img_height": 768,
        "seed": 5}  # ~15 s on 2 CPU cores with the tiny UNet: long enough to act on mid-job
ENV = {"DIFFSERVE_RECLAIM_IDLE_S": "2", "DIFFSERVE_REQUEST_MAX_ATTEMPTS": "3", "DIFFSERVE_CANCEL_POLL_S": "0.05",
       "DIFFSERVE_API_KEYS": KEY, "DIFFSERVE_CREDITS": str(CREDITS), "DIFFSERVE_PURGE_INTERVAL_S": "1",
       "DIFFSERVE_EVENTS_POLL_S": "0.05"}


class Proc:
    """A ``diffserve`` sub-command as a process; ``url`` is what it printed when ready."""

    def __init__(self, args: list[str], log: Path, ready_marker: str, url_after: str):
        self.log = log
        self.proc, self.url = start_cli(args, log, env=ENV, ready=ready_marker, url_after=url_after)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.stop(60)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    from diffserve.export.repository import build_demo_repository

    return build_demo_repository(tmp_path_factory.mktemp("scale-repo") / "repo", slugs=(SLUG,),
                                 modes=("fused",)).repository


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("scale-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tritons(repository, tmp_path_factory):
    from diffserve.triton_serving.server import TritonServer, TritonServerConfig

    logs = tmp_path_factory.mktemp("scale-triton")
    servers = [TritonServer(TritonServerConfig(repository=repository, log_file=logs / f"triton-{i}.log",
                                               startup_timeout_s=600, exit_timeout_s=5)) for i in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def start_worker(index: int, triton, repository: Path, redis_url: str, data_dir: Path) -> Proc:
    """Worker 0 reads its slugs from the repository's manifest, worker 1 from its Triton's model index."""
    manifest = ["--repository", str(repository)] if index == 0 else []
    return Proc(["worker", "--triton-url", triton.grpc_url, *manifest, "--redis-url", redis_url,
                 "--health-port", "0", "--data-dir", str(data_dir)], data_dir / "worker.log",
                "diffserve worker ready", "health at")


@pytest.fixture(scope="module")
def cluster(tritons, repository, redis_proc, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-procs")
    procs = {}
    try:
        for i in range(2):
            procs[f"worker{i}"] = start_worker(i, tritons[i], repository, redis_proc.url, root / f"worker{i}")
        for i in range(2):
            procs[f"api{i}"] = Proc(["serve", "--role", "api", "--redis-url", redis_proc.url, "--port", "0",
                                     "--data-dir", str(root / f"api{i}")], root / f"api{i}" / "api.log",
                                    "ready at", "ready at")
        procs["root"] = root
        yield procs
    finally:
        for name, proc in procs.items():
            if isinstance(proc, Proc):
                proc.stop()


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=120)


def wait_status(http: httpx.Client, request_id: str, want: set[str], timeout: float = 180.0,
                progress: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v2/requests/{request_id}/status")
        assert response.status_code != 500, response.text
        body = response.json()
        if body.get("status") in want and (not progress or body.get("progress", {}).get("step", 0) >= 1):
            return body
        assert time.monotonic() < deadline, f"{request_id} stuck in {body}"
        time.sleep(0.05)


def test_sdk_run_run_sync_and_submit_async_through_either_replica(cluster):
    for name in ("api0", "api1"):
        sdk = SegmindClient(base_url=f"{cluster[name].url}/v1", api_key=KEY, timeout=180)
        try:
            response = sdk.run_sync(SLUG, **QUICK)
            assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg", name
            assert response.content[:2] == b"\xff\xd8"
            result = sdk.run(SLUG, **QUICK)
            assert result["status"] == "COMPLETED", (name, result)
            image = httpx.get(result["output"][0], timeout=30)
            assert image.status_code == 200 and image.content == response.content  # same seed, same image
            done = sdk.submit_async(SLUG, **QUICK).wait(timeout=180, interval=0.2)
            assert done["status"] == "COMPLETED", (name, done)
        finally:
            sdk._client.close()
    for name in ("api0", "api1"):
        ready = httpx.get(f"{cluster[name].url}/readyz")
        assert ready.status_code == 200 and ready.json()["backend"]["redis"] is True, ready.text
        assert ready.json()["models"] == [SLUG]
    for name in ("worker0", "worker1"):
        ready = httpx.get(f"{cluster[name].url}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["backend"]["redis"] is True and ready.json()["backend"][SLUG] is True


def test_a_job_submitted_on_one_replica_is_polled_fetched_and_cancelled_on_the_other(cluster):
    with client(cluster["api0"].url) as a, client(cluster["api1"].url) as b:
        submitted = a.post(f"/v2/{SLUG}", json=QUICK)
        assert submitted.status_code == 200, submitted.text
        request_id = submitted.json()["request_id"]
        wait_status(b, request_id, {"COMPLETED"})
        result = b.get(f"/v2/requests/{request_id}")
        assert result.status_code == 200 and result.json()["metrics"]["deliveries"] == 1
        [url] = result.json()["output"]
        assert url.startswith(cluster["api1"].url)
        image = b.get(httpx.URL(url).path)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert a.get(httpx.URL(url).path).content == image.content

        slow = a.post(f"/v2/{SLUG}", json=SLOW).json()["request_id"]
        wait_status(b, slow, {"PROCESSING"}, progress=True)
        cancelled = b.post(f"/v2/requests/{slow}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        failed = wait_status(a, slow, {"FAILED"}, timeout=60)
        assert failed["error"] == "cancelled by client"
        assert b.get(f"/v2/requests/{slow}").status_code == 422


def test_events_stream_progress_and_the_result_through_the_other_replica(cluster):
    from httpx_sse import connect_sse

    with client(cluster["api0"].url) as a, client(cluster["api1"].url) as b:
        request_id = a.post(f"/v2/{SLUG}", json=SLOW).json()["request_id"]  # long enough to report steps
        with connect_sse(b, "GET", f"/v2/requests/{request_id}/events") as source:
            assert source.response.status_code == 200
            events = [(e.event, json.loads(e.data)) for e in source.iter_sse() if e.data]
        result = b.get(f"/v2/requests/{request_id}").json()
    names = [name for name, _ in events]
    assert names[-1] == "completed" and set(names) <= {"queued", "progress", "completed"}, names
    steps = [data["progress"]["step"] for name, data in events if name == "progress" and "progress" in data]
    assert steps and steps == sorted(steps) and steps[-1] <= 100, steps  # written by a worker, read by api1
    assert events[-1][1] == result and result["output"][0].startswith(cluster["api1"].url)


def _credits_left(http: httpx.Client, request_id: str) -> int:
    return int(http.get(f"/v2/requests/{request_id}/status").headers["x-remaining-credits"])


def test_a_worker_killed_mid_job_finishes_on_the_other_once_and_is_charged_once(cluster, redis_proc, tritons,
                                                                                repository):
    store = redis.Redis.from_url(redis_proc.url)
    with client(cluster["api0"].url) as a, client(cluster["api1"].url) as b:
        request_id = a.post(f"/v2/{SLUG}", json=SLOW).json()["request_id"]
        wait_status(b, request_id, {"PROCESSING"}, progress=True)
        before = _credits_left(a, request_id)  # 4 reserved while it runs
        consumer = store.hget(f"{{{NAMESPACE}}}:job:{request_id}", "worker").decode()
        victim = next(name for name in ("worker0", "worker1") if f"-{cluster[name].pid}-" in consumer)
        survivor = "worker1" if victim == "worker0" else "worker0"
        cluster[victim].proc.signal(signal.SIGKILL)
        cluster[victim].proc.wait(10)

        done = wait_status(b, request_id, {"COMPLETED", "FAILED"}, timeout=240)
        assert done["status"] == "COMPLETED", done
        result = a.get(f"/v2/requests/{request_id}").json()
        assert result["metrics"]["deliveries"] == 2 and len(result["output"]) == 4
        record = store.hgetall(f"{{{NAMESPACE}}}:job:{request_id}")
        assert f"-{cluster[survivor].pid}-".encode() in record[b"worker"]
        # One outcome: listed once among the completed, nothing left pending in the stream.
        assert store.zscore(f"{{{NAMESPACE}}}:finished:COMPLETED", request_id) is not None
        assert store.zscore(f"{{{NAMESPACE}}}:finished:FAILED", request_id) is None
        assert store.xpending(f"{{{NAMESPACE}}}:queue:{SLUG}", "workers")["pending"] == 0
        # Charged once: the 4 reserved credits became a debit of 4, no more.
        assert _credits_left(a, request_id) == before
        assert store.get(f"{{{NAMESPACE}}}:credits:settled:{request_id}") == b"1"  # settled as a debit
    store.close()
    # A replacement worker on the killed one's Triton, for the tests after this one.
    index = 0 if victim == "worker0" else 1
    cluster[victim] = start_worker(index, tritons[index], repository, redis_proc.url, cluster["root"] / f"{victim}-again")


def test_redis_stopped_under_load_is_503_then_service_resumes(cluster, redis_proc):
    with client(cluster["api0"].url) as a, client(cluster["api1"].url) as b:
        accepted = [http.post(f"/v2/{SLUG}", json=QUICK | {"seed": i}).json()["request_id"]
                    for i, http in enumerate((a, b, a, b))]
        redis_proc.kill()
        codes = []
        for http in (a, b, a, b):
            for response in (http.post(f"/v2/{SLUG}", json=QUICK), http.post(f"/v1/{SLUG}", json=QUICK),
                             http.get(f"/v2/requests/{accepted[0]}/status"), http.get("/readyz")):
                codes.append(response.status_code)
                assert response.status_code == 503, (response.request.url, response.status_code, response.text)
                assert "error" in response.json() or response.json().get("backend", {}).get("redis") is False
        assert 500 not in codes
        assert httpx.get(f"{cluster['worker0'].url}/readyz").status_code == 503

        redis_proc.start()
        for i, request_id in enumerate(accepted):
            wait_status(a if i % 2 else b, request_id, {"COMPLETED"}, timeout=240)
        fresh = b.post(f"/v1/{SLUG}", json=QUICK)
        assert fresh.status_code == 200 and fresh.headers["content-type"] == "image/jpeg", fresh.text
        deadline = time.monotonic() + 30
        while httpx.get(f"{cluster['api0'].url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "api0 did not become ready again"
            time.sleep(0.2)
