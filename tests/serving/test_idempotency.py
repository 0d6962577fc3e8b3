"""``Idempotency-Key`` end to end, every server a real process on loopback.

On Redis: two API replicas on one ``redis-server`` (``serve --demo --backend local``, which also
runs the jobs, and ``serve --role api``, which only queues). Retries with one key through either
replica get one request id, one job and one charge, also when they race; the key with another
body is refused with 422 by both. On SQLite: a key outlives a SIGKILL and restart of the server.
The same pair of replicas shows that a webhook accepted by the queue-only replica is delivered
once, though both replicas run a deliverer.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from diffserve.api.jobs import JobStore
from diffserve.api.webhooks import generate_secret
from tests.redis_server import redis_server  # noqa: F401 - fixture
from tests.serving.processes import ServeProcess
from tests.webhook_receiver import Receiver, verify

KEY = "idem-key"
CREDITS = 5
SLUG = "sd1.5-scifi"
QUICK = {"prompt": "a harbour", "num_inference_steps": 20, "img_width": 512, "img_height": 512, "seed": 3}
SECRET = generate_secret()
ENV = {"DIFFSERVE_API_KEYS": KEY, "DIFFSERVE_CREDITS": str(CREDITS), "DIFFSERVE_WEBHOOK_SECRET": SECRET,
       "DIFFSERVE_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8", "DIFFSERVE_WEBHOOK_POLL_S": "0.1"}


def post(url: str, body: dict, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v2/{SLUG}", json=body, headers={"x-api-key": KEY, "Idempotency-Key": key}, timeout=60)


def wait_completed(url: str, request_id: str) -> httpx.Response:
    deadline = time.monotonic() + 180
    while True:
        response = httpx.get(f"{url}/v2/requests/{request_id}/status", headers={"x-api-key": KEY}, timeout=60)
        if response.json()["status"] in ("COMPLETED", "FAILED"):
            assert response.json()["status"] == "COMPLETED", response.text
            return response
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)


def remaining(url: str, request_id: str) -> str:
    return wait_completed(url, request_id).headers["x-remaining-credits"]


@pytest.fixture(scope="module")
def replicas(redis_server, tmp_path_factory):  # noqa: F811 - the imported fixture
    namespace = f"idem-{uuid.uuid4().hex[:8]}"
    env = dict(ENV, DIFFSERVE_REDIS_NAMESPACE=namespace)
    root = tmp_path_factory.mktemp("idem-replicas")
    procs = []
    try:
        procs.append(ServeProcess(["--demo", "--backend", "local", "--redis-url", redis_server.url,
                                   "--data-dir", str(root / "a")], env, root / "a.log"))
        procs.append(ServeProcess(["--role", "api", "--redis-url", redis_server.url, "--data-dir", str(root / "b")],
                                  env, root / "b.log"))
        yield [p.url for p in procs], namespace
    finally:
        for proc in procs:
            proc.stop()


def job_count(redis_url: str, namespace: str) -> int:
    from diffserve.api.redis_jobs import RedisJobStore

    store = RedisJobStore(redis_url, namespace=namespace)
    try:
        return sum(store.count_by_status().values())
    finally:
        store.close()


def test_idempotent_retries_through_two_replicas_charge_once(replicas, redis_server) -> None:  # noqa: F811
    (runs, queues), namespace = replicas
    first = post(queues, QUICK, "retry-1")
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    request_id = first.json()["request_id"]
    for url in (runs, queues, runs):
        again = post(url, QUICK, "retry-1")
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["request_id"] == request_id
        assert again.json()["status_url"] == f"{url}/v2/requests/{request_id}/status"
    assert job_count(redis_server.url, namespace) == 1
    assert remaining(runs, request_id) == remaining(queues, request_id) == str(CREDITS - 1)

    # The same key with another body is refused by both replicas; nothing is queued or charged.
    for url in (runs, queues):
        other = post(url, {**QUICK, "prompt": "another"}, "retry-1")
        assert other.status_code == 422 and "different request body" in other.json()["error"]
    assert job_count(redis_server.url, namespace) == 1
    assert remaining(queues, request_id) == str(CREDITS - 1)


def test_racing_duplicates_through_two_replicas_make_one_job(replicas, redis_server) -> None:  # noqa: F811
    (runs, queues), namespace = replicas
    jobs_before = job_count(redis_server.url, namespace)
    body = {**QUICK, "seed": 4}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post((runs, queues)[i % 2], body, "race-1"), range(8)))
    assert {a.status_code for a in answers} <= {200, 409}, [a.text for a in answers]
    accepted = [a for a in answers if a.status_code == 200]
    assert len([a for a in accepted if "idempotent-replayed" not in a.headers]) == 1
    assert len({a.json()["request_id"] for a in accepted}) == 1
    assert all(a.headers["retry-after"] for a in answers if a.status_code == 409)
    # A client that got 409 retries and gets the one request.
    retried = post(queues, body, "race-1")
    assert retried.status_code == 200 and retried.json()["request_id"] == accepted[0].json()["request_id"]
    assert job_count(redis_server.url, namespace) == jobs_before + 1
    before = int(remaining(runs, accepted[0].json()["request_id"]))
    assert before == CREDITS - jobs_before - 1


def test_a_webhook_accepted_by_one_replica_is_delivered_once(replicas, redis_server) -> None:  # noqa: F811
    from diffserve.api.redis_client import connect
    from diffserve.api.webhooks import RedisWebhookOutbox

    (runs, queues), namespace = replicas
    hook = Receiver()
    try:
        response = httpx.post(f"{queues}/v2/{SLUG}", json={**QUICK, "seed": 6, "webhook": hook.url},
                              headers={"x-api-key": KEY}, timeout=60)
        request_id = response.json()["request_id"]
        [(headers, body, status)] = hook.delivered(f"msg_{request_id}")
        assert status == 200 and verify(SECRET, headers, body) and b'"COMPLETED"' in body
        # Settled once the sender has read the 2xx: nothing left for the other replica to send again.
        outbox, deadline = RedisWebhookOutbox(connect(redis_server.url), namespace), time.monotonic() + 30
        while outbox.pending():
            assert time.monotonic() < deadline, "the delivery stayed in the outbox after its 2xx"
            time.sleep(0.05)
        assert len([h for h, _, _ in hook.received if h["webhook-id"] == f"msg_{request_id}"]) == 1
    finally:
        hook.close()


def test_a_key_survives_a_sigkill_and_restart_on_sqlite(tmp_path) -> None:
    args = ["--demo", "--backend", "local", "--data-dir", str(tmp_path / "api")]
    proc = ServeProcess(args, ENV, tmp_path / "api.log")
    try:
        request_id = post(proc.url, QUICK, "restart-1").json()["request_id"]
        proc.kill()
    finally:
        proc.stop()
    proc = ServeProcess(args, ENV, tmp_path / "api.log")
    try:
        again = post(proc.url, QUICK, "restart-1")
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["request_id"] == request_id
        assert post(proc.url, {**QUICK, "seed": 5}, "restart-1").status_code == 422
        assert remaining(proc.url, request_id) == str(CREDITS - 1)
    finally:
        proc.stop()
    store = JobStore(tmp_path / "api" / "jobs.sqlite", outputs_dir=tmp_path / "api" / "outputs")
    try:
        assert sum(store.count_by_status().values()) == 1
    finally:
        store.close()
