"""Tests for diffserve.api.redis_quotas against a real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import threading

import pytest

from diffserve.api.quotas import InsufficientCredits
from diffserve.api.redis_client import StoreUnavailable
from diffserve.api.redis_jobs import CompletionLost, RedisJobStore
from diffserve.api.redis_quotas import RedisCreditLedger, RedisRateLimiter
from tests.redis_server import redis_server, redis_url  # noqa: F401


@pytest.fixture
def ledgers(redis_url):  # noqa: F811
    """Two ledgers on the same Redis, as two API replicas have."""
    made = [RedisCreditLedger(redis_url, 5, {"rich": 100}) for _ in range(2)]
    yield made
    for ledger in made:
        ledger.close()


def test_reserve_debit_release_semantics(ledgers) -> None:
    one, two = ledgers
    assert one.enabled and one.allowance(None) is None and one.remaining(None) is None
    assert one.allowance("rich") == 100 and one.remaining("rich") == 100
    one.reserve("alice", 3)
    assert two.remaining("alice") == 2  # the other replica sees the reservation
    with pytest.raises(InsufficientCredits) as info:
        two.reserve("alice", 3)
    assert (info.value.remaining, info.value.cost) == (2, 3)
    assert two.debit("alice", 3, job_id="job-1") is True  # the worker's replica settles it
    assert one.remaining("alice") == 2
    one.reserve("alice", 2)
    assert one.release("alice", 2, job_id="job-2") is True
    assert two.remaining("alice") == 2
    # Unlimited ledgers do nothing.
    unlimited = RedisCreditLedger(None, None, {}, client=one._redis)
    assert not unlimited.enabled and unlimited.remaining("alice") is None
    unlimited.reserve("alice", 10**6)


def test_settling_a_job_happens_once(ledgers) -> None:
    one, two = ledgers
    one.reserve("alice", 2)
    assert one.debit("alice", 2, job_id="job-1") is True
    assert two.debit("alice", 2, job_id="job-1") is False
    assert two.release("alice", 2, job_id="job-1") is False  # a late failure report changes nothing
    assert one.remaining("alice") == 3


def test_credits_debited_once_under_concurrent_completions(ledgers, redis_url) -> None:  # noqa: F811
    """Two workers finish the same job at once: one completion wins and only the winner debits."""
    stores = [RedisJobStore(redis_url, reclaim_idle_s=0.3) for _ in range(2)]
    try:
        ledgers[0].reserve("alice", 2)
        job = stores[0].create("sdxl", {"num_images": 2}, owner="alice")
        stores[0].claim("a", ["sdxl"])
        threading.Event().wait(0.5)
        assert stores[1].claim("b", ["sdxl"]) is not None  # "a" looked dead; both now run the job
        barrier = threading.Barrier(4)
        debits: list[bool] = []

        def finish(store: RedisJobStore, ledger: RedisCreditLedger) -> None:
            barrier.wait()
            try:
                store.complete(job.id, [b"x", b"y"], "jpeg", {}, None)
            except CompletionLost:
                return
            debits.append(ledger.debit("alice", 2, job_id=job.id))

        def settle_again(ledger: RedisCreditLedger) -> None:
            # Even callers that skip the completion check are counted once per job.
            barrier.wait()
            debits.append(ledger.debit("alice", 2, job_id=job.id))

        threads = [threading.Thread(target=finish, args=(stores[i], ledgers[i])) for i in range(2)]
        threads += [threading.Thread(target=settle_again, args=(ledgers[i],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert sorted(debits) == [False, False, True]
        assert ledgers[1].remaining("alice") == 3
    finally:
        for store in stores:
            store.close()


def test_concurrent_reservations_never_overspend(ledgers) -> None:
    granted: list[bool] = []
    barrier = threading.Barrier(10)

    def submit(ledger: RedisCreditLedger) -> None:
        barrier.wait()
        try:
            ledger.reserve("bob", 1)
            granted.append(True)
        except InsufficientCredits:
            granted.append(False)

    threads = [threading.Thread(target=submit, args=(ledgers[i % 2],)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(True) == 5 and ledgers[0].remaining("bob") == 0


def test_rate_limit_shared_by_two_clients(redis_url) -> None:  # noqa: F811
    one, two = RedisRateLimiter(redis_url, 3, {"vip": 6}), RedisRateLimiter(redis_url, 3, {"vip": 6})
    try:
        assert one.limit("vip") == 6 and one.limit("x") == 3
        assert one.check("key-a", None) is None
        assert two.check("key-a", None) is None
        assert one.check("key-a", None) is None
        wait = two.check("key-a", None)  # the fourth request in a minute, whichever replica takes it
        assert wait is not None and 15.0 < wait <= 20.0
        assert one.check("key-a", None) is not None
        assert two.check("key-b", None) is None  # buckets are per key
        assert RedisRateLimiter(None, 0, {}, client=one._redis).check("key-a", None) is None  # 0: unlimited
    finally:
        one.close()
        two.close()


def test_quotas_raise_store_unavailable_when_redis_is_down(redis_url, redis_server) -> None:  # noqa: F811
    ledger = RedisCreditLedger(redis_url, 5, {})
    limiter = RedisRateLimiter(redis_url, 3, {})
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            ledger.reserve("alice", 1)
        with pytest.raises(StoreUnavailable):
            limiter.check("key", None)
    finally:
        redis_server.start()
        ledger.close()
        limiter.close()
