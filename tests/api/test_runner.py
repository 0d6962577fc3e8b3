"""``JobRunner`` as plain CPU logic: a scripted fake backend, the real SQLite job store, input
store and credit ledger in a temporary directory, no HTTP server (vLLM-scheduler style).

The fake backend's behaviour is chosen by the request's prompt: ``"ok"`` returns at once,
``"gate:<name>"`` waits for ``FakeBackend.gates[name]``, ``"hang"`` never returns until it is
cancelled, ``"raise:<name>"`` raises ``FakeBackend.errors[name]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.backend import (
    BackendError, BackendResult, BackendTimeout, BackendUnavailable, GenerationFailed, InputRejected,
)
from api.inputs import InputStore
from api.jobs import CANCELLED_BY_CLIENT, JobStatus, JobStore
from api.metrics import ApiMetrics
from api.quotas import CreditLedger, InsufficientCredits
from api.runner import JobRunner, QueueFull, Submission
from engine.catalog import get_model

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


class RecordingLedger(CreditLedger):
    """The real ledger, recording every reservation, release and debit that took effect."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.events: list[tuple[str, str | None, int]] = []

    def reserve(self, owner, cost):
        super().reserve(owner, cost)
        self.events.append(("reserve", owner, cost))

    def release(self, owner, cost):
        super().release(owner, cost)
        self.events.append(("release", owner, cost))

    def debit(self, owner, cost, *, reserved):
        super().debit(owner, cost, reserved=reserved)
        self.events.append(("debit" if reserved else "debit-unreserved", owner, cost))


@contextlib.asynccontextmanager
async def job_runner(tmp_path: Path, backend: FakeBackend, *, credits: int | None = 100, start: bool = True,
                     **kw: Any) -> AsyncIterator[JobRunner]:
    store = JobStore(tmp_path / "jobs.sqlite", outputs_dir=tmp_path / "outputs")
    ledger = RecordingLedger(tmp_path / "credits.sqlite", credits, {})
    options = dict(max_concurrent_jobs=1, max_queued_jobs=100, job_timeout_s=30.0, cancel_poll_s=0.01,
                   purge_interval_s=60.0, idle_poll_s=0.02, cancel_grace_s=5.0) | kw
    runner = JobRunner(store, backend, InputStore(tmp_path / "inputs"), ledger, ApiMetrics(), **options)
    if start:
        await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()
        ledger.close()
        store.close()


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


async def until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def finished(runner: JobRunner, job_id: str):
    await until(lambda: runner.store.get(job_id).status.terminal)
    return runner.store.get(job_id)


def events(runner: JobRunner) -> list[tuple[str, str | None, int]]:
    return runner.ledger.events


# -- queueing --------------------------------------------------------------------------------------


def test_jobs_run_in_submission_order_and_each_is_debited_once(tmp_path):
    async def scenario():
        backend = FakeBackend()
        async with job_runner(tmp_path, backend, start=False) as runner:
            jobs = [await runner.submit(submission("ok", samples=n)) for n in (1, 3, 2)]
            assert [runner.store.get(j.id).status for j in jobs] == [JobStatus.QUEUED] * 3
            assert [runner.store.position(j.id) for j in jobs] == [0, 1, 2]
            await runner.start()
            done = [await finished(runner, j.id) for j in jobs]
        assert [call[0] for call in backend.calls] == [j.id for j in jobs]
        assert all(j.status is JobStatus.COMPLETED for j in done)
        assert [len(j.outputs) for j in done] == [1, 3, 2]
        assert done[1].metrics["backend_denoise_time"] == 0.005 and done[1].seed == 5
        assert events(runner) == [("reserve", OWNER, 1), ("reserve", OWNER, 3), ("reserve", OWNER, 2),
                                  ("debit", OWNER, 1), ("debit", OWNER, 3), ("debit", OWNER, 2)]
        assert runner.ledger.remaining(OWNER) == 94

    asyncio.run(scenario())


def test_a_drawn_seed_is_fixed_at_submission(tmp_path):
    async def scenario():
        async with job_runner(tmp_path, FakeBackend(), start=False) as runner:
            job = await runner.submit(submission("ok", seed=-1))
            assert runner.store.get(job.id).params["seed"] >= 0

    asyncio.run(scenario())


def test_a_full_queue_refuses_before_reserving(tmp_path):
    async def scenario():
        async with job_runner(tmp_path, FakeBackend(), start=False, max_queued_jobs=2) as runner:
            await runner.submit(submission())
            await runner.submit(submission())
            with pytest.raises(QueueFull, match="2 requests waiting"):
                await runner.submit(submission())
            assert runner.store.queue_depth() == 2
            assert events(runner) == [("reserve", OWNER, 1)] * 2

    asyncio.run(scenario())


def test_insufficient_credits_creates_no_job(tmp_path):
    async def scenario():
        async with job_runner(tmp_path, FakeBackend(), credits=2, start=False) as runner:
            with pytest.raises(InsufficientCredits) as info:
                await runner.submit(submission(samples=3))
            assert (info.value.remaining, info.value.cost) == (2, 3)
            assert runner.store.queue_depth() == 0 and events(runner) == []
            await runner.submit(submission(samples=2))
            with pytest.raises(InsufficientCredits):  # the queued job's reservation counts
                await runner.submit(submission(samples=1))

    asyncio.run(scenario())


def test_concurrency_is_capped_and_progress_is_stored(tmp_path):
    async def scenario():
        backend = FakeBackend()
        gate = backend.gates.setdefault("all", asyncio.Event())
        async with job_runner(tmp_path, backend, max_concurrent_jobs=2) as runner:
            jobs = [await runner.submit(submission("gate:all")) for _ in range(5)]
            await until(lambda: backend.active == 2)
            await until(lambda: runner.store.get(jobs[0].id).progress_step == 1)
            await asyncio.sleep(0.2)  # more time: still no third generation
            assert backend.active == 2 and runner.running_count == 2 and runner.store.queue_depth() == 3
            assert runner.store.get(jobs[0].id).progress_total == 4
            gate.set()
            done = [await finished(runner, j.id) for j in jobs]
        assert backend.peak == 2 and all(j.status is JobStatus.COMPLETED for j in done)
        assert sorted(e[0] for e in events(runner)) == ["debit"] * 5 + ["reserve"] * 5

    asyncio.run(scenario())


# -- cancel and timeout ----------------------------------------------------------------------------


def test_cancel_a_queued_job_fails_it_at_once_and_releases_its_credits(tmp_path):
    async def scenario():
        backend = FakeBackend()
        async with job_runner(tmp_path, backend) as runner:
            running = await runner.submit(submission("gate:first"))
            queued = await runner.submit(submission("ok", samples=2))
            await until(lambda: backend.active == 1)
            cancelled = runner.cancel(queued.id)
            assert cancelled.status is JobStatus.FAILED and cancelled.error == CANCELLED_BY_CLIENT
            backend.gates["first"].set()
            assert (await finished(runner, running.id)).status is JobStatus.COMPLETED
            assert runner.cancel(running.id).status is JobStatus.COMPLETED  # terminal jobs stay as they are
            assert runner.cancel("0" * 32) is None
        assert [call[0] for call in backend.calls] == [running.id]  # the cancelled job never ran
        assert events(runner) == [("reserve", OWNER, 1), ("reserve", OWNER, 2), ("release", OWNER, 2),
                                  ("debit", OWNER, 1)]

    asyncio.run(scenario())


def test_cancel_a_running_job_stops_the_backend_and_releases_once(tmp_path):
    async def scenario():
        backend = FakeBackend()
        async with job_runner(tmp_path, backend) as runner:
            job = await runner.submit(submission("hang", samples=2))
            await until(lambda: backend.active == 1)
            assert runner.cancel(job.id).status is JobStatus.PROCESSING  # the worker stops it
            failed = await finished(runner, job.id)
            assert failed.status is JobStatus.FAILED and failed.error == CANCELLED_BY_CLIENT
            assert backend.cancelled == [job.id] and backend.active == 0
            await until(lambda: runner.running_count == 0)
            runner.cancel(job.id)  # a second cancel of a finished job settles nothing again
            after = await runner.submit(submission("ok"))
            assert (await finished(runner, after.id)).status is JobStatus.COMPLETED
        assert events(runner) == [("reserve", OWNER, 2), ("release", OWNER, 2), ("reserve", OWNER, 1),
                                  ("debit", OWNER, 1)]
        assert runner.ledger.remaining(OWNER) == 99

    asyncio.run(scenario())


def test_a_job_past_its_deadline_is_cancelled_and_failed_as_timed_out(tmp_path):
    async def scenario():
        backend = FakeBackend()
        async with job_runner(tmp_path, backend, job_timeout_s=0.2) as runner:
            job = await runner.submit(submission("hang"))
            outcome_job = await finished(runner, job.id)
        assert outcome_job.status is JobStatus.FAILED
        assert outcome_job.error == "timed out: generation took longer than 0.2 s"
        assert backend.cancelled == [job.id]
        assert events(runner) == [("reserve", OWNER, 1), ("release", OWNER, 1)]

    asyncio.run(scenario())


def test_a_sync_wait_past_its_timeout_cancels_the_job(tmp_path):
    from api.runner import SyncTimeout

    async def scenario():
        backend = FakeBackend()
        async with job_runner(tmp_path, backend) as runner:
            job = await runner.submit(submission("hang", sync=True))
            with pytest.raises(SyncTimeout):
                await runner.wait(job.id, 0.3)
            failed = await finished(runner, job.id)
        assert failed.error.startswith("timed out") and "sync" in failed.error
        assert backend.cancelled == [job.id]
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
def test_backend_failures_map_to_the_job_error_and_the_sync_status(tmp_path, error, status_code, message):
    async def scenario():
        backend = FakeBackend()
        backend.errors["it"] = error
        async with job_runner(tmp_path, backend) as runner:
            job = await runner.submit(submission("raise:it", sync=True, samples=2))
            outcome = await runner.wait(job.id, 10.0)
            metrics = runner.metrics.render().decode()
        assert outcome.job.status is JobStatus.FAILED and outcome.outputs == []
        assert outcome.status_code == status_code and outcome.job.error == message
        reason = getattr(error, "reason", "internal")
        assert f'diffserve_job_failures_total{{reason="{reason}",slug="sd1.5-scifi"}} 1.0' in metrics
        assert events(runner) == [("reserve", OWNER, 2), ("release", OWNER, 2)]

    asyncio.run(scenario())


def test_a_sync_job_returns_its_encoded_images(tmp_path):
    async def scenario():
        async with job_runner(tmp_path, FakeBackend()) as runner:
            job = await runner.submit(submission("ok", sync=True, samples=2))
            outcome = await runner.wait(job.id, 10.0)
        assert outcome.job.status is JobStatus.COMPLETED and outcome.status_code is None
        assert len(outcome.outputs) == 2 and all(data.startswith(b"\xff\xd8\xff") for data in outcome.outputs)
        assert "_sync" not in runner.backend.calls[0][2]  # runner-private keys never reach the backend
        assert events(runner) == [("reserve", OWNER, 2), ("debit", OWNER, 2)]

    asyncio.run(scenario())


def test_a_sync_job_found_after_a_restart_fails_as_interrupted(tmp_path):
    async def scenario():
        async with job_runner(tmp_path, FakeBackend(), start=False) as first:
            job = await first.submit(submission("ok", sync=True))
        backend = FakeBackend()
        async with job_runner(tmp_path, backend) as second:  # the /v1 client died with the first process
            failed = await finished(second, job.id)
        assert failed.status is JobStatus.FAILED and failed.error.startswith("interrupted")
        assert backend.calls == []

    asyncio.run(scenario())


# -- image inputs ----------------------------------------------------------------------------------


def test_images_reach_the_backend_as_the_uint8_arrays_decoded_at_submission(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)

    async def scenario():
        backend = FakeBackend()
        async with job_runner(tmp_path, backend, start=False) as runner:
            queued = await runner.submit(submission("ok", slug="sd1.5-img2img", images={"image": pixels}))
            stored = runner.store.get(queued.id).params["image"]
            assert stored == {"stored_input": "image.npy"}  # no pixels or base64 in the database
            assert (tmp_path / "inputs" / queued.id / "image.npy").is_file()
            sync = await runner.submit(submission("ok", slug="sd1.5-img2img", sync=True, images={"image": pixels}))
            await runner.start()
            await finished(runner, queued.id)
            await runner.wait(sync.id, 10.0)
        for request_id, _slug, params in backend.calls:
            image = params["image"]
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (40, 56, 3)
            np.testing.assert_array_equal(image, pixels)
        assert {call[0] for call in backend.calls} == {queued.id, sync.id}
        assert not (tmp_path / "inputs" / queued.id).exists()  # deleted once the job finished

    asyncio.run(scenario())


def test_lost_inputs_fail_the_job_and_release_its_credits(tmp_path):
    import shutil

    pixels = np.zeros((8, 8, 3), np.uint8)

    async def scenario():
        backend = FakeBackend()
        async with job_runner(tmp_path, backend, start=False) as runner:
            job = await runner.submit(submission("ok", slug="sd1.5-img2img", images={"image": pixels}))
            shutil.rmtree(tmp_path / "inputs" / job.id)
            await runner.start()
            failed = await finished(runner, job.id)
        assert failed.status is JobStatus.FAILED and "input images were lost" in failed.error
        assert backend.calls == []
        assert events(runner) == [("reserve", OWNER, 1), ("release", OWNER, 1)]

    asyncio.run(scenario())
