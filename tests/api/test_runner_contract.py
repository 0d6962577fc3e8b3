"""``JobRunner`` as plain CPU logic, on each job store (``kind``: SQLite, Redis): a scripted fake
backend, the real store and the real credit ledger of that kind, no HTTP server (vLLM-scheduler
style). Several runners over one store's data stand for processes: an API replica
(``run_jobs=False``) and workers; a worker "dies" by stopping and closing its store handle.

The fake backend's behaviour is chosen by the request's prompt: ``"ok"`` returns at once,
``"gate:<name>"`` waits for ``FakeBackend.gates[name]``, ``"hang"`` never returns until it is
cancelled, ``"raise:<name>"`` raises ``FakeBackend.errors[name]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from diffserve.api.backend import (
    BackendError, BackendResult, BackendTimeout, BackendUnavailable, GenerationFailed, InputRejected,
)
from diffserve.api.jobs import CANCELLED_BY_CLIENT, JobStatus
from diffserve.api.metrics import ApiMetrics
from diffserve.api.queue import JobQueue
from diffserve.api.quotas import CreditLedger, InsufficientCredits
from diffserve.api.redis_client import StoreUnavailable
from diffserve.api.runner import JobRunner, QueueFull, Submission, SyncTimeout
from diffserve.engine.catalog import get_model

OWNER = "owner-a"


class FakeBackend:
    slugs = ("sd1.5-scifi", "sd1.5-img2img")

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.errors: dict[str, Exception] = {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []  # (request id, slug, params)
        self.cancelled: list[str] = []
        self.active = 0
        self.peak = 0

    async def generate(self, slug, params, *, request_id, on_progress=None) -> BackendResult:
        self.calls.append((request_id, slug, dict(params)))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if on_progress is not None:
                on_progress(1, 4)
            prompt = params["prompt"]
            if prompt.startswith("gate:"):
                await self.gates.setdefault(prompt[5:], asyncio.Event()).wait()
            elif prompt == "hang":
                await asyncio.sleep(3600)
            elif prompt.startswith("raise:"):
                raise self.errors[prompt[6:]]
            count = int(params.get("samples", 1))
            return BackendResult(images=[np.full((16, 24, 3), 10 * i, np.uint8) for i in range(count)],
                                 seed=int(params["seed"]), timings={"compute": 0.01, "denoise": 0.005})
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            raise
        finally:
            self.active -= 1

    async def ready(self) -> dict[str, bool]:
        return {"server": True}

    async def close(self) -> None:
        pass


class RecordingLedger:
    """The real ledger of the store's kind, recording every reservation, release and debit that took effect."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.events: list[tuple[str, str | None, int]] = []
        self.before_debit: Callable[[str | None], None] | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def reserve(self, owner, cost):
        self.inner.reserve(owner, cost)
        self.events.append(("reserve", owner, cost))

    def release(self, owner, cost, *, job_id=None):
        if self.inner.release(owner, cost, job_id=job_id):
            self.events.append(("release", owner, cost))

    def debit(self, owner, cost, *, job_id=None):
        if self.before_debit is not None:
            self.before_debit(job_id)
        if self.inner.debit(owner, cost, job_id=job_id):
            self.events.append(("debit", owner, cost))


@pytest.fixture
def make_runner(kind: str, namespace: str, make_queue, tmp_path, request) -> Callable[..., JobRunner]:
    """``make_runner(**kw)``: a runner with its own store handle and ledger on this test's data
    (``credits`` is the allowance of every owner; ``store_kw`` goes to the store)."""
    made: list[JobRunner] = []

    def make(*, credits: int | None = 100, store_kw: dict | None = None, **kw: Any) -> JobRunner:
        store = make_queue(**(store_kw or {}))
        if kind == "sqlite":
            ledger = CreditLedger(tmp_path / "credits.sqlite", credits, {})
        else:
            from diffserve.api.redis_quotas import RedisCreditLedger

            ledger = RedisCreditLedger(request.getfixturevalue("redis_url"), credits, {}, namespace=namespace)
        options = dict(max_concurrent_jobs=1, max_queued_jobs=100, job_timeout_s=30.0, cancel_poll_s=0.01,
                       purge_interval_s=0.2, cancel_grace_s=5.0) | kw
        runner = JobRunner(store, FakeBackend(), RecordingLedger(ledger), ApiMetrics(), **options)
        made.append(runner)
        return runner

    return make


@contextlib.asynccontextmanager
async def running(*runners: JobRunner, start: bool = True) -> AsyncIterator[None]:
    """Start ``runners`` (unless ``start`` is False) and stop every one at the end."""
    try:
        if start:
            for runner in runners:
                await runner.start()
        yield
    finally:
        for runner in runners:
            await runner.stop()
            runner.ledger.close()


async def die(runner: JobRunner) -> None:
    """The runner's process goes away: its tasks stop and its store handle closes, its job stays PROCESSING."""
    await runner.stop()
    runner.store.close()


def submission(prompt: str = "ok", *, slug: str = "sd1.5-scifi", sync: bool = False, owner: str | None = OWNER,
               images: dict[str, np.ndarray | None] | None = None, **params: Any) -> Submission:
    spec = get_model(slug)
    body = {"prompt": prompt, "seed": 5, **params}
    if images:
        body |= {name: "placeholder" for name, image in images.items() if image is not None}
    validated = spec.validate(body)
    all_images = {name: None for name in spec.image_params} | (images or {})
    return Submission(slug=slug, params=validated, images=all_images, owner=owner,
                      output_format=validated.get("image_format") or spec.output_format,
                      want_base64=False, sync=sync)


async def until(condition, timeout: float = 30.0) -> None:
    """Poll ``condition``; the timeout only bounds a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def finished(store: JobQueue, job_id: str):
    await until(lambda: store.get(job_id).status.terminal)
    return store.get(job_id)


def events(runner: JobRunner) -> list[tuple[str, str | None, int]]:
    return runner.ledger.events


async def settled(runner: JobRunner, count: int) -> list[tuple[str, str | None, int]]:
    """The ledger events once there are ``count`` (settling follows storing the outcome)."""
    await until(lambda: len(events(runner)) >= count)
    return events(runner)


async def debits(*runners: JobRunner) -> list[tuple[str, str | None, int]]:
    """The debits any of ``runners`` made, once there is one (a worker settles its job, or a sweep does)."""
    def made():
        return [event for runner in runners for event in events(runner) if event[0] == "debit"]
    await until(made)
    return made()


# -- queueing --------------------------------------------------------------------------------------


def test_jobs_run_in_submission_order_and_each_is_debited_once(make_runner):
    async def scenario():
        runner = make_runner()
        async with running(runner, start=False):
            jobs = [await runner.submit(submission("ok", samples=n)) for n in (1, 3, 2)]
            assert [runner.store.get(j.id).status for j in jobs] == [JobStatus.QUEUED] * 3
            assert [runner.store.position(j.id) for j in jobs] == [0, 1, 2]
            await runner.start()
            done = [await finished(runner.store, j.id) for j in jobs]
            await asyncio.sleep(0.5)  # settlement sweeps run again: still one debit each
            assert runner.ledger.remaining(OWNER) == 94
        assert [call[0] for call in runner.backend.calls] == [j.id for j in jobs]
        assert all(j.status is JobStatus.COMPLETED for j in done)
        assert [len(j.outputs) for j in done] == [1, 3, 2]
        assert done[1].metrics["backend_denoise_time"] == 0.005 and done[1].seed == 5
        assert done[1].metrics["deliveries"] == 1
        assert events(runner) == [("reserve", OWNER, 1), ("reserve", OWNER, 3), ("reserve", OWNER, 2),
                                  ("debit", OWNER, 1), ("debit", OWNER, 3), ("debit", OWNER, 2)]

    asyncio.run(scenario())


def test_a_drawn_seed_is_fixed_at_submission(make_runner):
    async def scenario():
        runner = make_runner()
        async with running(runner, start=False):
            job = await runner.submit(submission("ok", seed=-1))
            assert runner.store.get(job.id).params["seed"] >= 0

    asyncio.run(scenario())


def test_a_full_queue_refuses_before_reserving(make_runner):
    async def scenario():
        runner = make_runner(max_queued_jobs=2)
        async with running(runner, start=False):
            await runner.submit(submission())
            await runner.submit(submission())
            with pytest.raises(QueueFull, match="2 requests waiting"):
                await runner.submit(submission())
            assert runner.store.queue_depth() == 2
            assert events(runner) == [("reserve", OWNER, 1)] * 2

    asyncio.run(scenario())


def test_insufficient_credits_creates_no_job(make_runner):
    async def scenario():
        runner = make_runner(credits=2)
        async with running(runner, start=False):
            with pytest.raises(InsufficientCredits) as info:
                await runner.submit(submission(samples=3))
            assert (info.value.remaining, info.value.cost) == (2, 3)
            assert runner.store.queue_depth() == 0 and events(runner) == []
            await runner.submit(submission(samples=2))
            with pytest.raises(InsufficientCredits):  # the queued job's reservation counts
                await runner.submit(submission(samples=1))

    asyncio.run(scenario())


def test_concurrency_is_capped_and_progress_is_stored(make_runner):
    async def scenario():
        runner = make_runner(max_concurrent_jobs=2)
        backend = runner.backend
        gate = backend.gates.setdefault("all", asyncio.Event())
        async with running(runner):
            jobs = [await runner.submit(submission("gate:all")) for _ in range(5)]
            await until(lambda: backend.active == 2)
            await until(lambda: runner.store.get(jobs[0].id).progress_step == 1)
            await asyncio.sleep(0.2)  # more time: still no third generation
            assert backend.active == 2 and runner.running_count == 2 and runner.store.queue_depth() == 3
            assert runner.store.get(jobs[0].id).progress_total == 4
            gate.set()
            done = [await finished(runner.store, j.id) for j in jobs]
            await settled(runner, 10)
        assert backend.peak == 2 and all(j.status is JobStatus.COMPLETED for j in done)
        assert sorted(e[0] for e in events(runner)) == ["debit"] * 5 + ["reserve"] * 5

    asyncio.run(scenario())


def test_a_backlog_runs_by_priority_fifo_within_a_level_as_its_positions_say(make_runner):
    async def scenario():
        runner = make_runner(max_queued_jobs=6)
        backend = runner.backend
        async with running(runner):
            blocker = await runner.submit(submission("gate:blocker"))
            await until(lambda: backend.active == 1)
            priorities = [0, 3, 1, 3, 0, 9]
            backlog = [await runner.submit(replace(submission("ok", seed=i), priority=p))
                       for i, p in enumerate(priorities)]
            with pytest.raises(QueueFull):  # the queue is full: priority does not jump it
                await runner.submit(replace(submission("ok"), priority=9))
            expected = [backlog[i].id for i in (5, 1, 3, 2, 0, 4)]
            assert [runner.store.position(job_id) for job_id in expected] == list(range(6))
            backend.gates["blocker"].set()
            for job_id in expected:
                await finished(runner.store, job_id)
        assert [call[0] for call in backend.calls] == [blocker.id, *expected]

    asyncio.run(scenario())


# -- cancel and timeout ----------------------------------------------------------------------------


def test_cancel_a_queued_job_fails_it_at_once_and_releases_its_credits(make_runner):
    async def scenario():
        runner = make_runner()
        backend = runner.backend
        async with running(runner):
            first = await runner.submit(submission("gate:first"))
            queued = await runner.submit(submission("ok", samples=2))
            await until(lambda: backend.active == 1)
            cancelled = await runner.cancel_async(queued.id)
            assert cancelled.status is JobStatus.FAILED and cancelled.error == CANCELLED_BY_CLIENT
            backend.gates["first"].set()
            assert (await finished(runner.store, first.id)).status is JobStatus.COMPLETED
            assert (await runner.cancel_async(first.id)).status is JobStatus.COMPLETED  # terminal: unchanged
            assert await runner.cancel_async("0" * 32) is None
            await settled(runner, 4)
        assert [call[0] for call in backend.calls] == [first.id]  # the cancelled job never ran
        assert events(runner) == [("reserve", OWNER, 1), ("reserve", OWNER, 2), ("release", OWNER, 2),
                                  ("debit", OWNER, 1)]

    asyncio.run(scenario())


def test_cancel_a_running_job_stops_the_backend_and_releases_once(make_runner):
    async def scenario():
        runner = make_runner()
        backend = runner.backend
        async with running(runner):
            job = await runner.submit(submission("hang", samples=2))
            await until(lambda: backend.active == 1)
            # The worker stops it: the answer is PROCESSING, or already FAILED where the worker's
            # heartbeat saw the flag before the store was read back (Redis, a loaded host).
            assert (await runner.cancel_async(job.id)).status in (JobStatus.PROCESSING, JobStatus.FAILED)
            failed = await finished(runner.store, job.id)
            assert failed.status is JobStatus.FAILED and failed.error == CANCELLED_BY_CLIENT
            await until(lambda: runner.running_count == 0)
            assert backend.cancelled == [job.id] and backend.active == 0
            await runner.cancel_async(job.id)  # a second cancel of a finished job settles nothing again
            after = await runner.submit(submission("ok"))
            assert (await finished(runner.store, after.id)).status is JobStatus.COMPLETED
            await settled(runner, 4)
            assert runner.ledger.remaining(OWNER) == 99
        assert events(runner) == [("reserve", OWNER, 2), ("release", OWNER, 2), ("reserve", OWNER, 1),
                                  ("debit", OWNER, 1)]

    asyncio.run(scenario())


def test_cancel_from_another_process_reaches_the_worker_through_its_lease(make_runner):
    async def scenario():
        api, worker = make_runner(run_jobs=False), make_runner()
        async with running(api, worker):
            job = await api.submit(submission("hang", samples=2))
            await until(lambda: worker.backend.active == 1)
            assert (await api.cancel_async(job.id)).status in (JobStatus.PROCESSING, JobStatus.FAILED)  # as above
            failed = await finished(api.store, job.id)
            assert failed.error == CANCELLED_BY_CLIENT
            await until(lambda: worker.backend.cancelled == [job.id])
            await until(lambda: api.ledger.remaining(OWNER) == 100)  # released, not charged

    asyncio.run(scenario())


def test_a_job_past_its_deadline_is_cancelled_and_failed_as_timed_out(make_runner):
    async def scenario():
        runner = make_runner(job_timeout_s=0.2)
        async with running(runner):
            job = await runner.submit(submission("hang"))
            failed = await finished(runner.store, job.id)
            await settled(runner, 2)
        assert failed.status is JobStatus.FAILED
        assert failed.error == "timed out: generation took longer than 0.2 s"
        assert runner.backend.cancelled == [job.id]
        assert events(runner) == [("reserve", OWNER, 1), ("release", OWNER, 1)]

    asyncio.run(scenario())


def test_a_sync_wait_past_its_timeout_cancels_the_job(make_runner):
    async def scenario():
        runner = make_runner()
        async with running(runner):
            job = await runner.submit(submission("hang", sync=True))
            with pytest.raises(SyncTimeout):
                await runner.wait(job.id, 0.3)
            failed = await finished(runner.store, job.id)
            await until(lambda: runner.backend.cancelled == [job.id])
        assert failed.error.startswith("timed out") and "sync" in failed.error
        assert events(runner) == [("reserve", OWNER, 1), ("release", OWNER, 1)]

    asyncio.run(scenario())


# -- outcomes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "status_code", "message"), [
    (InputRejected("no face found in identity_image"), 400, "no face found in identity_image"),
    (BackendUnavailable("model is unavailable"), 502, "model is unavailable"),
    (BackendTimeout("Triton deadline exceeded"), 504, "Triton deadline exceeded"),
    (GenerationFailed("generation failed: ValueError"), 500, "generation failed: ValueError"),
    (BackendError(""), 500, "BackendError"),
    (RuntimeError("secret internals"), 500, "internal error while generating"),
])
def test_backend_failures_map_to_the_job_error_and_the_sync_status(make_runner, error, status_code, message):
    async def scenario():
        runner = make_runner()
        runner.backend.errors["it"] = error
        async with running(runner):
            job = await runner.submit(submission("raise:it", sync=True, samples=2))
            outcome = await runner.wait(job.id, 30.0)
            await settled(runner, 2)
            metrics = runner.metrics.render().decode()
        assert outcome.job.status is JobStatus.FAILED and outcome.outputs == []
        assert outcome.status_code == status_code and outcome.job.error == message
        reason = getattr(error, "reason", "internal")
        assert f'diffserve_job_failures_total{{reason="{reason}",slug="sd1.5-scifi"}} 1.0' in metrics
        assert events(runner) == [("reserve", OWNER, 2), ("release", OWNER, 2)]

    asyncio.run(scenario())


def test_a_sync_wait_is_answered_whichever_process_runs_the_job(make_runner):
    async def scenario():
        api, worker = make_runner(run_jobs=False), make_runner()
        async with running(api, worker):
            job = await api.submit(submission("ok", sync=True, samples=2))
            outcome = await api.wait(job.id, 30.0)
            assert await debits(api, worker) == [("debit", OWNER, 2)]
            assert api.ledger.remaining(OWNER) == 98
        assert outcome.job.status is JobStatus.COMPLETED and outcome.status_code is None
        assert len(outcome.outputs) == 2 and all(data.startswith(b"\xff\xd8\xff") for data in outcome.outputs)
        assert "_sync" not in worker.backend.calls[0][2]  # runner-private keys never reach the backend
        assert api.backend.calls == []

    asyncio.run(scenario())


# -- image inputs ----------------------------------------------------------------------------------


def test_images_reach_the_backend_as_the_uint8_arrays_decoded_at_submission(make_runner):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)

    async def scenario():
        api, worker = make_runner(run_jobs=False), make_runner()
        async with running(api, worker, start=False):
            queued = await api.submit(submission("ok", slug="sd1.5-img2img", images={"image": pixels}))
            assert api.store.get(queued.id).params["image"] == {"stored_input": "image.npy"}  # no pixels in params
            assert set(api.store.read_inputs(queued.id)) == {"image"}
            await api.start()
            await worker.start()
            sync = await api.submit(submission("ok", slug="sd1.5-img2img", sync=True, images={"image": pixels}))
            await finished(api.store, queued.id)
            await api.wait(sync.id, 30.0)
            assert api.store.read_inputs(queued.id) == {}  # deleted once the job finished
        for _request_id, _slug, params in worker.backend.calls:
            image = params["image"]
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (40, 56, 3)
            np.testing.assert_array_equal(image, pixels)
        assert {call[0] for call in worker.backend.calls} == {queued.id, sync.id}

    asyncio.run(scenario())


def lose_inputs(kind: str, store: JobQueue, job_id: str) -> None:
    """Delete a queued job's stored inputs behind the store's back (as a hand or a bug would)."""
    if kind == "sqlite":
        with store._write() as db:
            db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
    else:
        store._redis.delete(store._key("in", job_id))


def test_lost_inputs_fail_the_job_and_release_its_credits(make_runner, kind):
    async def scenario():
        runner = make_runner()
        async with running(runner, start=False):
            job = await runner.submit(submission("ok", slug="sd1.5-img2img", images={"image": np.zeros((8, 8, 3),
                                                                                                         np.uint8)}))
            lose_inputs(kind, runner.store, job.id)
            await runner.start()
            failed = await finished(runner.store, job.id)
            await settled(runner, 2)
        assert failed.status is JobStatus.FAILED and "input images were lost" in failed.error
        assert runner.backend.calls == []
        assert events(runner) == [("reserve", OWNER, 1), ("release", OWNER, 1)]

    asyncio.run(scenario())


# -- dead workers and crashes ----------------------------------------------------------------------


def lease_kw(kind: str, **kw: Any) -> dict[str, Any]:
    """Store options for dead-worker tests: on Redis a silent worker's lease lapses after half a second."""
    return kw | ({"reclaim_idle_s": 0.5} if kind == "redis" else {})


def test_a_dead_workers_job_runs_again_and_is_charged_once(make_runner, kind):
    """On SQLite the next process's recovery requeues it; on Redis another worker reclaims it."""
    async def scenario():
        store_kw = lease_kw(kind)
        api = make_runner(run_jobs=False, store_kw=store_kw)
        first = make_runner(store_kw=store_kw)
        async with running(api):
            await first.start()
            job = await api.submit(submission("gate:g", samples=3))
            await until(lambda: first.backend.active == 1)
            await die(first)
            first.ledger.close()
            second = make_runner(store_kw=store_kw)
            second.backend.gates["g"] = asyncio.Event()
            second.backend.gates["g"].set()
            async with running(second):
                done = await finished(api.store, job.id)
                assert done.status is JobStatus.COMPLETED
                assert done.metrics["deliveries"] == 2 and done.attempts == 2
                assert await debits(api, second) == [("debit", OWNER, 3)]
                await asyncio.sleep(0.5)  # the settlement sweeps run again: still one debit
                assert await debits(api, second) == [("debit", OWNER, 3)] and api.ledger.remaining(OWNER) == 97

    asyncio.run(scenario())


def test_after_the_delivery_cap_the_job_fails_with_a_reason_and_costs_nothing(make_runner, kind):
    async def scenario():
        store_kw = lease_kw(kind, max_attempts=1)
        api = make_runner(run_jobs=False, store_kw=store_kw)
        silent = make_runner(store_kw=store_kw)
        async with running(api):
            await silent.start()
            job = await api.submit(submission("hang"))
            await until(lambda: silent.backend.active == 1)
            await die(silent)
            silent.ledger.close()
            other = make_runner(store_kw=store_kw)
            async with running(other):
                failed = await finished(api.store, job.id)
                assert "request_max_attempts=1" in failed.error
                await until(lambda: api.ledger.remaining(OWNER) == 100)
            assert other.backend.calls == []

    asyncio.run(scenario())


def test_a_stop_between_storing_the_outcome_and_charging_it_still_charges_once(make_runner):
    async def scenario():
        first = make_runner()
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stop_instead(job_id):
            # The ledger does not answer after the store took the outcome, and the runner is
            # stopped while it waits to retry: this debit never lands.
            loop.call_soon_threadsafe(stopped.set)
            raise StoreUnavailable("the ledger is unreachable")

        first.ledger.before_debit = stop_instead
        async with running(first):
            job = await first.submit(submission("ok", samples=2))
            await stopped.wait()
            await first.stop()
            assert first.store.get(job.id).status is JobStatus.COMPLETED
            assert ("debit", OWNER, 2) not in events(first) and first.ledger.remaining(OWNER) == 98  # still reserved
        second = make_runner()
        async with running(second):  # the next process (or any replica) settles it
            await until(lambda: second.ledger.remaining(OWNER) == 98 and events(second) == [("debit", OWNER, 2)])
            await asyncio.sleep(0.5)  # more sweeps: nothing charged twice
            assert events(second) == [("debit", OWNER, 2)] and second.ledger.remaining(OWNER) == 98

    asyncio.run(scenario())


# -- Redis going away ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis"])
def test_redis_down_refuses_submissions_and_accepted_jobs_finish_when_it_returns(make_runner, redis_server):  # noqa: F811
    async def scenario():
        api, worker = make_runner(run_jobs=False), make_runner()
        worker.backend.gates["g"] = asyncio.Event()
        async with running(api, worker, start=False):
            await api.start()
            job = await api.submit(submission("gate:g"))
            redis_server.kill()
            try:
                with pytest.raises(StoreUnavailable):
                    await api.submit(submission("ok"))
                await worker.start()  # starts while Redis is down: backs off, then takes the job
                await asyncio.sleep(0.5)
                await asyncio.to_thread(redis_server.start)
                worker.backend.gates["g"].set()
                await until(lambda: api.store.get(job.id).status is JobStatus.COMPLETED)
                fresh = await api.submit(submission("ok", sync=True))
                assert (await api.wait(fresh.id, 30)).job.status is JobStatus.COMPLETED
            finally:
                redis_server.start()

    asyncio.run(scenario())
