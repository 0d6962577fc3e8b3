"""Tests for diffserve.api.jobs.JobStore (real SQLite files in a temp dir, injectable clock)."""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest

from diffserve.api.jobs import CANCELLED_BY_CLIENT, SYNC_PARAM, InvalidJobTransition, Job, JobStatus, JobStore
from diffserve.api.settings import owner_from_api_key


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_store(tmp_path: Path, clock: FakeClock, **kw: object) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3", outputs_dir=tmp_path / "outputs", clock=clock, **kw)  # type: ignore[arg-type]


def claim_next(store: JobStore) -> Job | None:
    """Lease the oldest queued job (these tests queue the slugs ``s`` and ``sdxl``)."""
    claim = store.claim("test", ["s", "sdxl"])
    return None if claim is None else claim.job


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock):
    s = open_store(tmp_path, clock)
    yield s
    s.close()


def test_create_and_get_roundtrip(store: JobStore, clock: FakeClock) -> None:
    owner = owner_from_api_key("sk-secret")
    job = store.create("sdxl", {"prompt": "a cat", "steps": 4}, owner=owner, output_format="png", want_base64=True)
    assert job.status is JobStatus.QUEUED
    got = store.get(job.id)
    assert got is not None
    assert got == job
    assert got.params == {"prompt": "a cat", "steps": 4}
    assert got.owner == owner and "sk-secret" not in got.owner
    assert got.want_base64 is True and got.output_format == "png"
    assert got.created_at == clock.now
    assert store.get("nope") is None


def test_schema_version_and_wal(store: JobStore, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT typeof(created_at) FROM jobs").fetchall() == []
    finally:
        conn.close()
    store.create("s", {})
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        assert conn.execute("SELECT typeof(created_at) FROM jobs").fetchone()[0] == "real"
    finally:
        conn.close()


def test_newer_schema_refused(tmp_path: Path, clock: FakeClock) -> None:
    open_store(tmp_path, clock).close()
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        open_store(tmp_path, clock)


def test_fifo_claim_position_and_depth(store: JobStore, clock: FakeClock) -> None:
    jobs = []
    for i in range(4):
        jobs.append(store.create("s", {"i": i}))
        clock.advance(1)
    assert store.queue_depth() == 4
    assert [store.position(j.id) for j in jobs] == [0, 1, 2, 3]

    first = claim_next(store)
    assert first is not None and first.id == jobs[0].id
    assert first.status is JobStatus.PROCESSING
    assert first.attempts == 1
    assert first.started_at == clock.now
    assert store.position(jobs[0].id) is None
    assert [store.position(j.id) for j in jobs[1:]] == [0, 1, 2]

    assert [claim_next(store).id for _ in range(3)] == [j.id for j in jobs[1:]]  # type: ignore[union-attr]
    assert claim_next(store) is None
    assert store.queue_depth() == 0
    assert store.count_by_status() == {"QUEUED": 0, "PROCESSING": 4, "COMPLETED": 0, "FAILED": 0}


def _claim_all(claimer, out: list[str], barrier: threading.Barrier) -> None:
    barrier.wait()
    while True:
        job = claimer()
        if job is None:
            return
        out.append(job.id)


@pytest.mark.parametrize("separate_connections", [False, True], ids=["shared-store", "store-per-thread"])
def test_concurrent_claim_each_job_once(tmp_path: Path, clock: FakeClock, separate_connections: bool) -> None:
    store = open_store(tmp_path, clock)
    ids = {store.create("s", {"i": i}).id for i in range(200)}
    n_threads = 8
    stores = [open_store(tmp_path, clock) for _ in range(n_threads)] if separate_connections else [store] * n_threads
    results: list[list[str]] = [[] for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)
    threads = [
        threading.Thread(target=_claim_all, args=(functools.partial(claim_next, stores[i]), results[i], barrier))
        for i in range(n_threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    claimed = [job_id for r in results for job_id in r]
    counts = Counter(claimed)
    assert set(counts) == ids
    assert all(n == 1 for n in counts.values())
    assert all(store.get(i).attempts == 1 for i in ids)  # type: ignore[union-attr]
    if separate_connections:
        for s in stores:
            s.close()
    store.close()


def test_progress(store: JobStore) -> None:
    job = store.create("s", {})
    assert store.set_progress(job.id, 1, 10) is False  # not processing yet
    claim_next(store)
    assert store.set_progress(job.id, 3, 10) is True
    got = store.get(job.id)
    assert got is not None and (got.progress_step, got.progress_total) == (3, 10)


def test_complete_writes_files(store: JobStore, clock: FakeClock, tmp_path: Path) -> None:
    job = store.create("s", {})
    claim_next(store)
    clock.advance(5)
    done = store.complete(job.id, [b"first", b"second"], "png", {"inference_s": 1.5}, seed=42)
    assert done.status is JobStatus.COMPLETED
    assert done.outputs == [f"outputs/{job.id}/0.png", f"outputs/{job.id}/1.png"]
    assert (tmp_path / done.outputs[0]).read_bytes() == b"first"
    assert store.resolve_output(done.outputs[1]).read_bytes() == b"second"
    assert done.metrics == {"inference_s": 1.5}
    assert done.seed == 42
    assert done.finished_at == clock.now
    assert done.expires_at == clock.now + store.retention_s
    assert store.get(job.id) == done
    with pytest.raises(InvalidJobTransition):
        store.complete(job.id, [b"x"], "png", {}, seed=None)
    assert (tmp_path / done.outputs[0]).read_bytes() == b"first"  # the refused completion left files alone
    with pytest.raises(ValueError):
        store.resolve_output("../jobs.sqlite3")


def test_complete_rejects_bad_extension_and_unknown_job(store: JobStore) -> None:
    job = store.create("s", {})
    claim_next(store)
    with pytest.raises(ValueError):
        store.complete(job.id, [b"x"], "../evil", {}, seed=None)
    with pytest.raises(KeyError):
        store.complete("0" * 32, [b"x"], "png", {}, seed=None)


def test_fail(store: JobStore, clock: FakeClock) -> None:
    job = store.create("s", {})
    claim_next(store)
    failed = store.fail(job.id, "CUDA out of memory", {"inference_s": 0.1})
    assert failed.status is JobStatus.FAILED
    assert failed.error == "CUDA out of memory"
    assert failed.metrics == {"inference_s": 0.1}
    assert failed.expires_at == clock.now + store.retention_s
    # Already terminal: a second fail does not overwrite the outcome.
    assert store.fail(job.id, "other").error == "CUDA out of memory"
    with pytest.raises(KeyError):
        store.fail("missing", "x")


def test_cancel_queued_fails_immediately(store: JobStore) -> None:
    a = store.create("s", {})
    b = store.create("s", {})
    cancelled = store.request_cancel(a.id)
    assert cancelled is not None
    assert cancelled.status is JobStatus.FAILED
    assert cancelled.error == CANCELLED_BY_CLIENT
    assert cancelled.expires_at is not None
    assert store.position(b.id) == 0
    claimed = claim_next(store)
    assert claimed is not None and claimed.id == b.id  # the cancelled job is never claimed
    assert store.request_cancel("missing") is None


def test_cancel_processing_sets_flag(store: JobStore) -> None:
    job = store.create("s", {})
    claim_next(store)
    assert store.is_cancel_requested(job.id) is False
    flagged = store.request_cancel(job.id)
    assert flagged is not None
    assert flagged.status is JobStatus.PROCESSING and flagged.cancel_requested is True
    assert store.is_cancel_requested(job.id) is True
    # The runner notices and fails it; a later cancel leaves the terminal job unchanged.
    store.fail(job.id, CANCELLED_BY_CLIENT)
    again = store.request_cancel(job.id)
    assert again is not None and again.status is JobStatus.FAILED


def test_recover_after_crash(tmp_path: Path, clock: FakeClock) -> None:
    first = open_store(tmp_path, clock, max_attempts=2)
    a = first.create("s", {"n": "a"})
    b = first.create("s", {"n": "b"})
    c = first.create("s", {"n": "c"})
    assert claim_next(first).id == a.id  # type: ignore[union-attr]
    first.set_progress(a.id, 5, 10)
    # "Crash": the store is abandoned without completing the job or closing;
    # a new store on the same file plays the restarted process.

    second = open_store(tmp_path, clock, max_attempts=2)
    counts = second.recover()
    assert counts == {"requeued": 1, "failed": 0, "cancelled": 0, "queued": 3}
    requeued = second.get(a.id)
    assert requeued is not None
    assert requeued.status is JobStatus.QUEUED and requeued.attempts == 1
    assert requeued.started_at is None and requeued.progress_step is None
    # Original order is kept: the interrupted job runs first again.
    assert [second.position(j.id) for j in (a, b, c)] == [0, 1, 2]
    retry = claim_next(second)
    assert retry is not None and retry.id == a.id and retry.attempts == 2
    second.close()

    third = open_store(tmp_path, clock, max_attempts=2)
    counts = third.recover()
    assert counts == {"requeued": 0, "failed": 1, "cancelled": 0, "queued": 2}
    gone = third.get(a.id)
    assert gone is not None and gone.status is JobStatus.FAILED
    assert gone.error == "interrupted by a server restart after 2 attempts (request_max_attempts=2)"
    assert gone.expires_at is not None
    assert claim_next(third).id == b.id  # type: ignore[union-attr]
    third.close()
    first.close()


def test_recover_fails_the_jobs_of_sync_requests_that_died_with_the_process(tmp_path: Path, clock: FakeClock) -> None:
    first = open_store(tmp_path, clock)
    running = first.create("s", {SYNC_PARAM: True}, inputs={"image": b"pixels"})
    queued = first.create("s", {SYNC_PARAM: True})
    kept = first.create("s", {})
    assert claim_next(first).id == running.id  # type: ignore[union-attr]
    second = open_store(tmp_path, clock)
    assert second.recover() == {"requeued": 0, "failed": 2, "cancelled": 0, "queued": 1}
    for job in (running, queued):
        failed = second.get(job.id)
        assert failed.status is JobStatus.FAILED and failed.error.startswith("interrupted")  # type: ignore[union-attr]
    assert second.read_inputs(running.id) == {}  # inputs go with the finished job
    assert claim_next(second).id == kept.id  # type: ignore[union-attr]
    second.close()
    first.close()


def test_recover_honours_pending_cancel(tmp_path: Path, clock: FakeClock) -> None:
    first = open_store(tmp_path, clock)
    job = first.create("s", {})
    claim_next(first)
    first.request_cancel(job.id)
    first.close()
    second = open_store(tmp_path, clock)
    assert second.recover()["cancelled"] == 1
    got = second.get(job.id)
    assert got is not None and got.status is JobStatus.FAILED and got.error == CANCELLED_BY_CLIENT
    second.close()


def test_expired_jobs_hidden_then_purged(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(tmp_path, clock, retention_s=60)
    done = store.create("s", {})
    failed = store.create("s", {})
    pending = store.create("s", {})
    claim_next(store)
    store.complete(done.id, [b"img"], "jpeg", {}, seed=1)
    claim_next(store)
    store.fail(failed.id, "boom")
    out_dir = tmp_path / "outputs" / done.id
    assert out_dir.is_dir()
    orphan = tmp_path / "outputs" / ("f" * 32)
    orphan.mkdir()

    clock.advance(59)
    assert store.get(done.id) is not None
    assert store.purge_expired() == 0
    assert out_dir.is_dir()
    assert not orphan.exists()  # a directory with no job row is swept

    clock.advance(2)
    assert store.get(done.id) is None
    assert store.get(failed.id) is None
    assert store.get(pending.id) is not None  # queued jobs never expire
    assert store.count_by_status() == {"QUEUED": 1, "PROCESSING": 0, "COMPLETED": 0, "FAILED": 0}
    assert store.purge_expired() == 2
    assert not out_dir.exists()
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    finally:
        conn.close()
    store.close()


def test_closed_store_refuses(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(tmp_path, clock)
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.get("x")


def test_outputs_dir_must_be_inside_data_dir(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        JobStore(tmp_path / "a" / "jobs.sqlite3", outputs_dir=tmp_path / "b", clock=clock)


def test_synchronous_full_by_default_normal_on_request(tmp_path: Path) -> None:
    full = JobStore(tmp_path / "full" / "jobs.sqlite3", outputs_dir=tmp_path / "full" / "outputs")
    normal = JobStore(tmp_path / "normal" / "jobs.sqlite3", outputs_dir=tmp_path / "normal" / "outputs",
                      synchronous="NORMAL")
    # PRAGMA synchronous reads back 2 for FULL and 1 for NORMAL.
    assert full._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError, match="FULL or NORMAL"):
        JobStore(tmp_path / "off" / "jobs.sqlite3", outputs_dir=tmp_path / "off" / "outputs", synchronous="OFF")
