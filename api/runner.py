"""The job runner: every generation, sync (``/v1``) or async (``/v2``), is a job in the job queue.

One code path against :class:`diffserve.api.queue.JobQueue`, whichever store holds the jobs (the embedded
SQLite store or Redis shared by API replicas and workers). ``max_concurrent_jobs`` asyncio
workers lease jobs with ``claim`` (only the slugs their backend serves, in the store's claim
order), call ``backend.generate`` and store the encoded images (``complete``) or the reason of
failure (``fail`` fenced by the lease). A ``/v1`` request submits a job like any other and
awaits its outcome, so one concurrency bound and one queue order hold for both APIs. A runner
built with ``run_jobs=False`` (the ``api`` role) takes no jobs.

While a job runs its worker polls, every ``cancel_poll_s``: the job deadline (``job_timeout_s``)
and the progress reported by the backend, which it writes to the store; and every
``heartbeat_interval_s`` of the store it confirms its lease (``heartbeat``), which also carries
the cancel flag set by any process (``POST /v2/requests/{id}/cancel``). A worker gives a job up
when the heartbeat says it no longer holds it (reclaimed, or failed elsewhere). A cancel issued
in this process stops its running job at once. Stopping a job is cancelling the task that
awaits ``generate``.

Inputs: the decoded uint8 ``[H, W, 3]`` arrays ``diffserve.api.images`` made at submission are stored with
the job as ``.npy`` blobs (``diffserve.api.inputs``), so whichever worker takes the job, after a restart
too, runs on exactly those pixels. Restarts: ``start`` calls the store's ``recover`` (the
embedded store requeues what a dead process left PROCESSING and fails the jobs of ``/v1``
requests that died with it; on Redis reclaim covers dead workers).

Credits: a submission reserves its cost; a finished job is settled once (``debit`` or
``release`` keyed by the job id, so a repeat changes nothing). Settling follows storing the
outcome, and a sweep (at start and every ``purge_interval_s``) settles every finished job
again, so a job whose runner stopped or died between the two, or whose outcome the store
decided itself (delivery cap, recovery), is charged or released exactly once. A ``/v1``
request waits for its job through the store's finished-job feed (one subscription per process)
plus a re-read every half second, whichever worker runs it. A store that cannot be reached
(``StoreUnavailable``) makes workers back off and retry; nothing accepted is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffserve.api.backend import BackendError, GenerationBackend
from diffserve.api.inputs import InputsLost, pixels_from_bytes, pixels_to_bytes, stored_reference
from diffserve.api.jobs import CANCELLED_BY_CLIENT, SYNC_PARAM, Claim, InvalidJobTransition, Job, JobStatus
from diffserve.api.metrics import ApiMetrics
from diffserve.api.queue import JobQueue
from diffserve.api.quotas import CreditLedger
from diffserve.api.redis_client import StoreUnavailable
from diffserve.engine.catalog import get_model, resolve_seed
from diffserve.engine.imageio import DEFAULT_QUALITY, EXTENSIONS, encode_image

logger = logging.getLogger(__name__)

HTTP_STATUS_METRIC = "http_status"
"""Metrics key of a FAILED job: the status its ``/v1`` request answers (the waiting process may
be another than the one that failed it)."""

ADVERTISE_TTL_S = 30.0
"""How long a worker's announcement of its slugs holds; renewed every few seconds."""

CLAIM_BLOCK_S = 1.0
"""How long one claim waits for a job before the worker looks whether it is stopping."""


def default_worker_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix (pids repeat across containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class QueueFull(Exception):
    pass


class SyncTimeout(Exception):
    """A ``/v1`` request waited ``sync_timeout_s`` without an outcome; its job was cancelled."""


class ClientGone(Exception):
    """A ``/v1`` client disconnected before its job finished; its job was cancelled."""


@dataclass
class Submission:
    slug: str
    params: dict[str, Any]
    """Catalog-validated params; image params are replaced from ``images``."""
    images: dict[str, np.ndarray | None]
    """Every image param of the slug: its decoded uint8 [H, W, 3] pixels (``diffserve.api.images``) or None."""
    owner: str | None
    output_format: str
    want_base64: bool
    sync: bool
    priority: int = 0
    """0 to ``diffserve.api.jobs.MAX_PRIORITY``, already checked against the caller's cap."""
    job_id: str | None = None
    """The id the job is created under (an idempotency reservation's); None: the store draws one."""


@dataclass
class JobOutcome:
    job: Job
    outputs: list[bytes] = field(default_factory=list)
    """Encoded images of a COMPLETED job."""
    status_code: int | None = None
    """For a FAILED job: the HTTP status a sync request answers."""


@dataclass(frozen=True)
class _Stop:
    """Why a running job is being stopped: metrics label, client-facing error, sync HTTP status."""

    reason: str
    error: str
    status_code: int


_CANCELLED = _Stop("cancelled", CANCELLED_BY_CLIENT, 409)


@dataclass
class _Running:
    task: asyncio.Task | None = None
    stop: _Stop | None = None
    stored: bool = False
    """The stop's failure was stored by whoever stopped the job: the worker only lets go of it."""
    progress: tuple[int, int] | None = None


class JobRunner:
    def __init__(
        self,
        store: JobQueue,
        backend: GenerationBackend,
        ledger: CreditLedger,
        metrics: ApiMetrics,
        *,
        max_concurrent_jobs: int,
        max_queued_jobs: int,
        job_timeout_s: float,
        cancel_poll_s: float,
        purge_interval_s: float,
        cancel_grace_s: float = 30.0,
        run_jobs: bool = True,
        worker_name: str | None = None,
    ):
        self.store = store
        self.backend = backend
        self.ledger = ledger
        self.metrics = metrics
        self.max_concurrent_jobs = max_concurrent_jobs
        self.max_queued_jobs = max_queued_jobs
        self.job_timeout_s = job_timeout_s
        self.cancel_poll_s = cancel_poll_s
        self.purge_interval_s = purge_interval_s
        self.cancel_grace_s = cancel_grace_s
        self.run_jobs = run_jobs
        self.worker_name = worker_name or default_worker_name()
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, _Running] = {}
        self._finished_events: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Future | None = None
        self._stopping = False
        # Claims block up to a second in a thread each; their own pool keeps them from starving
        # the default executor (image encoding, store reads).
        self._claim_pool = ThreadPoolExecutor(max_workers=max_concurrent_jobs, thread_name_prefix="job-claim")

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            counts = await asyncio.to_thread(self.store.recover)
        except StoreUnavailable as exc:
            # Nothing to repair on Redis (reclaim covers dead workers); start and wait for it.
            logger.warning("starting while the job store is unreachable: %s", exc)
            counts = {"queued": 0, "requeued": 0, "failed": 0, "cancelled": 0}
        logger.info("job queue: %d queued after recovery (%d requeued, %d failed, %d cancelled)",
                    counts["queued"], counts["requeued"], counts["failed"], counts["cancelled"])
        self._stopping = False
        self._tasks = [asyncio.create_task(self._purge_loop(), name="job-purge")]
        if self.run_jobs and self.backend.slugs:
            self._tasks += [asyncio.create_task(self._worker(i), name=f"job-worker-{i}")
                            for i in range(self.max_concurrent_jobs)]
            self._tasks.append(asyncio.create_task(self._advertise_loop(), name="job-advertise"))
        loop = asyncio.get_running_loop()
        self._listener = loop.run_in_executor(None, self.store.listen_finished,
                                              lambda job_id: loop.call_soon_threadsafe(self._finished, job_id),
                                              lambda: self._stopping)

    async def stop(self) -> None:
        """Stop the workers; a job cut short stays PROCESSING and is run again (requeued by the
        embedded store's recovery at the next start, reclaimed on Redis once its heartbeat is missed)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for event in self._finished_events.values():
            event.set()  # waiters see the runner stopping
        if self.run_jobs:
            try:
                await asyncio.to_thread(self.store.withdraw, self.worker_name)
            except StoreUnavailable:
                pass
        if self._listener is not None:
            await asyncio.gather(self._listener, return_exceptions=True)
        self._claim_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def running_count(self) -> int:
        return len(self._running)

    # -- submission ------------------------------------------------------------------------------

    async def submit(self, sub: Submission) -> Job:
        """Persist a new QUEUED job with its inputs; raises ``QueueFull``,
        ``quotas.InsufficientCredits``, ``StoreUnavailable`` or ``diffserve.api.jobs.DuplicateJob`` (a job has
        ``sub.job_id`` already; its credits were not taken)."""
        depth = await asyncio.to_thread(self.store.queue_depth)
        if depth >= self.max_queued_jobs:
            raise QueueFull(f"the queue is full ({depth} requests waiting); retry later")
        stored = dict(sub.params)
        if stored.get("seed") == -1:
            # Drawn here, not by the backend, so a job run again after a crash repeats its image.
            stored["seed"] = resolve_seed(-1)
        blobs = {}
        for name, image in sub.images.items():
            stored[name] = None if image is None else stored_reference(name)
            if image is not None:
                blobs[name] = pixels_to_bytes(image, name)
        if sub.sync:
            stored[SYNC_PARAM] = True
        cost = get_model(sub.slug).image_count(stored)
        await asyncio.to_thread(self.ledger.reserve, sub.owner, cost)
        try:
            job = await asyncio.to_thread(self.store.create, sub.slug, stored, owner=sub.owner,
                                          output_format=sub.output_format, want_base64=sub.want_base64, inputs=blobs,
                                          priority=sub.priority, job_id=sub.job_id)
        except BaseException:
            # A create whose reply was lost may have queued the job; then its settlement finds no
            # reservation (never below zero) instead of the caller paying twice.
            try:
                await asyncio.to_thread(self.ledger.release, sub.owner, cost)
            except StoreUnavailable:
                logger.warning("could not release the reservation of a refused %s request", sub.slug)
            raise
        if sub.sync:
            self._finished_events[job.id] = asyncio.Event()
        logger.info("request %s queued: %s (%d image%s, priority %d) owner=%s", job.id, sub.slug, cost,
                    "" if cost == 1 else "s", sub.priority, (sub.owner or "-")[:12])
        return job

    def _finished(self, job_id: str) -> None:
        event = self._finished_events.get(job_id)
        if event is not None:
            event.set()

    async def wait(self, job_id: str, timeout_s: float,
                   is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> JobOutcome:
        """Await the outcome of a sync job, whichever process runs it; cancels it on timeout or
        client disconnect."""
        event = self._finished_events.setdefault(job_id, asyncio.Event())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                try:
                    job = await asyncio.to_thread(self.store.get, job_id)
                except StoreUnavailable as exc:
                    logger.warning("request %s: waiting for the job store: %s", job_id, exc)
                    job = None
                if job is not None and job.status.terminal:
                    return await self._outcome(job)
                if self._stopping:
                    # The server is going down: the job stays (a restart fails it as interrupted
                    # on the embedded store; on Redis another worker may still finish it).
                    raise asyncio.CancelledError
                if loop.time() >= deadline:
                    message = f"the request did not finish within {timeout_s:g} s"
                    await self.cancel_async(job_id, _Stop("sync_timeout", f"timed out: {message} (sync request)", 504))
                    raise SyncTimeout(message)
                if is_disconnected is not None and await is_disconnected():
                    logger.info("request %s: client disconnected; cancelling", job_id)
                    await self.cancel_async(job_id, _Stop("client_gone", "cancelled: the client disconnected", 499))
                    raise ClientGone(job_id)
                event.clear()
                try:
                    # The event is the fast path; the re-read covers events the feed dropped, and
                    # every half second the client is checked for a disconnect.
                    await asyncio.wait_for(event.wait(), max(0.0, min(deadline - loop.time(), 0.5)))
                except asyncio.TimeoutError:
                    pass
        except asyncio.CancelledError:
            if not self._stopping:
                await asyncio.shield(self.cancel_async(
                    job_id, _Stop("client_gone", "cancelled: the request handler was stopped", 499)))
            raise
        finally:
            self._finished_events.pop(job_id, None)

    async def _outcome(self, job: Job) -> JobOutcome:
        if job.status is JobStatus.COMPLETED:
            outputs = []
            for index in range(len(job.outputs)):
                data = await asyncio.to_thread(self.store.read_output, job.id, index)
                if data is None:
                    return JobOutcome(job, status_code=500)
                outputs.append(data)
            return JobOutcome(job, outputs)
        code = job.metrics.get(HTTP_STATUS_METRIC)
        if code is None:
            code = 409 if job.error == CANCELLED_BY_CLIENT else 500
        return JobOutcome(job, status_code=int(code))

    async def cancel_async(self, job_id: str, stop: _Stop = _CANCELLED) -> Job | None:
        """Cancel a job from any process: a queued one fails at once, a running one is stopped by
        its worker (at once when it runs in this process).

        Returns the job as it is now (terminal jobs unchanged), or None if unknown or expired.
        A client's cancel raises ``StoreUnavailable``; the runner's own (timeouts) logs it.
        """
        try:
            job = await asyncio.to_thread(self._cancel_in_store, job_id, stop)
        except StoreUnavailable as exc:
            if stop is _CANCELLED:
                raise
            logger.warning("request %s: could not cancel (%s): %s", job_id, stop.reason, exc)
            return None
        running = self._running.get(job_id)
        if job is not None and running is not None and running.stop is None and running.task is not None:
            running.stop = stop
            running.stored = job.status is JobStatus.FAILED
            running.task.cancel()
        return job

    def _cancel_in_store(self, job_id: str, stop: _Stop) -> Job | None:
        before = self.store.get(job_id)
        if before is None or before.status.terminal:
            return before
        if stop is _CANCELLED:
            # QUEUED: failed at once by the store; PROCESSING: its worker sees the flag in its heartbeat.
            job = self.store.request_cancel(job_id)
        else:
            # A timed-out or abandoned sync request: fail it here, whichever worker holds it; that
            # worker's heartbeat then reports the job gone and it stops.
            job = self.store.fail(job_id, stop.error, metrics={HTTP_STATUS_METRIC: stop.status_code})
        if job is not None and job.status is JobStatus.FAILED and job.error == stop.error:
            self.metrics.job_failed(job.slug, stop.reason)
            logger.info("request %s failed (%s): %s", job.id, stop.reason, job.error)
            self._settle(job)
        return job

    # -- workers ---------------------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        consumer = f"{self.worker_name}-{index}"
        claim_next = functools.partial(self.store.claim, consumer, sorted(self.backend.slugs), block_s=CLAIM_BLOCK_S)
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not self._stopping:
            try:
                claim = await loop.run_in_executor(self._claim_pool, claim_next)
                backoff = 0.5
            except StoreUnavailable as exc:
                logger.warning("worker %s: cannot take jobs, retrying in %.1f s: %s", consumer, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the worker
                logger.exception("claiming the next job failed")
                await asyncio.sleep(0.5)
                continue
            if claim is None:
                continue
            try:
                await self._run(claim)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving; the job is failed below
                logger.exception("request %s: runner error", claim.job.id)
                await self._fail(claim, "internal error while running the request", "internal", 500)

    async def _advertise_loop(self) -> None:
        """Tell API replicas which slugs this process takes (they answer 404 for slugs nobody serves)."""
        slugs = sorted(self.backend.slugs)
        while not self._stopping:
            try:
                await asyncio.to_thread(self.store.advertise, self.worker_name, slugs, ADVERTISE_TTL_S)
            except StoreUnavailable:
                pass  # the claim loop logs the outage
            await asyncio.sleep(min(5.0, ADVERTISE_TTL_S / 3))

    async def _run(self, claim: Claim) -> None:
        job = claim.job
        spec = get_model(job.slug)
        params = {k: v for k, v in job.params.items() if not k.startswith("_")}
        try:
            stored = await asyncio.to_thread(self.store.read_inputs, job.id) if spec.image_params else {}
            params.update(pixels_from_bytes(stored, job.params, spec.image_params))
        except InputsLost as exc:
            await self._fail(claim, f"the request's input images were lost: {exc}", "inputs_lost", 500)
            return
        queue_s = max(0.0, (job.started_at or job.created_at) - job.created_at)
        logger.info("request %s started: %s (attempt %d, queued %.2f s)", job.id, job.slug, job.attempts, queue_s)

        running = _Running()
        running.task = asyncio.create_task(self._generate(job, params, running))
        self._running[job.id] = running
        self.metrics.jobs_running.inc()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.job_timeout_s
        beat_every = min(1.0, self.store.heartbeat_interval_s)
        last_progress = None
        next_beat = loop.time()
        lost = False
        try:
            while not running.task.done():
                await asyncio.wait({running.task}, timeout=self.cancel_poll_s)
                if running.progress != last_progress and running.progress is not None:
                    last_progress = running.progress
                    try:
                        await asyncio.to_thread(self.store.set_progress, job.id, *last_progress)
                    except StoreUnavailable:
                        last_progress = None  # written again once the store is back
                if running.stop is None and loop.time() >= next_beat and not running.task.done():
                    next_beat = loop.time() + beat_every
                    try:
                        beat = await asyncio.to_thread(self.store.heartbeat, claim)
                    except StoreUnavailable as exc:
                        logger.warning("request %s: heartbeat failed: %s", job.id, exc)
                    else:
                        if not beat.owned:
                            # Reclaimed (this worker looked dead) or finished elsewhere: another
                            # outcome is or will be stored; this run's would be dropped anyway.
                            logger.warning("request %s: delivery %d lost; abandoning it", job.id, claim.attempt)
                            running.stop, running.stored = _CANCELLED, True
                        elif beat.cancel_requested:
                            running.stop = _CANCELLED
                        if running.stop is not None:
                            running.task.cancel()
                if running.stop is None and loop.time() > deadline:
                    running.stop = _Stop("timeout", f"timed out: generation took longer than "
                                                    f"{self.job_timeout_s:g} s", 504)
                    running.task.cancel()
                if running.stop is not None:
                    await asyncio.wait({running.task}, timeout=self.cancel_grace_s)
                    if not running.task.done():
                        logger.error("request %s: backend ignored cancellation for %.0f s; abandoning it",
                                     job.id, self.cancel_grace_s)
                    break
        except asyncio.CancelledError:
            # The runner is stopping: stop the work too and leave the job PROCESSING (run again later).
            running.task.cancel()
            await asyncio.wait({running.task}, timeout=self.cancel_grace_s)
            raise
        finally:
            self._running.pop(job.id, None)
            self.metrics.jobs_running.dec()
            lost = running.stored

        task = running.task
        if lost:
            return
        if running.stop is not None:
            await self._fail(claim, running.stop.error, running.stop.reason, running.stop.status_code)
            return
        if task.cancelled():
            await self._fail(claim, "the backend cancelled the generation", "cancelled", 500)
            return
        exc = task.exception()
        if isinstance(exc, BackendError):
            logger.warning("request %s failed: %s: %s", job.id, type(exc).__name__, exc)
            await self._fail(claim, str(exc) or type(exc).__name__, exc.reason, exc.status_code)
            return
        if exc is not None:
            logger.error("request %s: backend raised", job.id, exc_info=exc)
            await self._fail(claim, "internal error while generating", "internal", 500)
            return
        await self._complete(job, params, task.result(), queue_s)

    async def _generate(self, job: Job, params: dict[str, Any], running: _Running):
        def on_progress(done: int, total: int) -> None:
            # May be called from backend threads: one attribute assignment, flushed by the worker.
            running.progress = (int(done), int(total))

        started = time.perf_counter()
        result = await self.backend.generate(job.slug, params, request_id=job.id, on_progress=on_progress)
        result.timings.setdefault("compute", time.perf_counter() - started)
        return result

    async def _complete(self, job: Job, params: dict[str, Any], result, queue_s: float) -> None:
        outputs, metrics, inference_s = await self._encode(job, params, result, queue_s)
        metrics["deliveries"] = job.attempts
        try:
            done = await self._until_stored("outcome", job, self.store.complete, job.id, outputs,
                                            EXTENSIONS[job.output_format], metrics, result.seed)
        except (InvalidJobTransition, KeyError) as exc:
            logger.warning("request %s finished but another outcome was stored first: %s", job.id, exc)
            current = await self._until_stored("outcome", job, self.store.get, job.id)
            if current is not None:
                await self._until_stored("credits", job, self._settle, current)
            return
        self.metrics.job_completed(job.slug, queue_s, inference_s)
        logger.info("request %s completed in %.2f s (inference %.2f s, delivery %d)", job.id, metrics["total_time"],
                    inference_s, job.attempts)
        # Stopped or killed right here, the job is settled by the next sweep (``_settle_finished``).
        await self._until_stored("credits", job, self._settle, done)

    def _settle(self, job: Job) -> None:
        """Debit a COMPLETED job's credits or release a FAILED one's, at most once per job (any process)."""
        if not job.status.terminal or self.ledger.allowance(job.owner) is None:
            return
        cost = get_model(job.slug).image_count(job.params)
        if job.status is JobStatus.COMPLETED:
            self.ledger.debit(job.owner, cost, job_id=job.id)
        else:
            self.ledger.release(job.owner, cost, job_id=job.id)

    async def _fail(self, claim: Claim, error: str, reason: str, status_code: int) -> None:
        """Store the failure of this delivery's run (ignored once the lease no longer holds) and settle it."""
        job = claim.job
        try:
            failed = await self._until_stored("failure", job, self.store.fail, job.id, error,
                                              {HTTP_STATUS_METRIC: status_code, "deliveries": job.attempts},
                                              claim=claim)
        except KeyError:
            return
        if failed.status is JobStatus.FAILED:
            if failed.error == error:
                self.metrics.job_failed(job.slug, reason)
                logger.info("request %s failed (%s): %s", job.id, reason, error)
            await self._until_stored("credits", job, self._settle, failed)

    # -- housekeeping ----------------------------------------------------------------------------

    async def _purge_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.to_thread(self.store.purge_expired)
                await asyncio.to_thread(self._settle_finished)
            except StoreUnavailable as exc:
                logger.warning("purging expired jobs skipped: %s", exc)
            except Exception:  # noqa: BLE001 - retried at the next interval
                logger.exception("purging expired jobs failed")
            await asyncio.sleep(self.purge_interval_s)

    def _settle_finished(self) -> None:
        """Settle credits of finished jobs nobody settled: those the store finished itself (the
        delivery cap, a cancel found at claim time, recovery) or whose runner stopped or died
        between storing the outcome and settling it. Settling is once per job, so repeating it
        for settled jobs changes nothing."""
        if not self.ledger.enabled:
            return
        for job_id in self.store.finished_ids():
            job = self.store.get(job_id)
            if job is not None:
                self._settle(job)


    async def _encode(self, job: Job, params: dict[str, Any], result, queue_s: float):
        fmt = job.output_format
        quality = int(params.get("image_quality") or DEFAULT_QUALITY)
        encode_start = time.perf_counter()
        outputs = await asyncio.to_thread(_encode_all, result.images, fmt, quality)
        encode_s = time.perf_counter() - encode_start
        inference_s = float(result.timings.get("compute", 0.0))
        metrics: dict[str, Any] = {
            "inference_time": round(inference_s, 4),
            "queue_time": round(queue_s, 4),
            "encode_time": round(encode_s, 4),
        }
        for stage, seconds in result.timings.items():
            if stage != "compute":
                metrics[f"backend_{stage}_time"] = round(float(seconds), 4)
        metrics["total_time"] = round(max(0.0, time.time() - job.created_at), 4)
        return outputs, metrics, inference_s

    async def _until_stored(self, what: str, job: Job, fn, *args, **kwargs):
        """Run a store write, retrying while Redis is unreachable: the outcome of a finished job is
        kept in memory until Redis takes it (a retry after a lost reply is refused as a second
        outcome, never stored twice)."""
        backoff = 0.5
        while True:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except StoreUnavailable as exc:
                if self._stopping:
                    raise
                logger.warning("request %s: storing its %s failed, retrying in %.1f s: %s", job.id, what, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


def _encode_all(images: list[np.ndarray], fmt: str, quality: int) -> list[bytes]:
    return [encode_image(np.ascontiguousarray(pixels), fmt, quality) for pixels in images]
