"""The JobQueue contract (api/queue.py), run on SQLite and on Redis alike (``kind`` in conftest).

What the HTTP layer asks of a store — enqueue, read status and outputs, position in the real
claim order, cancel, expiry and purge, readiness — must mean the same on both, since routes and
deps never ask which store they hold.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from diffserve.api.jobs import CANCELLED_BY_CLIENT, JobStatus
from diffserve.api.queue import JobQueue
from tests.api.conftest import take

SLUG = "sd1.5-scifi"


def test_both_stores_are_job_queues(queue: JobQueue, kind: str) -> None:
    assert isinstance(queue, JobQueue)
    assert queue.name == kind and queue.address
    queue.ping()
    assert queue.served_slugs() == {}  # no worker of another process announced anything


def test_enqueue_then_read_status(queue: JobQueue) -> None:
    job = queue.create(SLUG, {"prompt": "a cat", "steps": 4}, owner="owner-1", output_format="png",
                       want_base64=True)
    got = queue.get(job.id)
    assert got is not None and got.status is JobStatus.QUEUED
    assert (got.slug, got.params, got.owner, got.output_format, got.want_base64) == (
        SLUG, {"prompt": "a cat", "steps": 4}, "owner-1", "png", True)
    assert queue.get("0" * 32) is None
    assert queue.queue_depth() == 1
    assert queue.count_by_status() == {"QUEUED": 1, "PROCESSING": 0, "COMPLETED": 0, "FAILED": 0}


def test_position_is_the_order_jobs_are_claimed_in(queue: JobQueue) -> None:
    jobs = [queue.create(SLUG, {"prompt": str(i)}) for i in range(3)]
    assert [queue.position(j.id) for j in jobs] == [0, 1, 2]
    first = take(queue, SLUG)
    assert first is not None and first.id == jobs[0].id and first.status is JobStatus.PROCESSING
    assert [queue.position(j.id) for j in jobs] == [None, 0, 1]
    assert queue.request_cancel(jobs[1].id).status is JobStatus.FAILED
    assert queue.position(jobs[2].id) == 0 and queue.queue_depth() == 1
    assert take(queue, SLUG).id == jobs[2].id


def test_outputs_are_read_through_the_store(queue: JobQueue) -> None:
    job = queue.create(SLUG, {"prompt": "x"})
    assert queue.read_output(job.id, 0) is None  # not completed
    take(queue, SLUG)
    assert queue.set_progress(job.id, 3, 10) and queue.get(job.id).progress_step == 3
    done = queue.complete(job.id, [b"first-image", b"second-image"], "png", {"inference_time": 1.0}, seed=7)
    assert done.status is JobStatus.COMPLETED and done.seed == 7 and len(done.outputs) == 2
    assert [queue.read_output(job.id, i) for i in range(3)] == [b"first-image", b"second-image", None]
    assert queue.read_output("0" * 32, 0) is None
    assert not queue.set_progress(job.id, 4, 10)  # finished jobs take no progress
    # A failure after the outcome changes nothing.
    assert queue.fail(job.id, "too late").status is JobStatus.COMPLETED


def test_cancel_queued_fails_at_once_running_gets_the_flag(queue: JobQueue) -> None:
    running = queue.create(SLUG, {"prompt": "r"})
    queued = queue.create(SLUG, {"prompt": "q"})
    assert take(queue, SLUG).id == running.id  # FIFO: the first one runs, the second waits
    cancelled = queue.request_cancel(queued.id)
    assert cancelled.status is JobStatus.FAILED and cancelled.error == CANCELLED_BY_CLIENT
    flagged = queue.request_cancel(running.id)
    assert flagged.status is JobStatus.PROCESSING and queue.is_cancel_requested(running.id)
    failed = queue.fail(running.id, CANCELLED_BY_CLIENT)
    assert failed.status is JobStatus.FAILED
    assert queue.request_cancel(running.id).status is JobStatus.FAILED  # terminal: unchanged
    assert queue.request_cancel("0" * 32) is None
    assert queue.count_by_status() == {"QUEUED": 0, "PROCESSING": 0, "COMPLETED": 0, "FAILED": 2}


def test_finished_jobs_expire_with_their_outputs(make_queue) -> None:
    queue = make_queue(retention_s=0.3)
    job = queue.create(SLUG, {"prompt": "x"})
    take(queue, SLUG)
    queue.complete(job.id, [b"image"], "jpg", {}, seed=None)
    assert queue.read_output(job.id, 0) == b"image"
    # Expiry is a lower bound: poll (no upper bound on how soon) until the store lets it go.
    for _ in range(200):
        if queue.get(job.id) is None:
            break
        time.sleep(0.05)
    assert queue.get(job.id) is None and queue.read_output(job.id, 0) is None
    queue.purge_expired()
    assert queue.count_by_status()["COMPLETED"] == 0


def test_a_second_handle_sees_the_same_jobs(make_queue) -> None:
    first, second = make_queue(), make_queue()
    job = first.create(SLUG, {"prompt": "shared"})
    assert second.get(job.id).status is JobStatus.QUEUED and second.position(job.id) == 0
    assert second.request_cancel(job.id).status is JobStatus.FAILED
    assert first.get(job.id).error == CANCELLED_BY_CLIENT


def test_a_blocking_claim_returns_on_an_enqueue(make_queue) -> None:
    worker, client = make_queue(), make_queue()
    waiting = threading.Event()
    got: list = []

    def claim() -> None:
        waiting.set()
        got.append(worker.claim("w1", [SLUG], block_s=120.0))

    thread = threading.Thread(target=claim)
    thread.start()
    waiting.wait()
    assert worker.claim("w2", [SLUG]) is None  # nothing queued yet: the other claim is still waiting
    job = client.create(SLUG, {"prompt": "wake up"})
    thread.join(timeout=120.0)  # a hang guard, not a speed bound: the enqueue is what ends the wait
    assert not thread.is_alive() and got[0] is not None and got[0].job.id == job.id


def test_claims_take_only_the_slugs_asked_for(queue: JobQueue) -> None:
    other = queue.create("segmind-vega", {"prompt": "vega"})
    mine = queue.create(SLUG, {"prompt": "scifi"})
    claim = queue.claim("w1", [SLUG])
    assert claim.job.id == mine.id and claim.attempt == 1 and claim.consumer == "w1"
    assert queue.claim("w1", [SLUG]) is None
    assert queue.claim("w1", ["segmind-vega", SLUG]).job.id == other.id
    with pytest.raises(ValueError, match="at least one slug"):
        queue.claim("w1", [])


def test_the_lease_reports_cancel_and_fences_a_stale_failure(queue: JobQueue) -> None:
    job = queue.create(SLUG, {"prompt": "x"})
    claim = queue.claim("w1", [SLUG])
    beat = queue.heartbeat(claim)
    assert beat.owned and not beat.cancel_requested
    queue.request_cancel(job.id)
    assert queue.heartbeat(claim).cancel_requested
    stale = type(claim)(job=replace(claim.job, attempts=claim.attempt + 1), stream=claim.stream,
                        entry_id=claim.entry_id, consumer="w-other")
    assert queue.fail(job.id, "not mine", claim=stale).status is JobStatus.PROCESSING  # fenced off
    assert queue.fail(job.id, CANCELLED_BY_CLIENT, claim=claim).status is JobStatus.FAILED
    assert not queue.heartbeat(claim).owned


def test_inputs_travel_with_the_job_until_it_finishes(make_queue) -> None:
    client, worker = make_queue(), make_queue()
    job = client.create("sd1.5-img2img", {"prompt": "x"}, inputs={"image": b"npy-bytes", "mask": b"other"})
    plain = client.create(SLUG, {"prompt": "y"})
    assert worker.read_inputs(job.id) == {"image": b"npy-bytes", "mask": b"other"}
    assert worker.read_inputs(plain.id) == {}
    take(worker, "sd1.5-img2img")
    worker.complete(job.id, [b"out"], "png", {}, seed=1)
    assert client.read_inputs(job.id) == {}  # gone with the finished job


def test_finished_jobs_are_fed_to_listeners(queue: JobQueue) -> None:
    seen: list[str] = []
    stop = threading.Event()
    listening = threading.Thread(target=queue.listen_finished, args=(seen.append, stop.is_set))
    listening.start()

    def until_seen(job_id: str) -> bool:
        for _ in range(600):  # a hang guard: the job's own event ends the wait
            if job_id in seen:
                return True
            time.sleep(0.05)
        return False

    try:
        # The feed starts listening at some point after the thread starts: cancel jobs until it hears one.
        probes = []
        while not seen and len(probes) < 600:
            probes.append(queue.create(SLUG, {"prompt": "probe"}).id)
            queue.request_cancel(probes[-1])
            time.sleep(0.05)
        assert seen
        done, failed = queue.create(SLUG, {"prompt": "d"}), queue.create(SLUG, {"prompt": "f"})
        take(queue, SLUG)
        queue.complete(done.id, [b"x"], "png", {}, seed=None)
        queue.fail(failed.id, "broken")
        assert until_seen(done.id) and until_seen(failed.id)
        assert set(queue.finished_ids()) == {done.id, failed.id, *probes}
    finally:
        stop.set()
        listening.join(timeout=30)


def test_higher_priority_is_claimed_first_fifo_within_a_level(queue: JobQueue) -> None:
    priorities = [0, 2, 0, 2, 1, 0]
    jobs = [queue.create(SLUG, {"prompt": str(i)}, priority=p) for i, p in enumerate(priorities)]
    expected = [jobs[i] for i in (1, 3, 4, 0, 2, 5)]
    assert [queue.get(j.id).priority for j in jobs] == priorities
    assert [queue.position(j.id) for j in expected] == list(range(len(jobs)))  # the order claim will take
    assert [take(queue, SLUG).id for _ in jobs] == [j.id for j in expected]
    with pytest.raises(ValueError, match="priority"):
        queue.create(SLUG, {"prompt": "x"}, priority=10)


def test_a_waiting_job_ages_past_later_higher_priority_ones(make_queue) -> None:
    """With 1 ms of aging per level, a job submitted well before a priority-9 one still runs first."""
    queue = make_queue(priority_aging_s=0.001)
    early = queue.create(SLUG, {"prompt": "early"})
    time.sleep(0.05)  # later by more than 9 levels x 1 ms
    urgent = queue.create(SLUG, {"prompt": "urgent"}, priority=9)
    fresh = queue.create(SLUG, {"prompt": "fresh"})
    assert [queue.position(j.id) for j in (early, urgent, fresh)] == [0, 1, 2]
    assert [take(queue, SLUG).id for _ in range(3)] == [early.id, urgent.id, fresh.id]


def test_create_under_a_chosen_id_refuses_a_duplicate(queue: JobQueue) -> None:
    from diffserve.api.jobs import DuplicateJob, new_job_id

    job_id = new_job_id()
    job = queue.create(SLUG, {"prompt": "first"}, job_id=job_id, inputs={"image": b"pixels"})
    assert job.id == job_id and queue.get(job_id).params == {"prompt": "first"}
    with pytest.raises(DuplicateJob) as duplicate:
        queue.create(SLUG, {"prompt": "second"}, job_id=job_id, priority=3)
    assert duplicate.value.job_id == job_id
    # Nothing of the refused one was written: the first job, its inputs and the queue are as they were.
    assert queue.get(job_id).params == {"prompt": "first"} and queue.read_inputs(job_id) == {"image": b"pixels"}
    assert queue.queue_depth() == 1 and take(queue, SLUG).id == job_id and take(queue, SLUG) is None
    # Finished, it still holds its id.
    queue.complete(job_id, [b"x"], "png", {}, seed=1)
    with pytest.raises(DuplicateJob):
        queue.create(SLUG, {"prompt": "third"}, job_id=job_id)
    with pytest.raises(ValueError, match="not a job id"):
        queue.create(SLUG, {}, job_id="../etc")
    assert queue.count_by_status()["QUEUED"] == 0
