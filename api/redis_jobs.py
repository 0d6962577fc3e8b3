"""Job records, the job queue and job images on Redis, shared by every API replica and worker.

This module owns the scale-out job store: the same record contract as :class:`diffserve.api.jobs.JobStore`
(``Job``/``JobStatus``, QUEUED -> PROCESSING -> COMPLETED | FAILED, progress, a cancel flag,
metrics, owner; finished jobs kept for the retention period, then gone) with Redis as the one
shared truth. Every state change is one Lua script, so it is atomic against every other process.

Queue: one Redis Stream per model slug and priority (``<ns>:queue:<slug>`` for priority 0,
``<ns>:queue:<slug>:p<N>`` above) with one consumer group (``workers``), so a worker reads only the
slugs its Triton serves. Beside them a set per slug (``<ns>:demand:<slug>``) holds the ids of its
queued and running jobs at every priority, added by the create script and removed by the one that
ends the job (complete, fail, cancel, the delivery cap): an autoscaler (KEDA's ``redis`` scaler,
SCARD) reads each slug's demand from one key. :meth:`RedisJobStore.claim` takes work for a named consumer: first entries of
silent workers (XAUTOCLAIM, idle longer than ``reclaim_idle_s``), else the first undelivered entry
in claim order (:func:`diffserve.api.jobs.claim_rank`: priority with aging, FIFO within a level, on the
server's clock) across the served streams (XREADGROUP), and marks the job PROCESSING in the same
script. The ``queued`` index is scored by the same rank, so a position is the order jobs run in. While a job runs its worker calls
:meth:`~RedisJobStore.heartbeat` every few seconds: XCLAIM ... JUSTID to itself resets the entry's
idle time (without counting a delivery), so a long live job is never reclaimed (the
taskiq-redis#101 pitfall); the heartbeat also reports the cancel flag and whether this worker still
owns the job. The outcome is stored, the entry XACKed and deleted in one script; the first
completion of a job wins and a later one raises :class:`CompletionLost`. A job delivered
``max_attempts`` times whose worker went silent again ends FAILED with a reason naming the cap;
``Job.attempts`` is the delivery count and finished jobs carry it as ``metrics["deliveries"]``.

Images: input images of a job (``<ns>:in:<id>``) and its outputs (``<ns>:out:<id>``) are Redis
hashes of bytes beside the record. Inputs are written with the job in one script and deleted when
it finishes; outputs get the record's TTL (the retention), so the three go together. Redis over an
S3-compatible store because outputs live only for the retention period and the stack then has one
stateful service; a blob's write and read cost a small fraction of a generation (``diffserve bench
store`` measures them; the README keeps the figures). The cost is memory: retention x output rate x
image size must fit in Redis's ``maxmemory``.

Faults: no command is retried blindly (a script whose reply was lost may have run, and a second
``create`` would queue the job twice); a Redis that cannot be reached, is loading its data set or
refuses writes raises :class:`StoreUnavailable`, which an API maps to 503. No accepted job is lost
across a Redis restart when Redis runs with ``appendonly yes`` and ``maxmemory-policy noeviction``
(an evicting policy would drop job records). ``appendfsync always``: a write is fsynced before
its reply, so an acknowledged job survives a kill -9 of Redis and a host crash. ``everysec``:
the write reaches the kernel before the reply, so it survives a Redis crash, but a host crash
or power loss can drop the last second or two of writes (Redis's documented ``everysec`` window). RDB
snapshots alone lose everything since the last snapshot.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import redis

from diffserve.api.jobs import (
    MAX_PRIORITY, CANCELLED_BY_CLIENT, Claim, DuplicateJob, Heartbeat, InvalidJobTransition, Job, JobStatus,
    chosen_job_id,
)
from diffserve.api.redis_client import connect, describe, guarded, lua

__all__ = [
    "Claim",
    "CompletionLost",
    "Heartbeat",
    "RedisJobStore",
]

logger = logging.getLogger(__name__)

GROUP: Final = "workers"
_guarded = guarded("the job store")


class CompletionLost(InvalidJobTransition):
    """Another completion (or a failure or cancel) of this job was stored first; this one is dropped."""

    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} is {status or 'gone'}, not PROCESSING: another outcome was stored first")


_SCRIPTS: Final = ("create", "claim", "heartbeat", "progress", "complete", "fail", "cancel")
"""The job scripts, ``api/lua/jobs_<name>.lua``, each run with ``jobs_prelude.lua`` before it."""


def _text(value: bytes | str | None) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _record_to_job(record: Mapping[bytes | str, bytes | str]) -> Job:
    h = {_text(k): _text(v) for k, v in record.items()}

    def num(name: str) -> float | None:
        return float(h[name]) if h.get(name) not in (None, "") else None

    def integer(name: str) -> int | None:
        return int(h[name]) if h.get(name) not in (None, "") else None

    status = JobStatus(h["status"])
    attempts = int(h.get("attempts") or 0)
    metrics = json.loads(h["metrics"]) if h.get("metrics") else {}
    if status.terminal and attempts:
        metrics.setdefault("deliveries", attempts)
    return Job(
        id=h["id"], slug=h["slug"], params=json.loads(h["params"]), status=status, error=h.get("error"),
        created_at=float(h["created_at"]), started_at=num("started_at"), finished_at=num("finished_at"),
        progress_step=integer("progress_step"), progress_total=integer("progress_total"), seed=integer("seed"),
        owner=h.get("owner"), outputs=json.loads(h["outputs"]) if h.get("outputs") else [], metrics=metrics,
        attempts=attempts, cancel_requested=h.get("cancel_requested") == "1", expires_at=num("expires_at"),
        want_base64=h.get("want_base64") == "1", output_format=h.get("output_format") or "jpeg",
        priority=int(h.get("priority") or 0),
    )


def _flat_to_dict(flat: Sequence[Any]) -> dict[Any, Any]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class RedisJobStore:
    """The Redis job store and queue; see the module docstring for the model. Thread-safe."""

    name: Final = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "diffserve",
        retention_s: float = 3600.0,
        max_attempts: int = 2,
        reclaim_idle_s: float = 30.0,
        priority_aging_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 2.0,
        client: redis.Redis | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if reclaim_idle_s <= 0:
            raise ValueError("reclaim_idle_s must be > 0")
        self.retention_s = float(retention_s)
        self.max_attempts = max_attempts
        self.reclaim_idle_s = float(reclaim_idle_s)
        self.priority_aging_s = float(priority_aging_s)
        # A worker heartbeats several times per idle period, so one late beat is not a reclaim.
        self.heartbeat_interval_s = self.reclaim_idle_s / 4
        self._clock = clock
        self._owns_client = client is None
        self._redis = client if client is not None else connect(url, timeout_s=timeout_s)
        self.address = describe(self._redis)
        self._ns = "{" + namespace + "}"
        prelude = lua("jobs_prelude")
        self._scripts = {name: self._redis.register_script(prelude + lua(f"jobs_{name}")) for name in _SCRIPTS}

    # -- infrastructure ----------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    def stream_key(self, slug: str, priority: int = 0) -> str:
        return self._key("queue", slug) if priority == 0 else self._key("queue", slug, f"p{priority}")

    def demand_key(self, slug: str) -> str:
        """The set of ``slug``'s queued and running job ids at every priority (what KEDA scales on)."""
        return self._key("demand", slug)

    def _streams(self, slug: str) -> list[str]:
        return [self.stream_key(slug, priority) for priority in range(MAX_PRIORITY + 1)]

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        base = [self._ns, GROUP, repr(float(self._clock())), int(round(self.retention_s * 1000))]
        return self._scripts[name](keys=list(keys), args=[*base, *args])

    @_guarded
    def ping(self) -> None:
        """Raises StoreUnavailable unless Redis answers (for /readyz)."""
        self._redis.ping()

    @_guarded
    def persistence(self) -> dict[str, str]:
        """Redis's ``appendonly``, ``appendfsync`` and ``maxmemory-policy`` (empty if CONFIG is disabled)."""
        try:
            found = self._redis.config_get("appendonly", "appendfsync", "maxmemory-policy")
        except redis.ResponseError:
            return {}
        return {_text(k): _text(v) for k, v in found.items()}

    def close(self) -> None:
        if self._owns_client:
            self._redis.close()

    def __enter__(self) -> RedisJobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lifecycle -----------------------------------------------------------------------------------

    @_guarded
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
        """Queue a new job (with its input images, if any) and return it; with ``job_id`` under that
        id (raises :class:`DuplicateJob` if a job record has it)."""
        if not 0 <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be 0 to {MAX_PRIORITY}, got {priority}")
        job_id = chosen_job_id(job_id)
        params_json = json.dumps(params)
        blobs: list[Any] = []
        for name, payload in (inputs or {}).items():
            blobs += [name, payload]
        entry = self._run("create",
                          [self._key("seq"), self._key("job", job_id), self.stream_key(slug, priority),
                           self._key("queued"), self._key("in", job_id)],
                          [job_id, slug, params_json, owner or "", int(want_base64), output_format, int(priority),
                           int(round(self.priority_aging_s * 1000)), *blobs])
        if entry is None:
            raise DuplicateJob(job_id)
        job = self.get(job_id)
        assert job is not None
        return job

    @_guarded
    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown or past its retention."""
        record = self._redis.hgetall(self._key("job", job_id))
        if not record:
            return None
        job = _record_to_job(record)
        if job.expires_at is not None and job.expires_at < self._clock():
            return None
        return job

    @_guarded
    def claim(self, consumer: str, slugs: Sequence[str], *, block_s: float = 0.0) -> Claim | None:
        """Take one job of ``slugs`` for ``consumer``: a silent worker's first, else the first
        queued in claim order.

        Waits up to ``block_s`` (at most 1 s per blocking read, so silent workers' jobs are
        reclaimed while waiting) for one to arrive; None if none did.
        """
        if not slugs:
            raise ValueError("claim needs at least one slug")
        streams = [stream for slug in slugs for stream in self._streams(slug)]
        deadline = time.monotonic() + block_s
        while True:
            found = self._run("claim", streams, [consumer, int(self.reclaim_idle_s * 1000), self.max_attempts,
                                                 CANCELLED_BY_CLIENT])
            if _text(found[0]) == "job":
                job = _record_to_job(_flat_to_dict(found[3]))
                logger.info("request %s claimed by %s (delivery %d)", job.id, consumer, job.attempts)
                return Claim(job=job, stream=_text(found[1]), entry_id=_text(found[2]), consumer=consumer)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # Wake on any entry newer than what the script saw, so none slips in between.
            last_ids = [_text(i) for i in found[1:]]
            self._redis.xread(dict(zip(streams, last_ids)), count=1, block=max(1, int(min(left, 1.0) * 1000)))

    @_guarded
    def heartbeat(self, claim: Claim) -> Heartbeat:
        """Keep ``claim``'s entry fresh so it is not reclaimed; says if it is still ours and if cancelled."""
        owned, cancel = self._run("heartbeat", [claim.stream],
                                  [claim.consumer, claim.entry_id, claim.attempt, claim.job.id])
        if not owned:
            logger.warning("request %s: %s no longer holds delivery %d", claim.job.id, claim.consumer, claim.attempt)
        return Heartbeat(owned=bool(owned), cancel_requested=bool(cancel))

    @_guarded
    def set_progress(self, job_id: str, step: int, total: int | None) -> bool:
        """Record progress of a PROCESSING job; False if it is not processing."""
        return bool(self._run("progress", [], [job_id, int(step), "" if total is None else int(total)]))

    @_guarded
    def complete(self, job_id: str, outputs: list[bytes], ext: str, metrics: dict[str, Any],
                 seed: int | None) -> Job:
        """Store the outputs and mark the job COMPLETED, exactly once.

        Raises :class:`CompletionLost` (an ``InvalidJobTransition``) when the job is no longer
        PROCESSING: another worker's completion, a failure or a cancel was stored first.
        """
        if not ext.isalnum() or len(ext) > 10:
            raise ValueError(f"invalid output extension {ext!r}")
        names = [f"{index}.{ext}" for index in range(len(outputs))]
        won, status = self._run("complete", [], [job_id, json.dumps(names), json.dumps(metrics),
                                                 "" if seed is None else int(seed), *outputs])
        if not won:
            if not _text(status):
                raise KeyError(job_id)
            raise CompletionLost(job_id, _text(status))
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    @_guarded
    def fail(self, job_id: str, error: str, metrics: dict[str, Any] | None = None, *,
             claim: Claim | None = None) -> Job:
        """Mark a QUEUED or PROCESSING job FAILED; terminal jobs are returned unchanged.

        With ``claim`` (a worker failing its own run) the failure applies only while that delivery
        still holds the job, so a worker that was presumed dead cannot fail a job another worker
        now runs. Raises KeyError for an unknown job.
        """
        fence = "" if claim is None else claim.attempt
        applied, status = self._run("fail", [], [job_id, error, "" if metrics is None else json.dumps(metrics),
                                                 fence])
        if applied == -1:
            raise KeyError(job_id)
        if not applied:
            logger.debug("fail(%s) ignored: job is %s", job_id, _text(status))
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    @_guarded
    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel from any process: QUEUED fails at once, PROCESSING gets the flag its worker polls.

        Terminal jobs are returned unchanged; unknown/expired jobs give None.
        """
        if self.get(job_id) is None:
            return None
        if self._run("cancel", [], [job_id, CANCELLED_BY_CLIENT]) == -1:
            return None
        return self.get(job_id)

    @_guarded
    def is_cancel_requested(self, job_id: str) -> bool:
        return self._redis.hget(self._key("job", job_id), "cancel_requested") == b"1"

    @_guarded
    def wait_terminal(self, job_id: str, timeout_s: float) -> Job | None:
        """Block until the job is COMPLETED or FAILED (whichever process finished it); None on timeout.

        Subscribes to the job's event channel before looking, so an outcome stored in between
        is not missed; re-reads the record at least every second, since Pub/Sub drops messages
        across reconnects.
        """
        deadline = time.monotonic() + timeout_s
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._key("events", job_id))
            while True:
                job = self.get(job_id)
                if job is None or job.status.terminal:
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                pubsub.get_message(timeout=min(left, 1.0))
        finally:
            pubsub.close()

    def recover(self) -> dict[str, int]:
        """Start-up repair, for the runner's contract: on Redis nothing to do (reclaim covers dead workers)."""
        return {"requeued": 0, "failed": 0, "cancelled": 0, "queued": self.queue_depth()}

    @_guarded
    def purge_expired(self) -> int:
        """Drop expired jobs from the status indexes (Redis's TTL already deleted their records)."""
        now = self._clock()
        pipe = self._redis.pipeline(transaction=False)
        for status in (JobStatus.COMPLETED, JobStatus.FAILED):
            pipe.zremrangebyscore(self._key("finished", status.value), "-inf", f"({now!r}")
        return int(sum(pipe.execute()))

    # -- images --------------------------------------------------------------------------------------

    @_guarded
    def read_inputs(self, job_id: str) -> dict[str, bytes]:
        """The input images stored with the job (deleted when it finishes)."""
        return {_text(k): v for k, v in self._redis.hgetall(self._key("in", job_id)).items()}

    @_guarded
    def read_output(self, job_id: str, index: int) -> bytes | None:
        """Output ``index`` of a completed job, or None (no such output, or past the retention)."""
        return self._redis.hget(self._key("out", job_id), str(int(index)))

    # -- queries -------------------------------------------------------------------------------------

    @_guarded
    def queue_depth(self) -> int:
        return int(self._redis.zcard(self._key("queued")))

    @_guarded
    def count_by_status(self) -> dict[str, int]:
        """Counts of live (unexpired) jobs per status; every status is present."""
        now = self._clock()
        pipe = self._redis.pipeline(transaction=False)
        pipe.zcard(self._key("queued"))
        pipe.scard(self._key("processing"))
        for status in (JobStatus.COMPLETED, JobStatus.FAILED):
            pipe.zcount(self._key("finished", status.value), repr(float(now)), "+inf")
        queued, processing, completed, failed = pipe.execute()
        return {"QUEUED": int(queued), "PROCESSING": int(processing), "COMPLETED": int(completed),
                "FAILED": int(failed)}

    @_guarded
    def position(self, job_id: str) -> int | None:
        """0-based place of a QUEUED job in the (all-slug) claim order, else None."""
        rank = self._redis.zrank(self._key("queued"), job_id)
        return int(rank) if rank is not None else None

    @_guarded
    def lag(self, slug: str) -> int:
        """Entries of ``slug``'s streams (every priority) not yet delivered to any worker.

        Counted as stream length minus pending entries, which is exact because an entry is
        deleted when acknowledged; Redis's own group ``lag`` turns null once entries in the
        middle of the stream were deleted (cancelled queued jobs), so it is not used. An
        autoscaler reads queued + running from :meth:`demand` instead.
        """
        waiting = 0
        for key in self._streams(slug):
            if not self._redis.exists(key):
                continue
            pipe = self._redis.pipeline(transaction=True)
            pipe.xlen(key)
            pipe.xpending(key, GROUP)
            length, pending = pipe.execute()
            waiting += max(0, int(length) - int(pending["pending"]))
        return waiting

    @_guarded
    def demand(self, slug: str) -> int:
        """``slug``'s queued + running jobs at every priority: the SCARD KEDA's ``redis`` scaler reads."""
        return int(self._redis.scard(self.demand_key(slug)))

    # -- workers and events ----------------------------------------------------------------------

    @_guarded
    def advertise(self, worker: str, slugs: Sequence[str], ttl_s: float) -> None:
        """Announce that ``worker`` takes jobs of ``slugs`` for the next ``ttl_s`` seconds."""
        expires = self._clock() + ttl_s
        self._redis.hset(self._key("workers"), worker, json.dumps({"slugs": sorted(slugs), "expires": expires}))

    @_guarded
    def withdraw(self, worker: str) -> None:
        self._redis.hdel(self._key("workers"), worker)

    @_guarded
    def served_slugs(self) -> dict[str, list[str]]:
        """``{slug: [worker, ...]}`` over the workers whose announcement is current; stale ones are dropped."""
        now = self._clock()
        served: dict[str, list[str]] = {}
        stale = []
        for name, raw in self._redis.hgetall(self._key("workers")).items():
            entry = json.loads(raw)
            if entry["expires"] < now:
                stale.append(name)
                continue
            for slug in entry["slugs"]:
                served.setdefault(slug, []).append(_text(name))
        if stale:
            self._redis.hdel(self._key("workers"), *stale)
        return served

    @_guarded
    def finished_ids(self) -> list[str]:
        """Ids of the unexpired COMPLETED and FAILED jobs (for settling credits of jobs whose
        outcome was stored by a script, e.g. the delivery cap, or whose settler crashed)."""
        now = repr(float(self._clock()))
        ids: list[str] = []
        for status in (JobStatus.COMPLETED, JobStatus.FAILED):
            ids += [_text(i) for i in self._redis.zrangebyscore(self._key("finished", status.value), now, "+inf")]
        return ids

    def listen_finished(self, on_finished: Callable[[str], None], should_stop: Callable[[], bool]) -> None:
        """Call ``on_finished(job_id)`` for every job that reaches COMPLETED or FAILED, until ``should_stop()``.

        Blocking (run it in a thread): one pattern subscription for the whole process, so a
        process with many waiting ``/v1`` requests holds one connection, not one each. Pub/Sub
        drops messages while disconnected, so waiters also re-read their job now and then; a
        lost connection is retried every second.
        """
        pattern = self._key("events", "*")
        prefix = len(self._key("events", ""))
        while not should_stop():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(pattern)
                while not should_stop():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "pmessage":
                        on_finished(_text(message["channel"])[prefix:])
            except redis.RedisError as exc:
                logger.debug("job event subscription lost (%s); retrying", exc)
                time.sleep(1.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
