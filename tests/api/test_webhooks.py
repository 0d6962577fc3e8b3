"""Webhooks (api/webhooks.py): Standard Webhooks signing, the retry schedule, the outbox contract
on SQLite and on Redis (``kind``), and the deliverer against a real HTTP receiver on loopback.

The deliverer runs on a clock the test moves, so retries are ordered events, never waits; the
receiver and the store are real (an ``http.server`` thread, the job store of this ``kind``).
Signatures are checked here with ``hmac`` from the spec's definition, not with the module's code.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

import httpx
import pytest

from diffserve.api.webhooks import (
    Delivery, RedisWebhookOutbox, RetrySchedule, SqliteWebhookOutbox, WebhookDeliverer, WebhookError,
    WebhookOptions, WebhookOutbox, decode_secret, generate_secret, requested_webhook, sign, signed_headers,
)
from diffserve.api.images import ImageFetchPolicy
from diffserve.api.metrics import ApiMetrics
from tests.webhook_receiver import Receiver, verify

SLUG = "sd1.5-scifi"


# -- signing -------------------------------------------------------------------------------------


def test_signature_reproduces_the_standard_webhooks_test_vector() -> None:
    key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


def test_secrets_are_checked_at_start() -> None:
    assert len(decode_secret(generate_secret())) == 32
    for bad, why in (("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"), ("whsec_not base64!", "not base64"),
                     ("whsec_c2hvcnQ=", "24 to 64 bytes")):
        with pytest.raises(ValueError, match=why):
            decode_secret(bad)
    from diffserve.api.settings import Settings

    with pytest.raises(ValueError, match="whsec_"):
        Settings(webhook_secret="plain-text")
    with pytest.raises(ValueError, match="webhook_secret names a key that is not in api_keys"):
        Settings(api_keys=["a"], webhook_secret={"b": generate_secret()})


def test_webhook_secret_file_gives_one_secret_or_secrets_per_key(tmp_path, monkeypatch) -> None:
    from diffserve.api.settings import Settings, owner_from_api_key

    one, per_a = generate_secret(), generate_secret()
    single = tmp_path / "single"
    single.write_text(f"  {one}\n")
    options = Settings(webhook_secret_file=single).webhook_options()
    assert options.default_secret == decode_secret(one) and not options.secrets_by_owner
    per_key = tmp_path / "per-key"
    per_key.write_text(json.dumps({"a": per_a}) + "\n")
    options = Settings(api_keys=["a", "b"], webhook_secret_file=per_key).webhook_options()
    assert options.default_secret is None and options.secrets_by_owner == {owner_from_api_key("a"): decode_secret(per_a)}
    # The environment variable, as a deployment sets it; the checks of webhook_secret apply to the file's content.
    monkeypatch.setenv("DIFFSERVE_WEBHOOK_SECRET_FILE", str(single))
    assert Settings().webhook_options().default_secret == decode_secret(one)
    monkeypatch.delenv("DIFFSERVE_WEBHOOK_SECRET_FILE")
    with pytest.raises(ValueError, match="webhook_secret names a key that is not in api_keys"):
        Settings(api_keys=["b"], webhook_secret_file=per_key)
    (tmp_path / "bad").write_text("plain-text")
    with pytest.raises(ValueError, match="whsec_"):
        Settings(webhook_secret_file=tmp_path / "bad")


def test_webhook_secret_file_problems_stop_start_up(tmp_path) -> None:
    from diffserve.api.settings import Settings

    secret = tmp_path / "secret"
    secret.write_text(generate_secret())
    with pytest.raises(ValueError, match="webhook_secret or webhook_secret_file, not both"):
        Settings(webhook_secret=generate_secret(), webhook_secret_file=secret)
    with pytest.raises(ValueError, match="cannot read the webhook secret file"):
        Settings(webhook_secret_file=tmp_path / "missing")
    (tmp_path / "blank").write_text(" \n")
    with pytest.raises(ValueError, match="webhook secret file .* is empty"):
        Settings(webhook_secret_file=tmp_path / "blank")


# -- retry schedule ------------------------------------------------------------------------------


def test_retry_schedule_follows_its_waits_with_bounded_jitter_then_gives_up() -> None:
    waits = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    exact = RetrySchedule(waits)
    assert [exact.next_delay(n) for n in range(1, 9)] == [*waits, None]
    assert exact.max_attempts == 8
    jittered = RetrySchedule(waits, jitter=0.1)
    rng = random.Random(0)
    for n, wait in enumerate(waits, start=1):
        draws = [jittered.next_delay(n, rng) for _ in range(200)]
        assert all(0.9 * wait <= d <= 1.1 * wait for d in draws)
        assert len(set(draws)) > 1  # jitter spreads senders apart
    assert jittered.next_delay(len(waits) + 1, rng) is None
    with pytest.raises(ValueError):
        RetrySchedule((5.0, 0.0))


# -- outbox contract (both stores) ---------------------------------------------------------------


@pytest.fixture
def make_outbox(kind: str, tmp_path, request: pytest.FixtureRequest):
    """``make_outbox()``: an outbox of this test's kind; every one made shares its data (a second
    handle is another process's view)."""
    made: list[WebhookOutbox] = []
    namespace = f"hooks-{uuid.uuid4().hex[:8]}"

    def make() -> WebhookOutbox:
        if kind == "sqlite":
            outbox = SqliteWebhookOutbox(tmp_path / "webhooks.sqlite")
        else:
            from diffserve.api.redis_client import connect

            outbox = RedisWebhookOutbox(connect(request.getfixturevalue("redis_url")), namespace)
        made.append(outbox)
        return outbox

    yield make
    for outbox in made:
        outbox.close()


def test_outbox_claims_due_deliveries_once_per_lease(make_outbox) -> None:
    outbox, other = make_outbox(), make_outbox()
    assert isinstance(outbox, WebhookOutbox)
    outbox.add(Delivery("a" * 32, "https://example.com/hook", "owner-1", "http://api", next_at=100.0))
    outbox.add(Delivery("b" * 32, "https://example.com/hook", None, "http://api", next_at=200.0))
    assert outbox.pending() == 2
    assert outbox.claim_due(99.0, 60.0, 10) == []
    first = outbox.claim_due(150.0, 60.0, 10)
    assert [(d.job_id, d.owner, d.attempts, d.payload) for d in first] == [("a" * 32, "owner-1", 0, None)]
    # Held by the lease: no other process claims it until the lease ends.
    assert other.claim_due(150.0, 60.0, 10) == []
    assert [d.job_id for d in other.claim_due(210.0, 60.0, 10)] == ["b" * 32, "a" * 32]  # by due time
    # A failed attempt is written back; its retry is due at its new time.
    again = first[0]
    again.attempts, again.next_at, again.payload, again.last_error = 1, 300.0, b'{"x":1}', "HTTP 500"
    outbox.save(again)
    stored = other.get("a" * 32)
    assert (stored.attempts, stored.next_at, stored.payload, stored.last_error) == (1, 300.0, b'{"x":1}', "HTTP 500")
    outbox.remove("b" * 32)
    assert [d.job_id for d in other.claim_due(299.0, 60.0, 10)] == []
    assert [d.payload for d in other.claim_due(300.0, 60.0, 10)] == [b'{"x":1}']
    outbox.remove("a" * 32)
    assert outbox.pending() == 0 and other.get("a" * 32) is None


def test_recording_a_jobs_delivery_twice_is_a_no_op(make_outbox) -> None:
    # An idempotent retry that adopts a job whose submitter died records its webhook again.
    outbox, other = make_outbox(), make_outbox()
    outbox.add(Delivery("c" * 32, "https://example.com/hook", "owner-1", "http://api", next_at=100.0))
    (claimed,) = outbox.claim_due(100.0, 60.0, 10)
    claimed.attempts, claimed.next_at, claimed.last_error = 2, 500.0, "HTTP 503"
    outbox.save(claimed)
    other.add(Delivery("c" * 32, "https://example.com/other", None, "http://api", next_at=100.0))
    stored = outbox.get("c" * 32)
    assert (stored.url, stored.owner, stored.attempts, stored.next_at, stored.last_error) == (
        "https://example.com/hook", "owner-1", 2, 500.0, "HTTP 503")
    assert outbox.pending() == 1 and outbox.claim_due(499.0, 60.0, 10) == []


# -- deliverer -----------------------------------------------------------------------------------


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


SECRET = generate_secret()
LOOPBACK = ImageFetchPolicy(timeout_s=5.0, allow_networks=("127.0.0.0/8",))


def options(waits=(10.0, 20.0)) -> WebhookOptions:
    return WebhookOptions(schedule=RetrySchedule(waits), timeout_s=5.0, poll_s=1.0, policy=LOOPBACK,
                          default_secret=decode_secret(SECRET))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def render(job, base: str) -> bytes:
    return json.dumps({"request_id": job.id, "status": job.status.value, "base": base}).encode()


def run_round(deliverer: WebhookDeliverer) -> int:
    async def once() -> int:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await deliverer.deliver_due(client)
    return asyncio.run(once())


def test_a_finished_job_is_delivered_signed_with_its_result(queue, make_outbox, receiver) -> None:
    hook, outbox, clock = receiver(), make_outbox(), Clock()
    job = queue.create(SLUG, {"prompt": "x"}, owner="owner-1")
    outbox.add(Delivery(job.id, hook.url, "owner-1", "http://api.example", next_at=clock.now))
    deliverer = WebhookDeliverer(outbox, queue, options(), render, clock=clock)

    assert run_round(deliverer) == 1 and hook.received == []  # QUEUED: nothing to deliver yet
    assert outbox.get(job.id).next_at == clock.now + 1.0  # looked at again after poll_s, no attempt spent
    clock.now += 1.0
    queue.claim("w", [SLUG])
    queue.complete(job.id, [b"img"], "png", {"inference_time": 0.1}, seed=3)
    assert run_round(deliverer) == 1

    [(headers, body, status)] = hook.received
    assert status == 200 and outbox.pending() == 0
    assert json.loads(body) == {"request_id": job.id, "status": "COMPLETED", "base": "http://api.example"}
    assert headers["webhook-id"] == f"msg_{job.id}" and headers["content-type"] == "application/json"
    assert int(headers["webhook-timestamp"]) == int(clock.now)
    assert verify(SECRET, headers, body)
    assert not verify(generate_secret(), headers, body)
    assert not verify(SECRET, headers, body.replace(b"COMPLETED", b"FAILED"))


def test_failed_attempts_are_retried_on_schedule_with_the_same_id_and_body(queue, make_outbox, receiver) -> None:
    hook, outbox, clock = receiver([500, 503]), make_outbox(), Clock()
    job = queue.create(SLUG, {"prompt": "x"})
    queue.fail(job.id, "no luck")
    outbox.add(Delivery(job.id, hook.url, None, "http://api", next_at=clock.now))
    metrics = ApiMetrics()
    deliverer = WebhookDeliverer(outbox, queue, options(waits=(10.0, 20.0)), render, metrics=metrics, clock=clock)

    run_round(deliverer)
    pending = outbox.get(job.id)
    assert (pending.attempts, pending.next_at, pending.last_error) == (1, clock.now + 10.0, "HTTP 500")
    clock.now += 9.0
    assert run_round(deliverer) == 0 and len(hook.received) == 1  # not due yet
    clock.now += 1.0
    run_round(deliverer)
    assert outbox.get(job.id).attempts == 2 and outbox.get(job.id).next_at == clock.now + 20.0
    clock.now += 20.0
    run_round(deliverer)

    assert [status for _, _, status in hook.received] == [500, 503, 200]
    assert len({h["webhook-id"] for h, _, _ in hook.received}) == 1
    assert len({b for _, b, _ in hook.received}) == 1 and json.loads(hook.received[0][1])["status"] == "FAILED"
    assert len({h["webhook-timestamp"] for h, _, _ in hook.received}) == 3  # each attempt signed anew
    assert all(verify(SECRET, h, b) for h, b, _ in hook.received)
    assert outbox.pending() == 0
    counted = {outcome: metrics.registry.get_sample_value("diffserve_webhook_attempts_total", {"outcome": outcome})
               for outcome in ("retry", "delivered")}
    assert counted == {"retry": 2.0, "delivered": 1.0}


def test_a_receiver_that_never_answers_2xx_is_given_up_after_the_schedule(queue, make_outbox, receiver) -> None:
    hook, outbox, clock = receiver([500, 404, 302]), make_outbox(), Clock()
    job = queue.create(SLUG, {"prompt": "x"})
    queue.fail(job.id, "no luck")
    outbox.add(Delivery(job.id, hook.url, None, "http://api", next_at=clock.now))
    deliverer = WebhookDeliverer(outbox, queue, options(waits=(1.0, 1.0)), render, clock=clock)
    for _ in range(3):
        run_round(deliverer)
        clock.now += 1.0
    assert [status for _, _, status in hook.received] == [500, 404, 302]  # a redirect is not followed
    assert outbox.pending() == 0


def test_a_refused_connection_is_a_failed_attempt(queue, make_outbox, receiver) -> None:
    hook, outbox, clock = receiver(), make_outbox(), Clock()
    url = hook.url
    hook.close()  # nothing listens there any more
    job = queue.create(SLUG, {"prompt": "x"})
    queue.fail(job.id, "no luck")
    outbox.add(Delivery(job.id, url, None, "http://api", next_at=clock.now))
    run_round(WebhookDeliverer(outbox, queue, options(), render, clock=clock))
    pending = outbox.get(job.id)
    assert pending.attempts == 1 and "could not connect" in pending.last_error


def test_an_expired_job_drops_its_delivery(queue, make_outbox, receiver) -> None:
    hook, outbox, clock = receiver(), make_outbox(), Clock()
    outbox.add(Delivery("f" * 32, hook.url, None, "http://api", next_at=clock.now))
    run_round(WebhookDeliverer(outbox, queue, options(), render, clock=clock))
    assert outbox.pending() == 0 and hook.received == []


# -- intake: the SSRF guard and the secret -------------------------------------------------------


def test_requested_webhook_goes_through_the_ssrf_guard() -> None:
    public = WebhookOptions(schedule=RetrySchedule((1.0,)), default_secret=decode_secret(SECRET))

    def ask(payload: dict, opts: WebhookOptions = public, owner: str | None = None):
        return asyncio.run(requested_webhook(payload, owner, opts))

    for url, why in (("http://127.0.0.1:9/hook", "loopback"), ("http://169.254.169.254/latest", "metadata"),
                     ("http://10.1.2.3/hook", "private"), ("ftp://example.com/x", "scheme"),
                     ("http://user:pw@example.com/", "credentials")):
        with pytest.raises(WebhookError, match=why):
            ask({"webhook": url, "prompt": "x"})
    with pytest.raises(WebhookError, match="metadata"):  # never, whatever the allow list says
        ask({"webhook": "http://169.254.169.254/latest"}, options())
    payload = {"webhook": "http://127.0.0.1:9/hook", "prompt": "x"}
    assert ask(payload, options()) == "http://127.0.0.1:9/hook" and payload == {"prompt": "x"}
    assert ask({"prompt": "x"}) is None
    unsigned = WebhookOptions(schedule=RetrySchedule((1.0,)), policy=LOOPBACK)
    with pytest.raises(WebhookError, match="no webhook secret"):
        ask({"webhook": "http://127.0.0.1:9/hook"}, unsigned)
    # A key's default URL applies when the body names none.
    by_key = WebhookOptions(schedule=RetrySchedule((1.0,)), policy=LOOPBACK, default_secret=b"k" * 32,
                            urls_by_owner={"owner-1": "http://127.0.0.1:9/default"})
    assert ask({}, by_key, "owner-1") == "http://127.0.0.1:9/default"
    assert ask({}, by_key, "owner-2") is None


def test_the_readme_receiver_snippet_verifies_deliveries() -> None:
    """The verification code README.md documents for receivers, run as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- webhook-verify -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the documented snippet itself
    verify_webhook = namespace["verify_webhook"]

    body = b'{"request_id":"abc","status":"COMPLETED"}'
    now = int(time.time())
    headers = signed_headers(decode_secret(SECRET), "msg_abc", now, body)
    verify_webhook(SECRET, headers, body)
    with pytest.raises(ValueError, match="does not match"):
        verify_webhook(SECRET, headers, body.replace(b"COMPLETED", b"FAILED"))
    with pytest.raises(ValueError, match="does not match"):
        verify_webhook(generate_secret(), headers, body)
    with pytest.raises(ValueError, match="tolerance"):
        verify_webhook(SECRET, signed_headers(decode_secret(SECRET), "msg_abc", now - 3600, body), body)
    # The spec's test vector, at its own time.
    vector = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
              "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
    verify_webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", vector, b'{"test": 2432232314}', tolerance_s=10**10)


def test_a_process_without_secrets_leaves_deliveries_to_those_with_them(queue, make_outbox) -> None:
    outbox = make_outbox()
    outbox.add(Delivery("e" * 32, "http://127.0.0.1:9/hook", None, "http://api", next_at=0.0))

    async def runs_with(opts: WebhookOptions) -> bool:
        deliverer = WebhookDeliverer(outbox, queue, opts, render)
        await deliverer.start()
        running = deliverer.running
        await deliverer.stop()
        return running

    assert not asyncio.run(runs_with(WebhookOptions(schedule=RetrySchedule((1.0,)), policy=LOOPBACK)))
    assert outbox.get("e" * 32).attempts == 0
    assert asyncio.run(runs_with(options()))
