"""``JobRunner`` on the shared Redis store, as plain logic: several runners in one event loop stand
for an API replica (``run_jobs=False``) and workers, over a real ``redis-server``, the Redis
credit ledger and the scripted fake backend of ``test_runner``. Covers what crosses processes:
a ``/v1`` wait answered by another runner's worker, cancel of a running job from a runner that
does not run it, reclaim of a silent worker's job (delivery count in the metrics, one debit),
the delivery cap, and Redis going away and coming back.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from api.jobs import CANCELLED_BY_CLIENT, JobStatus
from api.metrics import ApiMetrics
from api.inputs import InputStore
from api.redis_client import StoreUnavailable
from api.redis_jobs import RedisJobStore
from api.redis_quotas import RedisCreditLedger
from api.runner import JobRunner, Submission
from tests.api.test_runner import FakeBackend
from tests.redis_server import redis_server, redis_url  # noqa: F401 - fixtures

OWNER = "owner-a"


def make_runner(url: str, ns: str, tmp_path, backend, *, run_jobs=True, reclaim_idle_s=0.5, max_attempts=2):
    store = RedisJobStore(url, namespace=ns, reclaim_idle_s=reclaim_idle_s, max_attempts=max_attempts)
    ledger = RedisCreditLedger(url, 100, {}, namespace=ns)
    runner = JobRunner(store, backend, InputStore(tmp_path / uuid.uuid4().hex), ledger, ApiMetrics(),
                       max_concurrent_jobs=1, max_queued_jobs=100, job_timeout_s=60, cancel_poll_s=0.02,
                       purge_interval_s=0.2, run_jobs=run_jobs)
    return runner


def submission(prompt: str, *, sync=False, samples=1, image=None) -> Submission:
    slug = "sd1.5-img2img" if image is not None else "sd1.5-scifi"
    params = {"prompt": prompt, "samples": samples, "seed": 3, "num_inference_steps": 20}
    images = {"image": image} if image is not None else {}
    return Submission(slug=slug, params=params, images=images, owner=OWNER, output_format="png",
                      want_base64=False, sync=sync)


async def until(predicate, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
def ns():
    return f"t{uuid.uuid4().hex[:8]}"


def test_a_sync_wait_is_answered_by_another_runners_worker_and_inputs_travel(redis_url, ns, tmp_path):
    async def scenario():
        api = make_runner(redis_url, ns, tmp_path, FakeBackend(), run_jobs=False)
        backend = FakeBackend()
        worker = make_runner(redis_url, ns, tmp_path, backend)
        await api.start()
        await worker.start()
        try:
            pixels = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
            job = await api.submit(submission("ok", sync=True, image=pixels))
            outcome = await api.wait(job.id, 20)
            assert outcome.job.status is JobStatus.COMPLETED and len(outcome.outputs) == 1
            assert outcome.outputs[0][:4] == b"\x89PNG"
            assert np.array_equal(backend.calls[0][2]["image"], pixels)
            assert outcome.job.metrics["deliveries"] == 1
            assert api.ledger.remaining(OWNER) == 99
        finally:
            await worker.stop()
            await api.stop()

    asyncio.run(scenario())


def test_cancel_from_a_replica_stops_the_job_on_its_worker(redis_url, ns, tmp_path):
    async def scenario():
        api = make_runner(redis_url, ns, tmp_path, FakeBackend(), run_jobs=False)
        backend = FakeBackend()
        worker = make_runner(redis_url, ns, tmp_path, backend)
        await api.start()
        await worker.start()
        try:
            job = await api.submit(submission("hang", samples=2))
            await until(lambda: backend.active == 1)
            assert (await api.cancel_async(job.id)).status is JobStatus.PROCESSING
            await until(lambda: job.id in backend.cancelled)
            await until(lambda: api.store.get(job.id).status is JobStatus.FAILED)
            assert api.store.get(job.id).error == CANCELLED_BY_CLIENT
            await until(lambda: api.ledger.remaining(OWNER) == 100)  # released, not charged
        finally:
            await worker.stop()
            await api.stop()

    asyncio.run(scenario())


def test_a_silent_workers_job_is_reclaimed_and_charged_once(redis_url, ns, tmp_path):
    async def scenario():
        api = make_runner(redis_url, ns, tmp_path, FakeBackend(), run_jobs=False)
        first_backend, second_backend = FakeBackend(), FakeBackend()
        first = make_runner(redis_url, ns, tmp_path, first_backend)
        await api.start()
        await first.start()
        job = await api.submit(submission("gate:g", samples=3))
        await until(lambda: first_backend.active == 1)
        # The first worker goes silent (as a killed one does): its tasks stop, its job stays PROCESSING.
        await first.stop()
        second = make_runner(redis_url, ns, tmp_path, second_backend)
        second_backend.gates["g"] = asyncio.Event()
        second_backend.gates["g"].set()
        await second.start()
        try:
            await until(lambda: api.store.get(job.id).status is JobStatus.COMPLETED)
            done = api.store.get(job.id)
            assert done.metrics["deliveries"] == 2 and done.attempts == 2
            await until(lambda: api.ledger.remaining(OWNER) == 97)
            await asyncio.sleep(0.5)  # the settlement sweep runs again: still one debit
            assert api.ledger.remaining(OWNER) == 97
        finally:
            await second.stop()
            await api.stop()

    asyncio.run(scenario())


def test_after_the_delivery_cap_the_job_fails_with_a_reason_and_costs_nothing(redis_url, ns, tmp_path):
    async def scenario():
        api = make_runner(redis_url, ns, tmp_path, FakeBackend(), run_jobs=False, max_attempts=1)
        await api.start()
        silent_backend = FakeBackend()
        silent = make_runner(redis_url, ns, tmp_path, silent_backend, max_attempts=1)
        await silent.start()
        job = await api.submit(submission("hang"))
        await until(lambda: silent_backend.active == 1)
        await silent.stop()
        other = make_runner(redis_url, ns, tmp_path, FakeBackend(), max_attempts=1)
        await other.start()
        try:
            await until(lambda: api.store.get(job.id).status is JobStatus.FAILED)
            assert "request_max_attempts=1" in api.store.get(job.id).error
            await until(lambda: api.ledger.remaining(OWNER) == 100)
        finally:
            await other.stop()
            await api.stop()

    asyncio.run(scenario())


def test_redis_down_refuses_submissions_and_accepted_jobs_finish_when_it_returns(redis_server, redis_url, ns,  # noqa: F811
                                                                                tmp_path):
    async def scenario():
        api = make_runner(redis_url, ns, tmp_path, FakeBackend(), run_jobs=False)
        backend = FakeBackend()
        worker = make_runner(redis_url, ns, tmp_path, backend)
        await api.start()
        backend.gates["g"] = asyncio.Event()
        job = await api.submit(submission("gate:g"))
        redis_server.kill()
        try:
            with pytest.raises(StoreUnavailable):
                await api.submit(submission("ok"))
            await worker.start()  # starts while Redis is down: backs off, then takes the job
            await asyncio.sleep(0.5)
            await asyncio.to_thread(redis_server.start)
            backend.gates["g"].set()
            await until(lambda: api.store.get(job.id).status is JobStatus.COMPLETED, timeout=30)
            fresh = await api.submit(submission("ok", sync=True))
            assert (await api.wait(fresh.id, 20)).job.status is JobStatus.COMPLETED
        finally:
            redis_server.start()
            await worker.stop()
            await api.stop()

    asyncio.run(scenario())
