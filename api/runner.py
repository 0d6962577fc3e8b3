"""The job runner: every generation, sync (``/v1``) or async (``/v2``), is a job in the ``JobStore``.

``max_concurrent_jobs`` asyncio workers claim jobs in FIFO order (``JobStore.claim_next``), call
``backend.generate``, and store the encoded images (``complete``) or the reason of failure
(``fail``). A ``/v1`` request submits a job like any other and awaits its outcome, so one
concurrency bound and one queue order hold for both APIs.

While a job runs its worker polls, every ``cancel_poll_s``: the cancel flag (``POST
/v2/requests/{id}/cancel``), the job deadline (``job_timeout_s``), and the progress reported by
the backend, which it writes to the store. Stopping a job is cancelling the task that awaits
``generate``.

Restarts: ``start`` calls ``JobStore.recover``, which requeues jobs a dead process left
PROCESSING (or fails them after ``max_attempts``); queued jobs simply stay queued. Async jobs
find their decoded input images on disk (``api.inputs``); a sync job's stay in memory. Either
way the backend gets the uint8 ``[H, W, 3]`` arrays ``api.images`` decoded at submission. A
sync job's client died with the process, so a sync job found after a restart is failed
("interrupted") instead of run for nobody. A background task purges expired jobs, their outputs and leftover inputs.

Shared store (``RedisJobStore``, scale-out): the same runner, with the queue operations of the
store that several processes share. Workers take jobs with ``claim`` (only the slugs their
backend serves), heartbeat while a job runs (which also carries the cancel flag set by any API
replica) and give a job up when the heartbeat says another worker owns it now; inputs of every
job, sync or async, are ``.npy`` blobs stored with it; outcomes are stored with ``complete``/
``fail(claim=...)`` and credits settled once per job (``job_id=``), so two workers finishing
one job charge once. A ``/v1`` request waits for its job's outcome through Redis (one event
subscription per process, plus a re-read every second), whichever worker runs it. A runner
built with ``run_jobs=False`` (the ``api`` role) takes no jobs. Redis unreachable
(``StoreUnavailable``) makes workers back off and retry; nothing accepted is dropped.
"""

from __future__ import annotations

import asyncio
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

from api.backend import BackendError, GenerationBackend
from api.inputs import InputsLost, InputStore, pixels_from_bytes, pixels_to_bytes, stored_reference
from api.jobs import CANCELLED_BY_CLIENT, Claim, InvalidJobTransition, Job, JobStatus, JobStore
from api.redis_client import StoreUnavailable
from api.redis_jobs import RedisJobStore
from api.metrics import ApiMetrics
from api.quotas import CreditLedger
from engine.catalog import get_model, resolve_seed
from engine.imageio import DEFAULT_QUALITY, EXTENSIONS, encode_image

logger = logging.getLogger(__name__)

SYNC_PARAM = "_sync"
"""Reserved key in stored job params marking a job whose ``/v1`` request awaits it in memory."""

HTTP_STATUS_METRIC = "http_status"
"""Metrics key of a job FAILED on a shared store: the status its ``/v1`` request answers (the
waiting API replica is another process than the worker that failed it)."""

ADVERTISE_TTL_S = 30.0
"""How long a worker's announcement of its slugs holds; renewed every few seconds."""


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
    """Every image param of the slug: its decoded uint8 [H, W, 3] pixels (``api.images``) or None."""
    owner: str | None
    output_format: str
    want_base64: bool
    sync: bool


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
    progress: tuple[int, int] | None = None


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        backend: GenerationBackend,
        inputs: InputStore,
        ledger: CreditLedger,
        metrics: ApiMetrics,
        *,
        max_concurrent_jobs: int,
        max_queued_jobs: int,
        job_timeout_s: float,
        cancel_poll_s: float,
        purge_interval_s: float,
        idle_poll_s: float = 0.5,
        cancel_grace_s: float = 30.0,
        run_jobs: bool = True,
        worker_name: str | None = None,
    ):
        self.store = store
        self.backend = backend
        self.inputs = inputs
        self.ledger = ledger
        self.metrics = metrics
        self.max_concurrent_jobs = max_concurrent_jobs
        self.max_queued_jobs = max_queued_jobs
        self.job_timeout_s = job_timeout_s
        self.cancel_poll_s = cancel_poll_s
        self.purge_interval_s = purge_interval_s
        self.idle_poll_s = idle_poll_s
        self.cancel_grace_s = cancel_grace_s
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, _Running] = {}
        self._waiters: dict[str, asyncio.Future[JobOutcome]] = {}
        self._sync_inputs: dict[str, dict[str, np.ndarray | None]] = {}
        self._reserved: set[str] = set()
        self._pending_stops: dict[str, _Stop] = {}
        self._stopping = False
        self.run_jobs = run_jobs
        self.shared = isinstance(store, RedisJobStore)
        self.worker_name = worker_name or default_worker_name()
        self._finished_events: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Future | None = None
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
        self._tasks = []
        if self.run_jobs:
            worker = self._shared_worker if self.shared else self._worker
            self._tasks = [asyncio.create_task(worker(i), name=f"job-worker-{i}")
                           for i in range(self.max_concurrent_jobs)]
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="job-purge"))
        if self.shared:
            loop = asyncio.get_running_loop()
            self._listener = loop.run_in_executor(None, self.store.listen_finished,
                                                  lambda job_id: loop.call_soon_threadsafe(self._finished, job_id),
                                                  lambda: self._stopping)
            if self.run_jobs:
                self._tasks.append(asyncio.create_task(self._advertise_loop(), name="job-advertise"))

    async def stop(self) -> None:
        """Stop the workers; a job cut short stays PROCESSING and is requeued at the next start
        (on Redis: reclaimed by another worker once its heartbeat is missed)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for future in self._waiters.values():
            future.cancel()
        if self.shared:
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
        """Persist a new QUEUED job; raises ``QueueFull`` or ``quotas.InsufficientCredits``
        (on a shared store also ``StoreUnavailable``)."""
        if self.shared:
            return await self._submit_shared(sub)
        depth = self.store.queue_depth()
        if depth >= self.max_queued_jobs:
            raise QueueFull(f"the queue is full ({depth} requests waiting); retry later")
        stored = dict(sub.params)
        if stored.get("seed") == -1:
            # Drawn here, not by the backend, so a job retried after a crash repeats its image.
            stored["seed"] = resolve_seed(-1)
        for name, image in sub.images.items():
            stored[name] = None if image is None or sub.sync else stored_reference(name)
        if sub.sync:
            stored[SYNC_PARAM] = True
        to_stage = {name: image for name, image in sub.images.items() if image is not None}
        staging = await asyncio.to_thread(self.inputs.stage, to_stage) if to_stage and not sub.sync else None

        # From here to the end no await: workers share this event loop, so none can claim the
        # job before its inputs, reservation and waiter are in place.
        cost = get_model(sub.slug).image_count(stored)
        try:
            self.ledger.reserve(sub.owner, cost)
        except BaseException:
            if staging is not None:
                self.inputs.discard(staging)
            raise
        try:
            job = self.store.create(sub.slug, stored, owner=sub.owner, output_format=sub.output_format,
                                    want_base64=sub.want_base64)
            if staging is not None:
                self.inputs.commit(staging, job.id)
        except BaseException:
            self.ledger.release(sub.owner, cost)
            if staging is not None:
                self.inputs.discard(staging)
            raise
        self._reserved.add(job.id)
        if sub.sync:
            self._sync_inputs[job.id] = dict(sub.images)
            self._waiters[job.id] = asyncio.get_running_loop().create_future()
        self._wake.set()
        logger.info("request %s queued: %s (%d image%s) owner=%s", job.id, sub.slug, cost,
                    "" if cost == 1 else "s", (sub.owner or "-")[:12])
        return job

    async def _submit_shared(self, sub: Submission) -> Job:
        depth = await asyncio.to_thread(self.store.queue_depth)
        if depth >= self.max_queued_jobs:
            raise QueueFull(f"the queue is full ({depth} requests waiting); retry later")
        stored = dict(sub.params)
        if stored.get("seed") == -1:
            stored["seed"] = resolve_seed(-1)
        blobs = {}
        for name, image in sub.images.items():
            stored[name] = None if image is None else stored_reference(name)
            if image is not None:
                blobs[name] = pixels_to_bytes(image, name)
        cost = get_model(sub.slug).image_count(stored)
        await asyncio.to_thread(self.ledger.reserve, sub.owner, cost)
        try:
            job = await asyncio.to_thread(self.store.create, sub.slug, stored, owner=sub.owner,
                                          output_format=sub.output_format, want_base64=sub.want_base64, inputs=blobs)
        except BaseException:
            # A create whose reply was lost may have queued the job; then its worker's debit
            # finds no reservation (never below zero) instead of the caller paying twice.
            try:
                await asyncio.to_thread(self.ledger.release, sub.owner, cost)
            except StoreUnavailable:
                logger.warning("could not release the reservation of a refused %s request", sub.slug)
            raise
        if sub.sync:
            self._finished_events[job.id] = asyncio.Event()
        logger.info("request %s queued: %s (%d image%s) owner=%s", job.id, sub.slug, cost,
                    "" if cost == 1 else "s", (sub.owner or "-")[:12])
        return job

    def _finished(self, job_id: str) -> None:
        event = self._finished_events.get(job_id)
        if event is not None:
            event.set()

    async def _wait_shared(self, job_id: str, timeout_s: float,
                           is_disconnected: Callable[[], Awaitable[bool]] | None) -> JobOutcome:
        event = self._finished_events.setdefault(job_id, asyncio.Event())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                try:
                    job = await asyncio.to_thread(self.store.get, job_id)
                except StoreUnavailable as exc:
                    logger.warning("request %s: waiting for Redis: %s", job_id, exc)
                    job = None
                if job is not None and job.status.terminal:
                    return await self._outcome_shared(job)
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
                    # The event is the fast path; the re-read covers events lost while disconnected.
                    await asyncio.wait_for(event.wait(), max(0.0, min(deadline - loop.time(), 1.0)))
                except asyncio.TimeoutError:
                    pass
        except asyncio.CancelledError:
            await asyncio.shield(self.cancel_async(
                job_id, _Stop("client_gone", "cancelled: the request handler was stopped", 499)))
            raise
        finally:
            self._finished_events.pop(job_id, None)

    async def _outcome_shared(self, job: Job) -> JobOutcome:
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
        """``cancel`` without blocking the event loop on a shared store."""
        if not self.shared:
            return self.cancel(job_id, stop)
        try:
            return await asyncio.to_thread(self._cancel_shared, job_id, stop)
        except StoreUnavailable as exc:
            if stop is _CANCELLED:
                raise
            logger.warning("request %s: could not cancel (%s): %s", job_id, stop.reason, exc)
            return None

    def _cancel_shared(self, job_id: str, stop: _Stop) -> Job | None:
        before = self.store.get(job_id)
        if before is None:
            return None
        if before.status.terminal:
            return before
        if stop is _CANCELLED:
            # QUEUED: failed at once by the store; PROCESSING: its worker sees the flag in its heartbeat.
            job = self.store.request_cancel(job_id)
        else:
            # A timed-out or abandoned sync request: fail it here, whichever worker holds it; that
            # worker's heartbeat then reports the job gone and it stops.
            job = self.store.fail(job_id, stop.error, metrics={HTTP_STATUS_METRIC: stop.status_code})
        if job is not None and job.status is JobStatus.FAILED:
            self._settle_shared(job)
            self.metrics.job_failed(job.slug, stop.reason)
            logger.info("request %s failed (%s): %s", job.id, stop.reason, job.error)
        return job

    async def wait(self, job_id: str, timeout_s: float,
                   is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> JobOutcome:
        """Await the outcome of a sync job; cancels it on timeout or client disconnect."""
        if self.shared:
            return await self._wait_shared(job_id, timeout_s, is_disconnected)
        future = self._waiters[job_id]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=max(0.0, min(deadline - loop.time(), 0.5)))
                if done:
                    return future.result()
                if loop.time() >= deadline:
                    message = f"the request did not finish within {timeout_s:g} s"
                    self.cancel(job_id, _Stop("sync_timeout", f"timed out: {message} (sync request)", 504))
                    raise SyncTimeout(message)
                if is_disconnected is not None and await is_disconnected():
                    logger.info("request %s: client disconnected; cancelling", job_id)
                    self.cancel(job_id, _Stop("client_gone", "cancelled: the client disconnected", 499))
                    raise ClientGone(job_id)
        except asyncio.CancelledError:
            self.cancel(job_id, _Stop("client_gone", "cancelled: the request handler was stopped", 499))
            raise
        finally:
            self._waiters.pop(job_id, None)

    def cancel(self, job_id: str, stop: _Stop = _CANCELLED) -> Job | None:
        """Cancel a job: a queued one fails at once, a running one is stopped by its worker.

        Returns the job as it is now (terminal jobs unchanged), or None if unknown or expired.
        """
        if self.shared:
            return self._cancel_shared(job_id, stop)
        before = self.store.get(job_id)
        if before is None:
            return None
        if before.status is JobStatus.QUEUED and stop is not _CANCELLED:
            job = self.store.fail(job_id, stop.error)
        else:
            job = self.store.request_cancel(job_id)
        if job is None:
            return None
        if before.status is JobStatus.QUEUED and job.status is JobStatus.FAILED:
            # Nothing will run it any more, so settle it here.
            self._settle_failed(job, stop.reason, stop.status_code)
        elif job.status is JobStatus.PROCESSING:
            running = self._running.get(job_id)
            if running is not None and running.stop is None and running.task is not None:
                running.stop = stop
                running.task.cancel()
            elif running is None:
                # Claimed but not started yet: its worker sees the store's cancel flag and uses this.
                self._pending_stops[job_id] = stop
        return job

    # -- workers ---------------------------------------------------------------------------------

    async def _worker(self, index: int = 0) -> None:
        while not self._stopping:
            try:
                job = self.store.claim_next()
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the worker
                logger.exception("claiming the next job failed")
                await asyncio.sleep(self.idle_poll_s)
                continue
            if job is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.idle_poll_s)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving; the job is failed below
                logger.exception("request %s: runner error", job.id)
                await self._fail(job, "internal error while running the request", "internal", 500)

    async def _shared_worker(self, index: int) -> None:
        consumer = f"{self.worker_name}-{index}"
        slugs = sorted(self.backend.slugs)
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not self._stopping:
            try:
                claim = await loop.run_in_executor(self._claim_pool, lambda: self.store.claim(consumer, slugs,
                                                                                               block_s=1.0))
                backoff = 0.5
            except StoreUnavailable as exc:
                logger.warning("worker %s: cannot take jobs, retrying in %.1f s: %s", consumer, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the worker
                logger.exception("claiming the next job failed")
                await asyncio.sleep(self.idle_poll_s)
                continue
            if claim is None:
                continue
            try:
                await self._run(claim.job, claim)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving; the job is failed below
                logger.exception("request %s: runner error", claim.job.id)
                await self._fail(claim.job, "internal error while running the request", "internal", 500, claim)

    async def _advertise_loop(self) -> None:
        """Tell API replicas which slugs this process takes (they answer 404 for slugs nobody serves)."""
        slugs = sorted(self.backend.slugs)
        while not self._stopping:
            try:
                await asyncio.to_thread(self.store.advertise, self.worker_name, slugs, ADVERTISE_TTL_S)
            except StoreUnavailable:
                pass  # the claim loop logs the outage
            await asyncio.sleep(min(5.0, ADVERTISE_TTL_S / 3))

    async def _run(self, job: Job, claim: Claim | None = None) -> None:
        spec = get_model(job.slug)
        params = {k: v for k, v in job.params.items() if not k.startswith("_")}
        if claim is not None:
            try:
                stored = await asyncio.to_thread(self.store.read_inputs, job.id) if spec.image_params else {}
                images = pixels_from_bytes(stored, job.params, spec.image_params)
            except InputsLost as exc:
                await self._fail(job, f"the request's input images were lost: {exc}", "inputs_lost", 500, claim)
                return
        elif job.params.get(SYNC_PARAM):
            images = self._sync_inputs.pop(job.id, None)
            if images is None or job.id not in self._waiters:
                await self._fail(job, "interrupted: the synchronous request that submitted this job was lost "
                                "(server restart or client gone)", "interrupted", 500)
                return
        else:
            try:
                images = await asyncio.to_thread(self.inputs.load, job.id, job.params, spec.image_params)
            except InputsLost as exc:
                await self._fail(job, f"the request's input images were lost: {exc}", "inputs_lost", 500)
                return
        params.update(images)
        queue_s = max(0.0, (job.started_at or job.created_at) - job.created_at)
        logger.info("request %s started: %s (attempt %d, queued %.2f s)", job.id, job.slug, job.attempts, queue_s)

        running = _Running()
        running.task = asyncio.create_task(self._generate(job, params, running))
        self._running[job.id] = running
        self.metrics.jobs_running.inc()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.job_timeout_s
        last_progress = None
        next_beat = loop.time()
        lost = False
        try:
            while not running.task.done():
                await asyncio.wait({running.task}, timeout=self.cancel_poll_s)
                if running.progress != last_progress and running.progress is not None:
                    last_progress = running.progress
                    try:
                        await self._store_call(self.store.set_progress, job.id, *last_progress)
                    except StoreUnavailable:
                        last_progress = None  # written again once Redis is back
                if claim is not None and loop.time() >= next_beat and not running.task.done():
                    next_beat = loop.time() + min(1.0, self.store.heartbeat_interval_s)
                    try:
                        beat = await asyncio.to_thread(self.store.heartbeat, claim)
                    except StoreUnavailable as exc:
                        logger.warning("request %s: heartbeat failed: %s", job.id, exc)
                    else:
                        if not beat.owned:
                            # Reclaimed (this worker looked dead) or finished elsewhere: another
                            # outcome is or will be stored; this run's would be dropped anyway.
                            logger.warning("request %s: delivery %d lost to another worker; abandoning it",
                                           job.id, claim.attempt)
                            lost = True
                            running.task.cancel()
                            await asyncio.wait({running.task}, timeout=self.cancel_grace_s)
                            break
                        if beat.cancel_requested and running.stop is None:
                            running.stop = _CANCELLED
                            running.task.cancel()
                if running.task.done() or running.stop is not None:
                    if running.stop is not None and not running.task.done():
                        await asyncio.wait({running.task}, timeout=self.cancel_grace_s)
                        if not running.task.done():
                            logger.error("request %s: backend ignored cancellation for %.0f s; abandoning it",
                                         job.id, self.cancel_grace_s)
                    break
                if claim is None and self.store.is_cancel_requested(job.id):
                    running.stop = self._pending_stops.pop(job.id, _CANCELLED)
                elif loop.time() > deadline:
                    running.stop = _Stop("timeout", f"timed out: generation took longer than "
                                                    f"{self.job_timeout_s:g} s", 504)
                if running.stop is not None:
                    running.task.cancel()
        except asyncio.CancelledError:
            # The runner is stopping: stop the work too and leave the job PROCESSING for recover().
            running.task.cancel()
            await asyncio.wait({running.task}, timeout=self.cancel_grace_s)
            raise
        finally:
            self._running.pop(job.id, None)
            self._pending_stops.pop(job.id, None)
            self.metrics.jobs_running.dec()

        task = running.task
        if lost:
            return
        if running.stop is not None:
            await self._fail(job, running.stop.error, running.stop.reason, running.stop.status_code, claim)
            return
        if not task.done() or task.cancelled():
            await self._fail(job, "the backend cancelled the generation", "cancelled", 500, claim)
            return
        exc = task.exception()
        if isinstance(exc, BackendError):
            logger.warning("request %s failed: %s: %s", job.id, type(exc).__name__, exc)
            await self._fail(job, str(exc) or type(exc).__name__, exc.reason, exc.status_code, claim)
            return
        if exc is not None:
            logger.error("request %s: backend raised", job.id, exc_info=exc)
            await self._fail(job, "internal error while generating", "internal", 500, claim)
            return
        if claim is not None:
            await self._complete_shared(job, params, task.result(), queue_s)
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
        fmt = job.output_format
        try:
            done = await asyncio.to_thread(self.store.complete, job.id, outputs, EXTENSIONS[fmt], metrics, result.seed)
        except (InvalidJobTransition, KeyError) as exc:
            logger.warning("request %s finished but could not be completed: %s", job.id, exc)
            self._settle_failed(self.store.get(job.id) or job, "lost", status_code=500)
            return
        self.ledger.debit(job.owner, get_model(job.slug).image_count(job.params), reserved=job.id in self._reserved)
        self._reserved.discard(job.id)
        self.inputs.delete(job.id)
        self.metrics.job_completed(job.slug, queue_s, inference_s)
        logger.info("request %s completed in %.2f s (inference %.2f s)", job.id, metrics["total_time"], inference_s)
        self._resolve(job.id, JobOutcome(done, outputs))

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

    async def _store_call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

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

    async def _complete_shared(self, job: Job, params: dict[str, Any], result, queue_s: float) -> None:
        outputs, metrics, inference_s = await self._encode(job, params, result, queue_s)
        metrics["deliveries"] = job.attempts
        try:
            done = await self._until_stored("outcome", job, self.store.complete, job.id, outputs,
                                            EXTENSIONS[job.output_format], metrics, result.seed)
        except (InvalidJobTransition, KeyError) as exc:
            logger.warning("request %s finished but another outcome was stored first: %s", job.id, exc)
            current = await self._until_stored("outcome", job, self.store.get, job.id)
            if current is not None:
                await self._until_stored("credits", job, self._settle_shared, current)
            return
        await self._until_stored("credits", job, self._settle_shared, done)
        self.metrics.job_completed(job.slug, queue_s, inference_s)
        logger.info("request %s completed in %.2f s (inference %.2f s, delivery %d)", job.id, metrics["total_time"],
                    inference_s, job.attempts)

    def _settle_shared(self, job: Job) -> None:
        """Debit a COMPLETED job's credits or release a FAILED one's, at most once per job (any process)."""
        if not job.status.terminal or self.ledger.allowance(job.owner) is None:
            return
        cost = get_model(job.slug).image_count(job.params)
        if job.status is JobStatus.COMPLETED:
            self.ledger.debit(job.owner, cost, reserved=True, job_id=job.id)
        else:
            self.ledger.release(job.owner, cost, job_id=job.id)

    async def _fail(self, job: Job, error: str, reason: str, status_code: int, claim: Claim | None = None) -> None:
        if claim is not None:
            try:
                failed = await self._until_stored("failure", job, self.store.fail, job.id, error,
                                                  {HTTP_STATUS_METRIC: status_code, "deliveries": job.attempts},
                                                  claim=claim)
            except KeyError:
                return
            if failed.status is JobStatus.FAILED:
                await self._until_stored("credits", job, self._settle_shared, failed)
                if failed.error == error:
                    self.metrics.job_failed(job.slug, reason)
                    logger.info("request %s failed (%s): %s", job.id, reason, error)
            return
        try:
            failed = self.store.fail(job.id, error)
        except KeyError:
            failed = job
        self._settle_failed(failed, reason, status_code)

    def _settle_failed(self, job: Job, reason: str, status_code: int) -> None:
        """Release what a job that produced nothing held: credits, inputs, a waiting request."""
        if job.id in self._reserved:
            self._reserved.discard(job.id)
            self.ledger.release(job.owner, get_model(job.slug).image_count(job.params))
        self._sync_inputs.pop(job.id, None)
        self.inputs.delete(job.id)
        self.metrics.job_failed(job.slug, reason)
        logger.info("request %s failed (%s): %s", job.id, reason, job.error)
        self._resolve(job.id, JobOutcome(job, status_code=status_code))

    def _resolve(self, job_id: str, outcome: JobOutcome) -> None:
        future = self._waiters.get(job_id)
        if future is not None and not future.done():
            future.set_result(outcome)

    # -- housekeeping ----------------------------------------------------------------------------

    async def _purge_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.to_thread(self.store.purge_expired)
                if self.shared:
                    await asyncio.to_thread(self._settle_finished)
                else:
                    await asyncio.to_thread(self.inputs.sweep, self._is_pending)
            except StoreUnavailable as exc:
                logger.warning("purging expired jobs skipped: %s", exc)
            except Exception:  # noqa: BLE001 - retried at the next interval
                logger.exception("purging expired jobs failed")
            await asyncio.sleep(self.purge_interval_s)

    def _settle_finished(self) -> None:
        """Settle credits of finished jobs nobody settled: those the store's claim failed itself
        (the delivery cap, a cancel found at claim time) or whose worker died right after storing
        the outcome. Settling is once per job, so repeating it for settled jobs changes nothing."""
        if not self.ledger.enabled:
            return
        for job_id in self.store.finished_ids():
            job = self.store.get(job_id)
            if job is not None:
                self._settle_shared(job)

    def _is_pending(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and not job.status.terminal


def _encode_all(images: list[np.ndarray], fmt: str, quality: int) -> list[bytes]:
    return [encode_image(np.ascontiguousarray(pixels), fmt, quality) for pixels in images]
