"""Idempotency keys (api/idempotency.py) on SQLite and on Redis alike (``kind``): a key's first
request reserves it, a retry with the same body gets the original request id, another body is
refused with 422, a concurrent duplicate with 409, keys are per API key, a refused submission
frees its key, and a second handle (another process or replica) sees the same records.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from api.idempotency import (
    IdempotencyConflict, IdempotencyStore, RedisIdempotencyStore, SqliteIdempotencyStore, check_key, fingerprint,
    submit_once,
)


@pytest.fixture
def make_keys(kind: str, tmp_path, request: pytest.FixtureRequest):
    made: list[IdempotencyStore] = []
    namespace = f"idem-{uuid.uuid4().hex[:8]}"

    def make(retention_s: float = 3600.0) -> IdempotencyStore:
        if kind == "sqlite":
            keys = SqliteIdempotencyStore(tmp_path / "idempotency.sqlite", retention_s)
        else:
            from api.redis_client import connect

            keys = RedisIdempotencyStore(connect(request.getfixturevalue("redis_url")), namespace, retention_s)
        made.append(keys)
        return keys

    yield make
    for keys in made:
        keys.close()


def test_fingerprint_is_of_the_json_not_its_spelling() -> None:
    assert fingerprint("a", {"x": 1, "y": [1, 2]}) == fingerprint("a", {"y": [1, 2], "x": 1})
    assert fingerprint("a", {"x": 1}) != fingerprint("a", {"x": 2})
    assert fingerprint("a", {"x": 1}) != fingerprint("b", {"x": 1})
    assert check_key("  k-1 ") == "k-1"
    for bad in ("", "   ", "k" * 256):
        with pytest.raises(ValueError, match="Idempotency-Key"):
            check_key(bad)


def test_a_key_records_its_request_for_every_handle(make_keys) -> None:
    keys, replica = make_keys(), make_keys()
    assert isinstance(keys, IdempotencyStore)
    assert keys.reserve("owner-1", "k", "fp-1") is None  # reserved by this caller
    held = replica.reserve("owner-1", "k", "fp-1")
    assert (held.fingerprint, held.job_id) == ("fp-1", None)  # in flight
    keys.complete("owner-1", "k", "fp-1", "job-1")
    held = replica.reserve("owner-1", "k", "fp-2")
    assert (held.fingerprint, held.job_id) == ("fp-1", "job-1")
    # Per API key: another owner's same key is a different key.
    assert replica.reserve("owner-2", "k", "fp-2") is None
    assert replica.reserve(None, "k", "fp-3") is None


def test_a_released_reservation_frees_the_key_but_never_a_completed_one(make_keys) -> None:
    keys = make_keys()
    assert keys.reserve("o", "k", "fp") is None
    keys.release("o", "k", "fp")
    assert keys.reserve("o", "k", "fp") is None
    keys.complete("o", "k", "fp", "job-1")
    keys.release("o", "k", "fp")
    assert keys.reserve("o", "k", "fp").job_id == "job-1"


def test_a_key_is_forgotten_after_the_retention(make_keys) -> None:
    keys = make_keys(retention_s=0.2)
    assert keys.reserve("o", "k", "fp") is None
    keys.complete("o", "k", "fp", "job-1")
    assert keys.reserve("o", "k", "fp").job_id == "job-1"
    deadline = time.monotonic() + 10
    while keys.reserve("o", "k", "fp") is not None:
        assert time.monotonic() < deadline, "the key outlived its retention"
        time.sleep(0.05)


def test_submit_once_submits_once_and_answers_conflicts(make_keys) -> None:
    keys, replica = make_keys(), make_keys()
    submitted: list[str] = []

    async def submit() -> str:
        submitted.append(f"job-{len(submitted)}")
        return submitted[-1]

    async def refused() -> str:
        raise RuntimeError("queue full")

    async def scenario() -> None:
        assert await submit_once(keys, "o", "k", "fp", submit) == ("job-0", False)
        assert await submit_once(replica, "o", "k", "fp", submit) == ("job-0", True)
        with pytest.raises(IdempotencyConflict) as conflict:
            await submit_once(replica, "o", "k", "other-fp", submit)
        assert conflict.value.status == 422 and "different request body" in str(conflict.value)

        # A refused submission leaves the key free for the retry.
        with pytest.raises(RuntimeError):
            await submit_once(keys, "o", "k2", "fp", refused)
        assert await submit_once(replica, "o", "k2", "fp", submit) == ("job-1", False)

        # A duplicate that arrives while the first is being submitted: 409.
        started, release = asyncio.Event(), asyncio.Event()

        async def slow() -> str:
            started.set()
            await release.wait()
            return await submit()

        first = asyncio.create_task(submit_once(keys, "o", "k3", "fp", slow))
        await started.wait()
        with pytest.raises(IdempotencyConflict) as conflict:
            await submit_once(replica, "o", "k3", "fp", submit)
        assert conflict.value.status == 409
        release.set()
        assert await first == ("job-2", False)
        assert await submit_once(replica, "o", "k3", "fp", submit) == ("job-2", True)

    asyncio.run(scenario())
    assert submitted == ["job-0", "job-1", "job-2"]
