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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from api.backend import BackendError, GenerationBackend
from api.inputs import InputsLost, InputStore, stored_reference
from api.jobs import CANCELLED_BY_CLIENT, InvalidJobTransition, Job, JobStatus, JobStore
from api.metrics import ApiMetrics
from api.quotas import CreditLedger
from engine.catalog import get_model, resolve_seed
from engine.imageio import DEFAULT_QUALITY, EXTENSIONS, encode_image

logger = logging.getLogger(__name__)

SYNC_PARAM = "_sync"
"""Reserved key in stored job params marking a job whose ``/v1`` request awaits it in memory."""


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

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        counts = await asyncio.to_thread(self.store.recover)
        logger.info("job queue: %d queued after recovery (%d requeued, %d failed, %d cancelled)",
                    counts["queued"], counts["requeued"], counts["failed"], counts["cancelled"])
        self._tasks = [asyncio.create_task(self._worker(), name=f"job-worker-{i}")
                       for i in range(self.max_concurrent_jobs)]
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="job-purge"))

    async def stop(self) -> None:
        """Stop the workers; a job cut short stays PROCESSING and is requeued at the next start."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for future in self._waiters.values():
            future.cancel()

    @property
    def running_count(self) -> int:
        return len(self._running)

    # -- submission ------------------------------------------------------------------------------

    async def submit(self, sub: Submission) -> Job:
        """Persist a new QUEUED job; raises ``QueueFull`` or ``quotas.InsufficientCredits``."""
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

    async def wait(self, job_id: str, timeout_s: float,
                   is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> JobOutcome:
        """Await the outcome of a sync job; cancels it on timeout or client disconnect."""
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

    async def _worker(self) -> None:
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
                self._fail(job, "internal error while running the request", "internal", 500)

    async def _run(self, job: Job) -> None:
        spec = get_model(job.slug)
        params = {k: v for k, v in job.params.items() if not k.startswith("_")}
        if job.params.get(SYNC_PARAM):
            images = self._sync_inputs.pop(job.id, None)
            if images is None or job.id not in self._waiters:
                self._fail(job, "interrupted: the synchronous request that submitted this job was lost "
                                "(server restart or client gone)", "interrupted", 500)
                return
        else:
            try:
                images = await asyncio.to_thread(self.inputs.load, job.id, job.params, spec.image_params)
            except InputsLost as exc:
                self._fail(job, f"the request's input images were lost: {exc}", "inputs_lost", 500)
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
        try:
            while not running.task.done():
                await asyncio.wait({running.task}, timeout=self.cancel_poll_s)
                if running.progress != last_progress and running.progress is not None:
                    last_progress = running.progress
                    self.store.set_progress(job.id, *last_progress)
                if running.task.done() or running.stop is not None:
                    if running.stop is not None and not running.task.done():
                        await asyncio.wait({running.task}, timeout=self.cancel_grace_s)
                        if not running.task.done():
                            logger.error("request %s: backend ignored cancellation for %.0f s; abandoning it",
                                         job.id, self.cancel_grace_s)
                    break
                if self.store.is_cancel_requested(job.id):
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
        if running.stop is not None:
            self._fail(job, running.stop.error, running.stop.reason, running.stop.status_code)
            return
        if not task.done() or task.cancelled():
            self._fail(job, "the backend cancelled the generation", "cancelled", 500)
            return
        exc = task.exception()
        if isinstance(exc, BackendError):
            logger.warning("request %s failed: %s: %s", job.id, type(exc).__name__, exc)
            self._fail(job, str(exc) or type(exc).__name__, exc.reason, exc.status_code)
            return
        if exc is not None:
            logger.error("request %s: backend raised", job.id, exc_info=exc)
            self._fail(job, "internal error while generating", "internal", 500)
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
        fmt = job.output_format
        quality = int(params.get("image_quality") or DEFAULT_QUALITY)
        encode_start = time.perf_counter()
        outputs = await asyncio.to_thread(_encode_all, result.images, fmt, quality)
        encode_s = time.perf_counter() - encode_start
        inference_s = float(result.timings.get("compute", 0.0))
        metrics: dict[str, float] = {
            "inference_time": round(inference_s, 4),
            "queue_time": round(queue_s, 4),
            "encode_time": round(encode_s, 4),
        }
        for stage, seconds in result.timings.items():
            if stage != "compute":
                metrics[f"backend_{stage}_time"] = round(float(seconds), 4)
        metrics["total_time"] = round(max(0.0, time.time() - job.created_at), 4)
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

    def _fail(self, job: Job, error: str, reason: str, status_code: int) -> None:
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
                await asyncio.to_thread(self.inputs.sweep, self._is_pending)
            except Exception:  # noqa: BLE001 - retried at the next interval
                logger.exception("purging expired jobs failed")
            await asyncio.sleep(self.purge_interval_s)

    def _is_pending(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and not job.status.terminal


def _encode_all(images: list[np.ndarray], fmt: str, quality: int) -> list[bytes]:
    return [encode_image(np.ascontiguousarray(pixels), fmt, quality) for pixels in images]
