"""Webhooks end to end: ``diffserve serve --demo --backend local`` as a real process, a real HTTP
receiver on loopback (tests/webhook_receiver.py) that checks the Standard Webhooks signature with
``hmac`` from the spec.

A request naming a webhook gets its result POSTed, signed, with the body ``GET
/v2/requests/{id}`` serves; a receiver that fails gets the same message again until it answers
2xx; a URL the SSRF guard refuses is a 400 at submission; and a server killed with SIGKILL while
deliveries are pending (one already tried and failed, one whose job had not finished) delivers
both after its restart, on SQLite and on Redis.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from diffserve.api.webhooks import generate_secret
from tests.redis_server import redis_server  # noqa: F401 - fixture
from tests.serving.processes import ServeProcess
from tests.webhook_receiver import Receiver, verify

KEY = "hooks-key"
SECRET = generate_secret()
SLUG = "sd1.5-scifi"
QUICK = {"prompt": "a city", "num_inference_steps": 20, "img_width": 512, "img_height": 512, "seed": 7}
ENV = {
    "DIFFSERVE_API_KEYS": KEY, "DIFFSERVE_WEBHOOK_SECRET": SECRET,
    "DIFFSERVE_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",  # the receiver is on loopback
    "DIFFSERVE_WEBHOOK_RETRY_SCHEDULE_S": ",".join(["0.5"] * 20), "DIFFSERVE_WEBHOOK_RETRY_JITTER": "0",
    "DIFFSERVE_WEBHOOK_POLL_S": "0.1", "DIFFSERVE_WEBHOOK_TIMEOUT_S": "2", "DIFFSERVE_RECLAIM_IDLE_S": "2",
}


def start(data_dir: Path, redis_url: str | None = None, namespace: str = "diffserve") -> ServeProcess:
    store = [] if redis_url is None else ["--redis-url", redis_url]
    return ServeProcess(["--demo", "--backend", "local", "--data-dir", str(data_dir), *store],
                        dict(ENV, DIFFSERVE_REDIS_NAMESPACE=namespace), data_dir / "serve.log")


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=60)


def submit(http: httpx.Client, webhook: str, **extra) -> str:
    response = http.post(f"/v2/{SLUG}", json={**QUICK, **extra, "webhook": webhook})
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None, default: int = 200) -> Receiver:
        made.append(Receiver(statuses, default))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = start(tmp_path_factory.mktemp("hooks-api"))
    yield proc
    proc.stop()


def test_a_finished_request_is_posted_signed_with_its_result(server, receiver) -> None:
    hook = receiver()
    with client(server.url) as http:
        request_id = submit(http, hook.url)
        [(headers, body, status)] = hook.delivered(f"msg_{request_id}")
        result = http.get(f"/v2/requests/{request_id}")
    assert status == 200 and verify(SECRET, headers, body)
    assert headers["content-type"] == "application/json"
    assert result.status_code == 200 and json.loads(body) == result.json()
    assert result.json()["status"] == "COMPLETED" and result.json()["output"][0].startswith(server.url)


def test_a_failing_receiver_gets_the_same_message_until_it_answers_2xx(server, receiver) -> None:
    hook = receiver([500, 503, 404])
    with client(server.url) as http:
        request_id = submit(http, hook.url, seed=8)
    attempts = hook.delivered(f"msg_{request_id}")
    assert [status for _, _, status in attempts] == [500, 503, 404, 200]
    assert len({body for _, body, _ in attempts}) == 1
    assert all(verify(SECRET, headers, body) for headers, body, _ in attempts)


def test_webhook_urls_go_through_the_ssrf_guard_at_submission(server) -> None:
    with client(server.url) as http:
        for url, why in (("http://169.254.169.254/latest/meta-data", "cloud metadata"),
                         ("http://10.0.0.7/hook", "private address"), ("file:///etc/passwd", "scheme")):
            response = http.post(f"/v2/{SLUG}", json={**QUICK, "webhook": url})
            assert response.status_code == 400 and why in response.json()["error"], response.text
        # Not a model parameter: the /v1 route refuses it like any unknown field.
        assert http.post(f"/v1/{SLUG}", json={**QUICK, "webhook": "http://127.0.0.1:9/"}).status_code == 400


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_server_killed_with_pending_deliveries_delivers_them_after_restart(kind, tmp_path, receiver,
                                                                            request) -> None:
    redis_url = request.getfixturevalue("redis_server").url if kind == "redis" else None
    namespace = f"hooks-{uuid.uuid4().hex[:8]}"
    hook = receiver(default=503)  # down until told otherwise
    proc = start(tmp_path / "api", redis_url, namespace)
    try:
        with client(proc.url) as http:
            tried = submit(http, hook.url)
            hook.wait_for(lambda got: any(h["webhook-id"] == f"msg_{tried}" for h, _, _ in got))
            unfinished = submit(http, hook.url, num_inference_steps=100, seed=9)
        proc.kill()
    finally:
        proc.stop()
    old_base = proc.url
    before = len(hook.received)
    hook.default = 200
    proc = start(tmp_path / "api", redis_url, namespace)
    try:
        for request_id in (tried, unfinished):
            attempts = hook.delivered(f"msg_{request_id}")
            assert attempts[-1][2] == 200 and verify(SECRET, attempts[-1][0], attempts[-1][1])
            assert len({body for _, body, _ in attempts}) == 1  # the result frozen at the first attempt
            with client(proc.url) as http:
                # The output URLs are under the address the request was submitted to (port 0 moved).
                sent = json.loads(attempts[-1][1].decode().replace(old_base, proc.url))
                assert sent == http.get(f"/v2/requests/{request_id}").json()
        assert len(hook.received) > before
    finally:
        proc.stop()
