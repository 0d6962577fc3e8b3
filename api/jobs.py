"""Persistent store for generation jobs, backed by SQLite: the embedded :class:`diffserve.api.queue.JobQueue`.

This module owns the lifecycle of queued jobs so that they survive an API
restart: creation (with the job's decoded input images, kept in the database
until the job finishes), claiming by runners under a trivial lease in
priority order with aging (:func:`claim_rank`; FIFO within a level),
progress, completion (including writing output files under the data
directory), failure, cancellation, crash recovery at start-up, expiry/purging
of finished jobs together with their files, and a finished-job feed for
waiters in this process (:meth:`JobStore.listen_finished`).

Concurrency model: one ``sqlite3`` connection per store, shared by all
threads and serialised by a lock; WAL journaling plus ``BEGIN IMMEDIATE`` for
every read-modify-write so that several stores (threads or processes) on the
same file never claim the same job.  Timestamps are REAL epoch seconds from
an injectable clock.  Output paths in :class:`Job.outputs` are relative to the
data directory (the directory holding the database file), so the data
directory can be moved as a whole.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

__all__ = [
    "Claim",
    "DuplicateJob",
    "Heartbeat",
    "InvalidJobTransition",
    "Job",
    "JobStatus",
    "JobStore",
    "MAX_PRIORITY",
    "SYNC_PARAM",
    "claim_rank",
    "is_job_id",
    "new_job_id",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
CANCELLED_BY_CLIENT: Final = "cancelled by client"
MAX_PRIORITY: Final = 9
"""Priorities run from 0 (the default) to this; higher is claimed first (see :func:`claim_rank`)."""
SYNC_PARAM: Final = "_sync"
"""Reserved key in stored job params marking a job a ``/v1`` request awaits while connected."""
INTERRUPTED_SYNC: Final = ("interrupted: the synchronous request that submitted this job was lost "
                           "(server restart or client gone)")
_EXT_RE: Final = re.compile(r"^[A-Za-z0-9]{1,10}$")
_JOB_ID_RE: Final = re.compile(r"^[0-9a-f]{32}$")
"""A job id: ``uuid4().hex`` (128 random bits, so output URLs can be capability URLs)."""


def claim_rank(created_at: float, priority: int, aging_s: float) -> float:
    """Where a queued job stands in the claim order: smaller is claimed first, ties in submission order.

    A job of priority ``p`` ranks as if it had been submitted ``p * aging_s`` earlier: higher
    priority goes first, and since its advantage is bounded, a waiting job is never overtaken by
    jobs submitted more than ``MAX_PRIORITY * aging_s`` after it (anti-starvation by aging). The
    rank is fixed at submission, so queue positions are stable and every store orders by it.
    """
    return created_at - priority * aging_s


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the form of a job id (checked before it reaches SQL or a path)."""
    return _JOB_ID_RE.fullmatch(text) is not None


def new_job_id() -> str:
    """A fresh job id (what ``create`` draws when it is given none)."""
    return uuid.uuid4().hex


def chosen_job_id(job_id: str | None) -> str:
    """The id a ``create`` uses: ``job_id`` (ValueError unless it has a job id's form) or a new one."""
    if job_id is None:
        return new_job_id()
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


class JobStatus(str, Enum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


class InvalidJobTransition(RuntimeError):
    """A state change was asked of a job that is not in a state allowing it."""


class DuplicateJob(ValueError):
    """``create`` was given the id of a job that exists already (nothing was queued)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"a job with id {job_id} exists already")


@dataclass
class Job:
    id: str
    slug: str
    params: dict[str, Any]
    status: JobStatus
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    progress_step: int | None = None
    progress_total: int | None = None
    seed: int | None = None
    owner: str | None = None
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    cancel_requested: bool = False
    expires_at: float | None = None
    want_base64: bool = False
    output_format: str = "jpeg"
    priority: int = 0


@dataclass(frozen=True)
class Claim:
    """One delivery of a job to one consumer (a lease): what heartbeat, complete and fail need to
    name it. On Redis ``stream``/``entry_id`` are the job's stream entry; on SQLite the slug and id."""

    job: Job
    stream: str
    entry_id: str
    consumer: str

    @property
    def attempt(self) -> int:
        return self.job.attempts


@dataclass(frozen=True)
class Heartbeat:
    owned: bool
    """False: the job was reclaimed by another worker or finished elsewhere; stop working on it."""
    cancel_requested: bool


_SCHEMA_V1: Final = """
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    slug             TEXT    NOT NULL,
    params           TEXT    NOT NULL,
    status           TEXT    NOT NULL
                     CHECK (status IN ('QUEUED', 'PROCESSING', 'COMPLETED', 'FAILED')),
    error            TEXT,
    created_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    progress_step    INTEGER,
    progress_total   INTEGER,
    seed             INTEGER,
    owner            TEXT,
    outputs          TEXT    NOT NULL DEFAULT '[]',
    metrics          TEXT    NOT NULL DEFAULT '{}',
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    expires_at       REAL,
    want_base64      INTEGER NOT NULL DEFAULT 0,
    output_format    TEXT    NOT NULL DEFAULT 'jpeg'
);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE INDEX jobs_expires_at ON jobs (expires_at) WHERE expires_at IS NOT NULL;
"""

_SCHEMA_V2: Final = """
CREATE TABLE job_inputs (
    job_id TEXT NOT NULL,
    name   TEXT NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN claim_rank REAL;
UPDATE jobs SET claim_rank = created_at;
CREATE INDEX jobs_status_rank ON jobs (status, claim_rank, seq);
"""

# Index i upgrades user_version i to i + 1.
_MIGRATIONS: Final[tuple[str, ...]] = (_SCHEMA_V1, _SCHEMA_V2)

_COLUMNS: Final = (
    "id, slug, params, status, error, created_at, started_at, finished_at, progress_step, "
    "progress_total, seed, owner, outputs, metrics, attempts, cancel_requested, expires_at, "
    "want_base64, output_format, priority"
)


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on a connection opened with ``isolation_level=None``
    (the caller holds the connection's lock); rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # Also covers a failed COMMIT, which would otherwise leave the
        # shared connection stuck inside a transaction.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        slug=row["slug"],
        params=json.loads(row["params"]),
        status=JobStatus(row["status"]),
        error=row["error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        progress_step=row["progress_step"],
        progress_total=row["progress_total"],
        seed=row["seed"],
        owner=row["owner"],
        outputs=json.loads(row["outputs"]),
        metrics=json.loads(row["metrics"]),
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        expires_at=row["expires_at"],
        want_base64=bool(row["want_base64"]),
        output_format=row["output_format"],
        priority=row["priority"],
    )


class JobStore:
    """Thread-safe persistent job queue; see the module docstring for the model."""

    name: Final = "sqlite"
    heartbeat_interval_s: Final = 0.5
    """How often a runner confirms its lease: a local read; one process runs this store's jobs,
    so a lease is never taken over while that process lives."""

    def __init__(
        self,
        path: Path,
        *,
        outputs_dir: Path,
        retention_s: float = 3600.0,
        max_attempts: int = 2,
        priority_aging_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 10.0,
        synchronous: str = "FULL",
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = Path(path).resolve()
        self.data_dir = self.path.parent
        self.outputs_dir = Path(outputs_dir).resolve()
        # Stored output paths are relative to the data dir; that only works
        # if the outputs live inside it.
        if not self.outputs_dir.is_relative_to(self.data_dir):
            raise ValueError(f"outputs_dir {self.outputs_dir} must be inside the data dir {self.data_dir}")
        self.retention_s = float(retention_s)
        self.max_attempts = max_attempts
        self.priority_aging_s = float(priority_aging_s)
        self.address = str(self.data_dir)
        self._clock = clock
        self._lock = threading.RLock()
        # Notified on every enqueue, so a blocking claim in this process wakes at once.
        self._enqueued = threading.Condition(self._lock)
        # One queue per listen_finished call; ids of jobs that became COMPLETED or FAILED.
        self._listeners: set[queue.SimpleQueue[str]] = set()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are issued explicitly, so the
        # sqlite3 module never opens a deferred one behind our back (a
        # deferred read-then-write transaction can fail with SQLITE_BUSY
        # instead of waiting).
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path),
            timeout=busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL fsyncs the WAL at every commit, so a job acknowledged to a client survives a
        # power loss; NORMAL (WAL mode) survives a process crash only. The value is checked above.
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # -- infrastructure ----------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("JobStore is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A locked ``BEGIN IMMEDIATE`` transaction: takes the write lock up front."""
        with self._lock, immediate_transaction(self._db) as db:
            yield db

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has job schema version {version}, newer than this code ({SCHEMA_VERSION})"
                )
            for target in range(version, SCHEMA_VERSION):
                logger.info("migrating job store %s to schema version %d", self.path, target + 1)
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
            if version != SCHEMA_VERSION:
                # PRAGMA takes no bound parameters; the value is our constant.
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _fetch(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row is not None else None

    def _expired(self, job: Job, now: float) -> bool:
        return job.expires_at is not None and job.expires_at < now

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ---------------------------------------------------------------

    def resolve_output(self, relative: str) -> Path:
        """Absolute path of an entry of :attr:`Job.outputs` (guarded against traversal)."""
        candidate = (self.data_dir / relative).resolve()
        if not candidate.is_relative_to(self.outputs_dir):
            raise ValueError(f"output path {relative!r} escapes the outputs directory")
        return candidate

    def read_output(self, job_id: str, index: int) -> bytes | None:
        """Output ``index`` of a COMPLETED job, or None (unknown, not completed, no such output, expired)."""
        job = self.get(job_id)
        if job is None or job.status is not JobStatus.COMPLETED or not 0 <= index < len(job.outputs):
            return None
        try:
            return self.resolve_output(job.outputs[index]).read_bytes()
        except FileNotFoundError:  # purged between the read of the row and of the file
            return None

    def _job_dir(self, job_id: str) -> Path:
        return self.outputs_dir / job_id

    # -- lifecycle -----------------------------------------------------------

    def create(
        self,
        slug: str,
        params: dict[str, Any],
        *,
        owner: str | None = None,
        output_format: str = "jpeg",
        want_base64: bool = False,
        inputs: Mapping[str, bytes] | None = None,
        priority: int = 0,
        job_id: str | None = None,
    ) -> Job:
        """Insert a new QUEUED job with its input images (``{param: bytes}``) and return it; with
        ``job_id`` under that id (raises :class:`DuplicateJob` if a job has it, an expired one until purged)."""
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be 0 to {MAX_PRIORITY}, got {priority}")
        job = Job(
            id=chosen_job_id(job_id),
            slug=slug,
            params=params,
            status=JobStatus.QUEUED,
            created_at=self._clock(),
            owner=owner,
            want_base64=want_base64,
            output_format=output_format,
            priority=priority,
        )
        # Serialise before taking the write lock so bad params fail cheaply.
        params_json = json.dumps(params)
        with self._write() as db:
            try:
                db.execute(
                    "INSERT INTO jobs (id, slug, params, status, created_at, owner, want_base64, output_format, "
                    "priority, claim_rank) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, slug, params_json, job.status.value, job.created_at, owner, int(want_base64),
                     output_format, priority, claim_rank(job.created_at, priority, self.priority_aging_s)),
                )
            except sqlite3.IntegrityError:
                raise DuplicateJob(job.id) from None
            db.executemany("INSERT INTO job_inputs (job_id, name, data) VALUES (?, ?, ?)",
                           [(job.id, name, data) for name, data in (inputs or {}).items()])
        with self._enqueued:
            self._enqueued.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown or expired (expired rows await purge)."""
        with self._lock:
            job = self._fetch(self._db, job_id)
        if job is None or self._expired(job, self._clock()):
            return None
        return job

    def read_inputs(self, job_id: str) -> dict[str, bytes]:
        """The input images stored with the job (deleted when it finishes)."""
        with self._lock:
            rows = self._db.execute("SELECT name, data FROM job_inputs WHERE job_id = ?", (job_id,)).fetchall()
        return {row["name"]: bytes(row["data"]) for row in rows}

    def _finished(self, db: sqlite3.Connection, job_id: str) -> None:
        """What reaching COMPLETED or FAILED means besides the row (inside its transaction)."""
        db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
        for listener in list(self._listeners):
            listener.put(job_id)

    def _claim_oldest(self, slugs: Sequence[str]) -> Job | None:
        now = self._clock()
        where = f" AND slug IN ({','.join('?' * len(slugs))})"
        with self._write() as db:
            row = db.execute(f"SELECT seq FROM jobs WHERE status = 'QUEUED'{where} ORDER BY claim_rank, seq LIMIT 1",
                             list(slugs)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'PROCESSING', attempts = attempts + 1, started_at = ?, "
                "progress_step = NULL, progress_total = NULL WHERE seq = ?",
                (now, row["seq"]),
            )
            claimed = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE seq = ?", (row["seq"],)).fetchone()
        return _row_to_job(claimed)

    def claim(self, consumer: str, slugs: Sequence[str], *, block_s: float = 0.0) -> Claim | None:
        """Take the first QUEUED job of ``slugs`` in claim order for ``consumer`` (a trivial lease:
        one process runs the jobs of a SQLite store, so nothing is reclaimed while it lives;
        :meth:`recover` requeues what a dead process held). Waits up to ``block_s`` for one to be
        enqueued."""
        if not slugs:
            raise ValueError("claim needs at least one slug")
        deadline = time.monotonic() + block_s
        while True:
            job = self._claim_oldest(slugs)
            if job is not None:
                return Claim(job=job, stream=job.slug, entry_id=job.id, consumer=consumer)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._enqueued:
                # Re-polled at least every half second for jobs another process enqueued.
                self._enqueued.wait(min(left, 0.5))

    def heartbeat(self, claim: Claim) -> Heartbeat:
        """Whether ``claim`` still holds its job (same delivery, still PROCESSING) and if it is cancelled."""
        with self._lock:
            job = self._fetch(self._db, claim.job.id)
        if job is None:
            return Heartbeat(owned=False, cancel_requested=False)
        owned = job.status is JobStatus.PROCESSING and job.attempts == claim.attempt
        return Heartbeat(owned=owned, cancel_requested=job.cancel_requested)

    def set_progress(self, job_id: str, step: int, total: int | None) -> bool:
        """Record progress of a PROCESSING job; False if it is not processing."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET progress_step = ?, progress_total = ? WHERE id = ? AND status = 'PROCESSING'",
                (step, total, job_id),
            )
            return cur.rowcount == 1

    def complete(
        self,
        job_id: str,
        outputs: list[bytes],
        ext: str,
        metrics: dict[str, Any],
        seed: int | None,
    ) -> Job:
        """Write the outputs to ``outputs_dir/<id>/<i>.<ext>`` and mark the job COMPLETED.

        Raises KeyError for an unknown job and InvalidJobTransition if the
        job is not PROCESSING (e.g. it was failed or recovered meanwhile);
        files written for a refused completion are removed again.
        """
        if not _EXT_RE.match(ext):
            raise ValueError(f"invalid output extension {ext!r}")
        metrics_json = json.dumps(metrics)
        with self._lock:
            existing = self._fetch(self._db, job_id)
        if existing is None:
            raise KeyError(job_id)
        if existing.status is not JobStatus.PROCESSING:
            raise InvalidJobTransition(f"job {job_id} is {existing.status.value}, not PROCESSING")

        # Files go in before the row flips to COMPLETED so a reader never
        # sees a completed job whose files are missing.
        job_dir = self._job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        relative: list[str] = []
        for index, payload in enumerate(outputs):
            target = job_dir / f"{index}.{ext}"
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            relative.append(target.relative_to(self.data_dir).as_posix())

        now = self._clock()
        try:
            with self._write() as db:
                cur = db.execute(
                    "UPDATE jobs SET status = 'COMPLETED', finished_at = ?, expires_at = ?, outputs = ?, "
                    "metrics = ?, seed = ?, error = NULL WHERE id = ? AND status = 'PROCESSING'",
                    (now, now + self.retention_s, json.dumps(relative), metrics_json, seed, job_id),
                )
                if cur.rowcount != 1:
                    current = self._fetch(db, job_id)
                    state = current.status.value if current else "gone"
                    raise InvalidJobTransition(f"job {job_id} is {state}, not PROCESSING")
                self._finished(db, job_id)
                done = self._fetch(db, job_id)
        except BaseException:
            # Keep the files if some other completion of this job won the race.
            with self._lock:
                current = self._fetch(self._db, job_id)
            if current is None or current.status is not JobStatus.COMPLETED:
                shutil.rmtree(job_dir, ignore_errors=True)
            raise
        assert done is not None
        return done

    def fail(self, job_id: str, error: str, metrics: dict[str, Any] | None = None, *,
             claim: Claim | None = None) -> Job:
        """Mark a QUEUED or PROCESSING job FAILED; terminal jobs are returned unchanged.

        With ``claim`` the failure applies only while that delivery still holds the job (as on
        Redis). Raises KeyError for an unknown job.
        """
        now = self._clock()
        with self._write() as db:
            job = self._fetch(db, job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status.terminal:
                # A runner racing a client cancel must not overwrite the outcome.
                logger.debug("fail(%s) ignored: job already %s", job_id, job.status.value)
                return job
            if claim is not None and (job.status is not JobStatus.PROCESSING or job.attempts != claim.attempt):
                logger.debug("fail(%s) ignored: delivery %d no longer holds it", job_id, claim.attempt)
                return job
            db.execute(
                "UPDATE jobs SET status = 'FAILED', error = ?, finished_at = ?, expires_at = ?, "
                "metrics = COALESCE(?, metrics) WHERE id = ?",
                (error, now, now + self.retention_s, json.dumps(metrics) if metrics is not None else None, job_id),
            )
            self._finished(db, job_id)
            failed = self._fetch(db, job_id)
        assert failed is not None
        return failed

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a job: QUEUED fails at once, PROCESSING gets a flag the runner polls.

        Terminal jobs are returned unchanged; unknown/expired jobs give None.
        """
        now = self._clock()
        with self._write() as db:
            job = self._fetch(db, job_id)
            if job is None or self._expired(job, now):
                return None
            if job.status is JobStatus.QUEUED:
                db.execute(
                    "UPDATE jobs SET status = 'FAILED', error = ?, cancel_requested = 1, finished_at = ?, "
                    "expires_at = ? WHERE id = ?",
                    (CANCELLED_BY_CLIENT, now, now + self.retention_s, job_id),
                )
                self._finished(db, job_id)
            elif job.status is JobStatus.PROCESSING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                return job
            updated = self._fetch(db, job_id)
        return updated

    def is_cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row["cancel_requested"]) if row is not None else False

    def recover(self) -> dict[str, int]:
        """Repair jobs left unfinished by a dead process; call once at start-up.

        Each job left PROCESSING is requeued (keeping its original queue position) if it has
        had fewer than ``max_attempts`` attempts, failed with a reason otherwise, and failed as
        cancelled if a cancel was pending. A job of a ``/v1`` request (``SYNC_PARAM``), queued
        or running, is failed as interrupted: its client was connected to the dead process.
        This assumes no other live process is running jobs from the same file.
        Returns counts: ``requeued``, ``failed``, ``cancelled``, ``queued``.
        """
        now = self._clock()
        counts = {"requeued": 0, "failed": 0, "cancelled": 0, "queued": 0}
        finish = "UPDATE jobs SET status = 'FAILED', error = ?, finished_at = ?, expires_at = ? WHERE id = ?"
        with self._write() as db:
            rows = db.execute(
                "SELECT id, status, attempts, cancel_requested, json_extract(params, '$.' || ?) AS sync FROM jobs "
                "WHERE status = 'PROCESSING' OR (status = 'QUEUED' AND json_extract(params, '$.' || ?)) "
                "ORDER BY seq", (SYNC_PARAM, SYNC_PARAM),
            ).fetchall()
            for row in rows:
                if row["cancel_requested"]:
                    error, count = CANCELLED_BY_CLIENT, "cancelled"
                elif row["sync"]:
                    error, count = INTERRUPTED_SYNC, "failed"
                elif row["attempts"] < self.max_attempts:
                    db.execute(
                        "UPDATE jobs SET status = 'QUEUED', started_at = NULL, progress_step = NULL, "
                        "progress_total = NULL WHERE id = ?",
                        (row["id"],),
                    )
                    counts["requeued"] += 1
                    continue
                else:
                    error = (f"interrupted by a server restart after {row['attempts']} attempts "
                             f"(request_max_attempts={self.max_attempts})")
                    count = "failed"
                db.execute(finish, (error, now, now + self.retention_s, row["id"]))
                self._finished(db, row["id"])
                counts[count] += 1
            counts["queued"] = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'").fetchone()[0]
        # Partial output dirs of requeued/failed jobs are stale; a retry
        # rewrites them and failed jobs have no outputs.
        for row in rows:
            shutil.rmtree(self._job_dir(row["id"]), ignore_errors=True)
        if any(counts[k] for k in ("requeued", "failed", "cancelled")):
            logger.warning("job store recovery: %s", counts)
        return counts

    def purge_expired(self) -> int:
        """Delete expired jobs and their output directories; returns rows deleted.

        Also removes output directories that belong to no job (left by a crash
        between writing files and deleting rows).
        """
        now = self._clock()
        with self._write() as db:
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at < ?", (now,)
                ).fetchall()
            ]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        # Rows go first: a crash here leaves orphan files (swept below on the
        # next run), never rows pointing at missing files.
        for job_id in ids:
            shutil.rmtree(self._job_dir(job_id), ignore_errors=True)
        self._sweep_orphans()
        if ids:
            logger.info("purged %d expired jobs", len(ids))
        return len(ids)

    def _sweep_orphans(self) -> None:
        try:
            entries = [p for p in self.outputs_dir.iterdir() if p.is_dir() and is_job_id(p.name)]
        except FileNotFoundError:
            return
        if not entries:
            return
        with self._lock:
            known = {
                r["id"]
                for r in self._db.execute(
                    f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(entries))})",
                    [p.name for p in entries],
                ).fetchall()
            }
        for entry in entries:
            # Rows are inserted before any file is written, so a directory
            # with no row is garbage, never a job in flight.
            if entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)

    # -- queries -------------------------------------------------------------

    def ping(self) -> None:
        """Raises sqlite3.Error (or RuntimeError once closed) unless the database answers."""
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

    def served_slugs(self) -> dict[str, list[str]]:
        """Slugs announced by workers of other processes: none, the embedded store has one process."""
        return {}

    def advertise(self, worker: str, slugs: Sequence[str], ttl_s: float) -> None:
        """Nothing to announce: the only process using this store serves its own slugs."""

    def withdraw(self, worker: str) -> None:
        """Nothing was announced (see :meth:`advertise`)."""

    def finished_ids(self) -> list[str]:
        """Ids of the unexpired COMPLETED and FAILED jobs."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('COMPLETED', 'FAILED') AND expires_at >= ?", (self._clock(),)
            ).fetchall()
        return [row["id"] for row in rows]

    def listen_finished(self, on_finished: Callable[[str], None], should_stop: Callable[[], bool]) -> None:
        """Call ``on_finished(job_id)`` for every job of this store that reaches COMPLETED or
        FAILED, until ``should_stop()`` (blocking: run it in a thread)."""
        feed: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._listeners.add(feed)
        try:
            while not should_stop():
                try:
                    on_finished(feed.get(timeout=0.5))
                except queue.Empty:
                    pass
        finally:
            self._listeners.discard(feed)

    def queue_depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'").fetchone()[0]

    def count_by_status(self) -> dict[str, int]:
        """Counts of live (unexpired) jobs per status; every status is present."""
        now = self._clock()
        counts = {status.value: 0 for status in JobStatus}
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) AS n FROM jobs WHERE expires_at IS NULL OR expires_at >= ? GROUP BY status",
                (now,),
            ).fetchall()
        for row in rows:
            counts[row["status"]] = row["n"]
        return counts

    def position(self, job_id: str) -> int | None:
        """0-based place of a QUEUED job in the order jobs are claimed (``claim_rank``), else None."""
        with self._lock:
            row = self._db.execute(
                "SELECT (SELECT COUNT(*) FROM jobs q WHERE q.status = 'QUEUED' AND (q.claim_rank < j.claim_rank "
                "OR (q.claim_rank = j.claim_rank AND q.seq < j.seq))) "
                "FROM jobs j WHERE j.id = ? AND j.status = 'QUEUED'",
                (job_id,),
            ).fetchone()
        return int(row[0]) if row is not None else None
