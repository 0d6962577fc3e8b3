"""Idempotency keys (api/idempotency.py) on SQLite and on Redis alike (``kind``): a key's first
request reserves it with the request id its job will get, a retry with the same body gets that
id, another body is refused with 422, a concurrent duplicate with 409, keys are per API key, a
refused submission frees its key, a second handle (another process or replica) sees the same
records, and a reservation whose submitter died is answered with its job or taken over to create it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from diffserve.api.idempotency import (
    IN_FLIGHT_S, IdempotencyConflict, IdempotencyStore, RedisIdempotencyStore, SqliteIdempotencyStore, check_key,
    fingerprint, submit_once,
)
from diffserve.api.jobs import DuplicateJob, new_job_id


@pytest.fixture
def make_keys(kind: str, tmp_path, request: pytest.FixtureRequest):
    made: list[IdempotencyStore] = []
    namespace = f"idem-{uuid.uuid4().hex[:8]}"

    def make(retention_s: float = 3600.0, clock=time.time) -> IdempotencyStore:
        if kind == "sqlite":
            keys = SqliteIdempotencyStore(tmp_path / "idempotency.sqlite", retention_s, clock=clock)
        else:
            from diffserve.api.redis_client import connect

            keys = RedisIdempotencyStore(connect(request.getfixturevalue("redis_url")), namespace, retention_s,
                                         clock=clock)
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
    assert keys.reserve("owner-1", "k", "fp-1", "job-1") is None  # reserved by this caller, for job-1
    held = replica.reserve("owner-1", "k", "fp-1", "job-x")
    assert (held.fingerprint, held.job_id, held.accepted, held.lapsed) == ("fp-1", "job-1", False, False)  # in flight
    keys.complete("owner-1", "k", "fp-1", "job-1")
    held = replica.reserve("owner-1", "k", "fp-2", "job-y")
    assert (held.fingerprint, held.job_id, held.accepted) == ("fp-1", "job-1", True)
    # Per API key: another owner's same key is a different key.
    assert replica.reserve("owner-2", "k", "fp-2", "job-2") is None
    assert replica.reserve(None, "k", "fp-3", "job-3") is None


def test_a_released_reservation_frees_the_key_but_never_a_completed_one(make_keys) -> None:
    keys = make_keys()
    assert keys.reserve("o", "k", "fp", "job-1") is None
    keys.release("o", "k", "fp", "job-other")  # not this reservation's request: kept
    assert keys.reserve("o", "k", "fp", "job-2").job_id == "job-1"
    keys.release("o", "k", "fp", "job-1")
    assert keys.reserve("o", "k", "fp", "job-2") is None
    keys.complete("o", "k", "fp", "job-2")
    keys.release("o", "k", "fp", "job-2")
    assert keys.reserve("o", "k", "fp", "job-3").job_id == "job-2"


def test_a_lapsed_reservation_is_taken_over_once(make_keys) -> None:
    now = [1000.0]
    keys, replica = make_keys(clock=lambda: now[0]), make_keys(clock=lambda: now[0])
    assert keys.reserve("o", "k", "fp", "job-1") is None
    now[0] += IN_FLIGHT_S - 1
    held = replica.reserve("o", "k", "fp", "job-2")
    assert (held.job_id, held.lapsed) == ("job-1", False)
    now[0] += 1
    held = replica.reserve("o", "k", "fp", "job-2")
    assert (held.job_id, held.accepted, held.lapsed) == ("job-1", False, True)
    assert replica.take_over("o", "k", held)
    assert not keys.take_over("o", "k", held)  # a second retry with the same view loses
    again = keys.reserve("o", "k", "fp", "job-3")
    assert (again.job_id, again.lapsed, again.taken_over) == ("job-1", False, True)  # a fresh period, the same id
    keys.release("o", "k", "fp", "job-1")  # the first submitter, refused late, no longer frees the key
    assert keys.reserve("o", "k", "fp", "job-3").job_id == "job-1"
    now[0] += IN_FLIGHT_S  # a taken-over reservation lapses and is taken over again like any other
    again = keys.reserve("o", "k", "fp", "job-3")
    assert again.lapsed and keys.take_over("o", "k", again) and not replica.take_over("o", "k", again)
    replica.complete("o", "k", "fp", "job-1")
    assert keys.reserve("o", "k", "fp", "job-4").accepted


def test_a_key_is_forgotten_after_the_retention(make_keys) -> None:
    keys = make_keys(retention_s=0.2)
    assert keys.reserve("o", "k", "fp", "job-1") is None
    keys.complete("o", "k", "fp", "job-1")
    assert keys.reserve("o", "k", "fp", "job-2").job_id == "job-1"
    deadline = time.monotonic() + 10
    while keys.reserve("o", "k", "fp", "job-2") is not None:
        assert time.monotonic() < deadline, "the key outlived its retention"
        time.sleep(0.05)


SLUG = "sd1.5-scifi"


class Submitter:
    """``submit``/``adopt`` for ``submit_once`` over a real job store, as the ``/v2`` route does."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self.created: list[str] = []
        self.adopted: list[str] = []
        self.refuse: Exception | None = None

    async def submit(self, job_id: str | None) -> str:
        if self.refuse is not None:
            raise self.refuse
        job = await asyncio.to_thread(self.queue.create, SLUG, {"prompt": "p"}, job_id=job_id)
        self.created.append(job.id)
        return job.id

    async def adopt(self, job_id: str) -> bool:
        found = self.queue.get(job_id) is not None
        if found:
            self.adopted.append(job_id)
        return found

    async def stalled(self, keys: IdempotencyStore, key: str) -> tuple[asyncio.Task, asyncio.Event]:
        """A ``submit_once`` through ``keys`` whose submission, once started, waits for the event."""
        started, release = asyncio.Event(), asyncio.Event()

        async def submit(job_id: str | None) -> str:
            started.set()
            await release.wait()
            return await self.submit(job_id)

        task = asyncio.create_task(submit_once(keys, "o", key, "fp", submit, self.adopt))
        await started.wait()
        return task, release


def test_submit_once_submits_once_and_answers_conflicts(make_keys, queue) -> None:
    keys, replica = make_keys(), make_keys()
    jobs = Submitter(queue)

    async def scenario() -> None:
        first, replayed = await submit_once(keys, "o", "k", "fp", jobs.submit, jobs.adopt)
        assert not replayed and jobs.created == [first]
        assert await submit_once(replica, "o", "k", "fp", jobs.submit, jobs.adopt) == (first, True)
        with pytest.raises(IdempotencyConflict) as conflict:
            await submit_once(replica, "o", "k", "other-fp", jobs.submit, jobs.adopt)
        assert conflict.value.status == 422 and "different request body" in str(conflict.value)
        assert await submit_once(keys, "o", None, "", jobs.submit, jobs.adopt) == (jobs.created[-1], False)

        # A submission refused after reserving (no credits, a bad image) frees the key for the corrected retry.
        jobs.refuse = RuntimeError("insufficient credits")
        with pytest.raises(RuntimeError):
            await submit_once(keys, "o", "k2", "fp", jobs.submit, jobs.adopt)
        jobs.refuse = None
        second, replayed = await submit_once(replica, "o", "k2", "fp", jobs.submit, jobs.adopt)
        assert not replayed and second == jobs.created[-1]

        # A duplicate that arrives while the first is being submitted: 409.
        pending, release = await jobs.stalled(keys, "k3")
        with pytest.raises(IdempotencyConflict) as conflict:
            await submit_once(replica, "o", "k3", "fp", jobs.submit, jobs.adopt)
        assert conflict.value.status == 409
        release.set()
        third, replayed = await pending
        assert not replayed and await submit_once(replica, "o", "k3", "fp", jobs.submit, jobs.adopt) == (third, True)

    asyncio.run(scenario())
    assert len(jobs.created) == 4 and len(set(jobs.created)) == 4 and not jobs.adopted


def test_a_submitter_killed_after_creating_its_job_is_answered_with_that_job(make_keys, queue) -> None:
    now = [1000.0]
    keys = make_keys(clock=lambda: now[0])
    jobs = Submitter(queue)
    job_id = new_job_id()
    # The dead process: reserved with its id, created the job, never marked the key.
    assert keys.reserve("o", "k", "fp", job_id) is None
    queue.create(SLUG, {"prompt": "p"}, job_id=job_id)

    async def retry():
        return await submit_once(keys, "o", "k", "fp", jobs.submit, jobs.adopt)

    with pytest.raises(IdempotencyConflict) as conflict:  # still in flight
        asyncio.run(retry())
    assert conflict.value.status == 409
    now[0] += IN_FLIGHT_S
    assert asyncio.run(retry()) == (job_id, True)
    assert jobs.created == [] and jobs.adopted == [job_id] and queue.queue_depth() == 1
    assert keys.reserve("o", "k", "fp", new_job_id()).accepted
    assert asyncio.run(retry()) == (job_id, True) and jobs.adopted == [job_id]  # marked: a plain replay now


def test_a_submitter_killed_before_creating_its_job_is_taken_over(make_keys, queue) -> None:
    now = [1000.0]
    keys, replica = make_keys(clock=lambda: now[0]), make_keys(clock=lambda: now[0])
    jobs = Submitter(queue)
    job_id = new_job_id()
    assert keys.reserve("o", "k", "fp", job_id) is None  # then the process died
    now[0] += IN_FLIGHT_S

    async def retry(store):
        return await submit_once(store, "o", "k", "fp", jobs.submit, jobs.adopt)

    # A refused takeover keeps the key reserved (under the same id, a new in-flight period).
    jobs.refuse = RuntimeError("queue full")
    with pytest.raises(RuntimeError):
        asyncio.run(retry(replica))
    held = keys.reserve("o", "k", "fp", new_job_id())
    assert (held.job_id, held.accepted, held.lapsed) == (job_id, False, False)
    jobs.refuse = None
    with pytest.raises(IdempotencyConflict):
        asyncio.run(retry(keys))
    now[0] += IN_FLIGHT_S
    assert asyncio.run(retry(replica)) == (job_id, False)  # created under the reserved id
    assert jobs.created == [job_id] and queue.get(job_id) is not None
    assert asyncio.run(retry(keys)) == (job_id, True) and queue.queue_depth() == 1


def test_a_stalled_submitter_and_a_taker_make_one_job(make_keys, queue) -> None:
    now = [1000.0]
    keys, replica = make_keys(clock=lambda: now[0]), make_keys(clock=lambda: now[0])
    jobs = Submitter(queue)

    async def scenario() -> None:
        first, release = await jobs.stalled(keys, "k")
        now[0] += IN_FLIGHT_S  # the first looks dead: a retry takes over and creates the job
        job_id, replayed = await submit_once(replica, "o", "k", "fp", jobs.submit, jobs.adopt)
        assert not replayed
        release.set()  # the first wakes up: its create meets DuplicateJob, and it answers with the same id
        assert await first == (job_id, True)

    asyncio.run(scenario())
    assert len(jobs.created) == 1 and queue.queue_depth() == 1
    with pytest.raises(DuplicateJob):
        queue.create(SLUG, {}, job_id=jobs.created[0])


def test_sqlite_keys_written_before_reservations_drew_the_id_keep_their_meaning(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "idempotency.sqlite"
    old = sqlite3.connect(str(path))
    old.execute("""CREATE TABLE idempotency_keys (scope TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL,
                   job_id TEXT, expires_at REAL NOT NULL, PRIMARY KEY (scope, key))""")
    later = time.time() + 3600
    old.executemany("INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?)",
                    [("o", "done", "fp", "job-1", later), ("o", "busy", "fp", None, later)])
    old.commit()
    old.close()
    keys = SqliteIdempotencyStore(path, 3600.0)
    done = keys.reserve("o", "done", "fp", "job-2")
    assert (done.job_id, done.accepted) == ("job-1", True)
    busy = keys.reserve("o", "busy", "fp", "job-2")
    assert (busy.job_id, busy.accepted, busy.lapsed) == (None, False, False)  # in flight until it expires: 409
    keys.close()
