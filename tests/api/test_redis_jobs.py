"""Tests for diffserve.api.redis_jobs.RedisJobStore against a real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from diffserve.api.jobs import CANCELLED_BY_CLIENT, JobStatus
from diffserve.api.redis_client import StoreUnavailable
from diffserve.api.redis_jobs import CompletionLost, RedisJobStore
from tests.redis_server import redis_server, redis_url  # noqa: F401

# Reclaim after 1 s silent; heartbeats every 0.1 s, so a loaded CI machine has 0.9 s of slack.
IDLE_S = 1.0


@pytest.fixture
def make_store(redis_url):  # noqa: F811
    stores = []

    def make(**kw) -> RedisJobStore:
        kw.setdefault("reclaim_idle_s", IDLE_S)
        store = RedisJobStore(redis_url, **kw)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store) -> RedisJobStore:
    return make_store()


def raw(redis_url: str) -> redis.Redis:  # noqa: F811
    return redis.Redis.from_url(redis_url)


def test_lifecycle_roundtrip(store: RedisJobStore, redis_url) -> None:  # noqa: F811
    job = store.create("sdxl", {"prompt": "a cat", "steps": 4}, owner="owner-1", output_format="png",
                       want_base64=True, inputs={"image": b"\x89PNG-input"})
    assert job.status is JobStatus.QUEUED and job.attempts == 0
    got = store.get(job.id)
    assert got == job
    assert got.params == {"prompt": "a cat", "steps": 4} and got.owner == "owner-1"
    assert got.want_base64 is True and got.output_format == "png"
    assert store.get("0" * 32) is None
    assert store.queue_depth() == 1 and store.position(job.id) == 0
    assert store.count_by_status() == {"QUEUED": 1, "PROCESSING": 0, "COMPLETED": 0, "FAILED": 0}

    claim = store.claim("w1", ["sdxl"])
    assert claim is not None and claim.job.id == job.id
    assert claim.job.status is JobStatus.PROCESSING and claim.attempt == 1 and claim.job.started_at is not None
    assert store.position(job.id) is None and store.queue_depth() == 0
    assert store.read_inputs(job.id) == {"image": b"\x89PNG-input"}
    assert store.set_progress(job.id, 2, 4) is True
    assert (store.get(job.id).progress_step, store.get(job.id).progress_total) == (2, 4)
    assert store.heartbeat(claim).owned is True
    assert store.count_by_status()["PROCESSING"] == 1

    done = store.complete(job.id, [b"out-0", b"out-1"], "png", {"inference_time": 1.5}, 1234)
    assert done.status is JobStatus.COMPLETED and done.seed == 1234 and done.error is None
    assert done.outputs == ["0.png", "1.png"]
    assert done.metrics == {"inference_time": 1.5, "deliveries": 1}
    assert done.expires_at == pytest.approx(done.finished_at + store.retention_s, abs=1e-3)
    assert store.read_output(job.id, 1) == b"out-1" and store.read_output(job.id, 2) is None
    assert store.read_inputs(job.id) == {}  # inputs go when the job ends
    assert store.set_progress(job.id, 3, 4) is False
    assert store.count_by_status() == {"QUEUED": 0, "PROCESSING": 0, "COMPLETED": 1, "FAILED": 0}
    # Acknowledged and deleted: nothing pending, nothing left in the stream.
    r = raw(redis_url)
    assert r.xpending(store.stream_key("sdxl"), "workers")["pending"] == 0
    assert r.xlen(store.stream_key("sdxl")) == 0
    assert store.claim("w1", ["sdxl"]) is None


def test_fail_and_cancel_transitions(store: RedisJobStore) -> None:
    queued = store.create("sdxl", {})
    cancelled = store.request_cancel(queued.id)
    assert cancelled.status is JobStatus.FAILED and cancelled.error == CANCELLED_BY_CLIENT
    assert cancelled.cancel_requested is True and store.queue_depth() == 0
    assert store.claim("w1", ["sdxl"]) is None  # the cancelled entry is gone from the stream

    job = store.create("sdxl", {})
    store.claim("w1", ["sdxl"])
    failed = store.fail(job.id, "boom", {"inference_time": 0.1})
    assert failed.status is JobStatus.FAILED and failed.error == "boom"
    assert failed.metrics == {"inference_time": 0.1, "deliveries": 1}
    # Terminal jobs keep their outcome.
    assert store.fail(job.id, "again").error == "boom"
    assert store.request_cancel(job.id).error == "boom"
    with pytest.raises(CompletionLost):
        store.complete(job.id, [b"x"], "jpeg", {}, None)
    with pytest.raises(KeyError):
        store.fail("f" * 32, "x")
    assert store.request_cancel("f" * 32) is None
    assert store.count_by_status() == {"QUEUED": 0, "PROCESSING": 0, "COMPLETED": 0, "FAILED": 2}


def test_retention_expiry(make_store, redis_url) -> None:  # noqa: F811
    store = make_store(retention_s=0.3)
    job = store.create("sdxl", {})
    store.claim("w1", ["sdxl"])
    store.complete(job.id, [b"img"], "jpeg", {}, None)
    assert store.get(job.id) is not None and store.read_output(job.id, 0) == b"img"
    time.sleep(0.5)
    assert store.get(job.id) is None and store.read_output(job.id, 0) is None
    r = raw(redis_url)
    assert not r.exists(f"{{diffserve}}:job:{job.id}", f"{{diffserve}}:out:{job.id}")
    assert store.count_by_status()["COMPLETED"] == 0
    assert store.purge_expired() == 1


def test_two_consumers_share_the_group(make_store) -> None:
    api, worker_a, worker_b = make_store(), make_store(), make_store()
    ids = [api.create("sdxl", {"i": i}).id for i in range(8)]
    api.request_cancel(api.create("other", {}).id)  # a deleted entry mid-stream
    api.create("other", {})  # a slug neither worker serves
    taken: dict[str, list[str]] = {"a": [], "b": []}

    def work(store: RedisJobStore, name: str) -> None:
        while (claim := store.claim(name, ["sdxl"])) is not None:
            taken[name].append(claim.job.id)
            store.complete(claim.job.id, [b"x"], "jpeg", {}, None)

    threads = [threading.Thread(target=work, args=(worker_a, "a")), threading.Thread(target=work, args=(worker_b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(taken["a"] + taken["b"]) == sorted(ids)  # each job delivered exactly once
    assert api.queue_depth() == 1 and api.lag("other") == 1 and api.lag("sdxl") == 0


def test_claim_takes_oldest_across_slugs_and_blocks_until_work(make_store) -> None:
    store = make_store(reclaim_idle_s=30.0)  # the claimed jobs below are never heartbeated
    first = store.create("b", {}).id
    time.sleep(0.005)  # stream ids order jobs by the millisecond; within one, by slug
    second = store.create("a", {}).id
    assert store.claim("w", ["a", "b"]).job.id == first
    assert store.claim("w", ["a", "b"]).job.id == second

    # A claim blocked for ten minutes returns when a job arrives, not when its block runs out: the
    # claiming thread is done long before the block could have expired.
    claimed = []
    claimer = threading.Thread(target=lambda: claimed.append(store.claim("w", ["a"], block_s=600.0)))
    claimer.start()
    created = store.create("a", {}).id
    claimer.join(60)  # bounds a hang only
    assert not claimer.is_alive() and claimed[0] is not None and claimed[0].job.id == created
    assert store.claim("w", ["a"], block_s=0.2) is None


def test_silent_worker_loses_its_job(make_store) -> None:
    a, b = make_store(), make_store()
    job = a.create("sdxl", {})
    claim_a = a.claim("a", ["sdxl"])
    assert b.claim("b", ["sdxl"]) is None  # still fresh
    time.sleep(IDLE_S + 0.2)  # "a" is killed: no heartbeat
    claim_b = b.claim("b", ["sdxl"])
    assert claim_b is not None and claim_b.job.id == job.id and claim_b.attempt == 2
    assert a.heartbeat(claim_a).owned is False
    # The presumed-dead worker cannot fail the job that "b" now runs.
    assert a.fail(job.id, "triton died", claim=claim_a).status is JobStatus.PROCESSING
    done = b.complete(job.id, [b"x"], "jpeg", {}, None)
    assert done.metrics["deliveries"] == 2 and done.attempts == 2


def test_heartbeating_long_job_is_not_reclaimed(make_store) -> None:
    a, b = make_store(), make_store()
    job = a.create("sdxl", {})
    claim_a = a.claim("a", ["sdxl"])
    stop = threading.Event()
    beats: list[bool] = []

    def beat() -> None:
        while not stop.wait(0.1):
            beats.append(a.heartbeat(claim_a).owned)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        deadline = time.monotonic() + 4 * IDLE_S  # the job runs four idle periods
        while time.monotonic() < deadline:
            assert b.claim("b", ["sdxl"]) is None
            time.sleep(0.1)
    finally:
        stop.set()
        beater.join()
    assert len(beats) >= 10 and all(beats)
    done = a.complete(job.id, [b"x"], "jpeg", {}, None)
    assert done.metrics["deliveries"] == 1


def test_delivery_cap_ends_failed(make_store, redis_url) -> None:  # noqa: F811
    store = make_store(max_attempts=2)
    job = store.create("sdxl", {})
    assert store.claim("w1", ["sdxl"]).attempt == 1
    time.sleep(IDLE_S + 0.2)
    assert store.claim("w2", ["sdxl"]).attempt == 2
    time.sleep(IDLE_S + 0.2)
    assert store.claim("w3", ["sdxl"]) is None
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.attempts == 2
    assert "request_max_attempts=2" in failed.error and "2 deliveries" in failed.error
    assert failed.metrics["deliveries"] == 2
    assert raw(redis_url).xpending(store.stream_key("sdxl"), "workers")["pending"] == 0


def test_double_completion_is_one_outcome(make_store) -> None:
    a, b = make_store(), make_store()
    job = a.create("sdxl", {})
    a.claim("a", ["sdxl"])
    time.sleep(IDLE_S + 0.2)
    assert b.claim("b", ["sdxl"]) is not None  # now both think they run it
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def finish(store: RedisJobStore, name: str) -> None:
        barrier.wait()
        try:
            results[name] = store.complete(job.id, [name.encode()], "jpeg", {"by": name}, 7)
        except CompletionLost as exc:
            results[name] = exc

    threads = [threading.Thread(target=finish, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if not isinstance(r, CompletionLost)]
    assert len(winners) == 1
    loser = "b" if winners == ["a"] else "a"
    assert isinstance(results[loser], CompletionLost) and results[loser].status == "COMPLETED"
    final = a.get(job.id)
    assert final.metrics["by"] == winners[0] and a.read_output(job.id, 0) == winners[0].encode()


def test_cancel_from_another_client(make_store) -> None:
    api, worker = make_store(), make_store()
    job = api.create("sdxl", {})
    claim = worker.claim("w", ["sdxl"])
    assert worker.heartbeat(claim).cancel_requested is False
    flagged = api.request_cancel(job.id)
    assert flagged.status is JobStatus.PROCESSING and flagged.cancel_requested is True
    assert worker.heartbeat(claim).cancel_requested is True and worker.is_cancel_requested(job.id)
    assert worker.fail(job.id, CANCELLED_BY_CLIENT, claim=claim).status is JobStatus.FAILED
    assert api.get(job.id).error == CANCELLED_BY_CLIENT


def test_wait_terminal_sees_another_process_finish(make_store) -> None:
    api, worker = make_store(), make_store()
    job = api.create("sdxl", {})
    claim = worker.claim("w", ["sdxl"])
    assert api.wait_terminal(job.id, 0.2) is None
    # The waiter (ten minutes at most) wakes when the other client completes the job.
    seen = []
    waiter = threading.Thread(target=lambda: seen.append(api.wait_terminal(job.id, 600.0)))
    waiter.start()
    worker.complete(claim.job.id, [b"x"], "jpeg", {}, None)
    waiter.join(60)  # bounds a hang only
    assert not waiter.is_alive() and seen[0].status is JobStatus.COMPLETED


def test_redis_down_raises_store_unavailable_and_recovers(store: RedisJobStore, redis_server) -> None:  # noqa: F811
    job = store.create("sdxl", {})
    redis_server.stop()
    try:
        # Each call fails with StoreUnavailable instead of retrying while Redis is away; even a
        # blocking claim of ten minutes gives up at once.
        for call in (lambda: store.create("sdxl", {}), lambda: store.get(job.id),
                     lambda: store.claim("w", ["sdxl"], block_s=600.0), store.ping, store.queue_depth):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                call()
    finally:
        redis_server.start()
    store.ping()
    assert store.get(job.id).status is JobStatus.QUEUED  # graceful stop kept it
    assert store.create("sdxl", {}).status is JobStatus.QUEUED


def test_accepted_jobs_survive_a_redis_crash(make_store, redis_server) -> None:  # noqa: F811
    store = make_store()
    ids = [store.create("sdxl", {"i": i}).id for i in range(3)]
    running = store.claim("w1", ["sdxl"])
    redis_server.kill()  # kill -9: only what the append-only file holds comes back
    redis_server.start()
    assert store.persistence()["appendonly"] == "yes"
    assert [store.get(i).status for i in ids] == [JobStatus.PROCESSING, JobStatus.QUEUED, JobStatus.QUEUED]
    assert [store.claim("w2", ["sdxl"]).job.id for _ in range(2)] == ids[1:]
    time.sleep(IDLE_S + 0.2)  # w1 died with Redis' clients; its job is reclaimed
    reclaimed = store.claim("w2", ["sdxl"])
    assert reclaimed.job.id == running.job.id and reclaimed.attempt == 2


def test_demand_set_counts_queued_and_running_jobs_at_every_priority(make_store) -> None:
    # KEDA scales on SCARD of <ns>:demand:<slug>: it must count every priority and shrink on every end.
    store = make_store(namespace="demand-test", max_attempts=1)
    other = "sd1.5-img2img"
    jobs = [store.create("sdxl", {"i": i}, priority=p) for i, p in enumerate((0, 3, 9, 0, 5, 0))]
    store.create(other, {})
    assert store.demand("sdxl") == 6 and store.demand(other) == 1
    assert store.demand_key("sdxl") == "{demand-test}:demand:sdxl"
    running = [store.claim("w", ["sdxl"]) for _ in range(3)]  # PROCESSING still counts
    assert all(running) and store.demand("sdxl") == 6
    store.complete(running[0].job.id, [b"x"], "jpeg", {}, None)
    assert store.demand("sdxl") == 5
    store.fail(running[1].job.id, "boom", claim=running[1])
    assert store.demand("sdxl") == 4
    queued = [j for j in jobs if store.get(j.id).status is JobStatus.QUEUED]
    assert len(queued) == 3
    assert store.request_cancel(queued[0].id).status is JobStatus.FAILED
    assert store.demand("sdxl") == 3
    # running[2]'s worker goes silent; with max_attempts=1 the reclaim drops it at the cap.
    time.sleep(IDLE_S + 0.2)
    claimed = store.claim("w2", ["sdxl"])
    dropped = store.get(running[2].job.id)
    assert dropped.status is JobStatus.FAILED and "request_max_attempts=1" in dropped.error
    assert claimed is not None and claimed.job.id in {j.id for j in queued[1:]}
    assert store.demand("sdxl") == 2  # one queued, one running
    store.complete(claimed.job.id, [b"x"], "jpeg", {}, None)
    last = store.claim("w2", ["sdxl"])
    store.fail(last.job.id, "boom")
    assert store.demand("sdxl") == 0 and store.demand(other) == 1
