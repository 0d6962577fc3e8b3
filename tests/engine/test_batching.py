"""The step batcher as CPU logic: fake loops and a fake denoiser (the way vLLM tests its scheduler).

A fake loop's model input is one row per request row holding (request id, step); the fake denoiser
returns each row plus 1000 and records which rows it saw, so every test can check what each call
contained and that each request got back exactly its own rows.
"""

from __future__ import annotations

import threading

import pytest
import torch

from diffserve.engine.batching import (BatchingOptions, DeadlineExceeded, Entry, PipelineRunner, Shared, StepBatcher,
                                      StepScheduler, concat_inputs)
from diffserve.engine.pipelines.common import Cancelled


class FakeLoop:
    def __init__(self, rid: int, steps: int, rows: int = 1, key="64x64"):
        self.rid, self.total, self._rows, self._key = rid, steps, rows, key
        self.done = 0
        self.outputs: list[torch.Tensor] = []
        self.latents = None

    @property
    def finished(self):
        return self.done >= self.total

    @property
    def rows(self):
        return self._rows

    @property
    def shape_key(self):
        return self._key

    def model_inputs(self):
        x = torch.tensor([[float(self.rid), float(self.done)]] * self._rows)
        return x, None

    def advance(self, output):
        self.outputs.append(output.clone())
        self.done += 1
        self.latents = output


class FakeDenoiser:
    def __init__(self, fail_for: int | None = None):
        self.calls: list[list[tuple[int, int]]] = []
        self.fail_for = fail_for

    def __call__(self, x, nothing):
        assert nothing is None
        rows = [(int(r[0]), int(r[1])) for r in x]
        self.calls.append(rows)
        if self.fail_for is not None and any(rid == self.fail_for for rid, _ in rows):
            raise ValueError(f"bad input of request {self.fail_for}")
        return x + 1000


def batcher(denoiser=None, clock=None, **options):
    kwargs = {"clock": clock} if clock else {}
    return StepBatcher(denoiser or FakeDenoiser(), BatchingOptions(**options), start_thread=False, **kwargs)


def drain(b: StepBatcher, limit: int = 100) -> int:
    ticks = 0
    while b.tick():
        ticks += 1
        assert ticks < limit
    return ticks


def test_one_call_per_tick_over_every_request_and_each_gets_its_own_rows():
    den = FakeDenoiser()
    b = batcher(den, max_batch=8)
    loops = [FakeLoop(i, steps=3, rows=2) for i in range(3)]
    requests = [b.submit(loop)[1] for loop in loops]
    assert drain(b) == 3
    assert [len(call) for call in den.calls] == [6, 6, 6]
    for loop in loops:
        assert [o[:, 0].tolist() for o in loop.outputs] == [[loop.rid + 1000.0] * 2] * 3
        assert [o[0, 1].item() for o in loop.outputs] == [1000.0, 1001.0, 1002.0]
    assert all(r.done.is_set() and r.error is None for r in requests)


def test_requests_join_and_leave_at_step_boundaries_with_mixed_step_counts():
    den = FakeDenoiser()
    b = batcher(den, max_batch=8)
    short, long = FakeLoop(0, steps=2), FakeLoop(1, steps=4)
    b.submit(short)
    b.submit(long)
    b.tick()
    late = FakeLoop(2, steps=2)
    b.submit(late)  # joins at the next step boundary, mid-way through the others
    drain(b)
    assert [sorted({rid for rid, _ in call}) for call in den.calls] == [[0, 1], [0, 1, 2], [1, 2], [1]]
    assert (short.done, long.done, late.done) == (2, 4, 2)
    # each request sees its own step index whatever the others are at
    assert den.calls[1] == [(0, 1), (1, 1), (2, 0)]


def test_only_requests_whose_shapes_agree_share_a_call_and_groups_alternate():
    den = FakeDenoiser()
    b = batcher(den, max_batch=8)
    for rid, key in [(0, "64"), (1, "96"), (2, "64"), (3, "96")]:
        b.submit(FakeLoop(rid, steps=2, key=key))
    drain(b)
    assert [sorted({rid for rid, _ in call}) for call in den.calls] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_max_batch_bounds_a_call_and_admission_is_fifo():
    den = FakeDenoiser()
    b = batcher(den, max_batch=4, max_wait_ticks=100)
    for rid in range(3):
        b.submit(FakeLoop(rid, steps=2, rows=2))
    drain(b)
    assert max(len(call) for call in den.calls) == 4
    assert [sorted({rid for rid, _ in call}) for call in den.calls] == [[0, 1], [0, 1], [2], [2]]


def test_a_request_bigger_than_max_batch_runs_alone_and_is_not_overtaken():
    den = FakeDenoiser()
    b = batcher(den, max_batch=2, max_wait_ticks=100)
    b.submit(FakeLoop(0, steps=1, rows=1))
    b.submit(FakeLoop(1, steps=1, rows=6))
    b.submit(FakeLoop(2, steps=1, rows=1))
    drain(b)
    assert [sorted({rid for rid, _ in call}) for call in den.calls] == [[0], [1], [2]]


def test_buckets_pad_a_call_up_to_the_next_size_and_padding_is_dropped():
    den = FakeDenoiser()
    b = batcher(den, max_batch=8, buckets=(1, 4, 8))
    loops = [FakeLoop(rid, steps=1, rows=r) for rid, r in [(0, 2), (1, 3)]]
    for loop in loops:
        b.submit(loop)
    drain(b)
    assert len(den.calls[0]) == 8  # 5 rows padded to the bucket of 8, by repeating the last row
    assert den.calls[0][5:] == [(1, 0)] * 3
    assert b.calls == [5]
    assert [loop.outputs[0].shape[0] for loop in loops] == [2, 3]


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_batch"):
        BatchingOptions(max_batch=0)
    with pytest.raises(ValueError, match="increasing"):
        BatchingOptions(buckets=(4, 2))
    with pytest.raises(ValueError, match="largest bucket"):
        BatchingOptions(max_batch=16, buckets=(1, 8))
    assert BatchingOptions(max_batch=4, buckets=(1, 2, 4)).padded(3) == 4
    assert BatchingOptions(max_batch=4).padded(3) == 3


def test_scheduler_wait_bound_admits_the_head_past_a_full_batch():
    s = StepScheduler(BatchingOptions(max_batch=2, max_wait_ticks=2))
    long = [s.add(Entry(rows=1, key="k")) for _ in range(2)]
    new = s.add(Entry(rows=1, key="k"))
    waited = 0
    while True:
        tick = s.schedule()
        if new in s.active:
            break
        s.ran(tick)
        waited += 1
    assert waited == 2  # joined after max_wait_ticks although both long requests are still running
    # the active set now time-shares: every call holds at most max_batch rows, and the newcomer
    # (never stepped) runs in the very call it was admitted for
    assert tick.rows == 2 and new in tick.entries
    assert all(e in s.active for e in long)


def test_scheduler_no_starvation_every_active_request_runs_within_a_bounded_number_of_ticks():
    s = StepScheduler(BatchingOptions(max_batch=2, max_wait_ticks=0, max_active=6))
    entries = [s.add(Entry(rows=1, key=k)) for k in "aabbcc"]
    last_seen = {id(e): 0 for e in entries}
    for tick_no in range(1, 30):
        tick = s.schedule()
        s.ran(tick)
        for e in tick.entries:
            last_seen[id(e)] = tick_no
        for e in entries:
            assert tick_no - last_seen[id(e)] < len(entries)


def test_scheduler_over_commit_is_bounded_by_max_active():
    s = StepScheduler(BatchingOptions(max_batch=2, max_wait_ticks=0, max_active=3))
    for _ in range(5):
        s.add(Entry(rows=1, key="k"))
    s.admit()
    assert s.active_rows == 3 and len(s.waiting) == 2


def test_cancel_leaves_the_others_running():
    den = FakeDenoiser()
    b = batcher(den, max_batch=8)
    cancelled = threading.Event()
    keep, drop = FakeLoop(0, steps=3), FakeLoop(1, steps=3)
    _, kept = b.submit(keep)
    _, dropped = b.submit(drop, is_cancelled=cancelled.is_set)
    b.tick()
    cancelled.set()
    drain(b)
    assert isinstance(dropped.error, Cancelled) and drop.done == 1
    assert kept.error is None and keep.done == 3
    assert [len(call) for call in den.calls] == [2, 1, 1]


def test_deadline_fails_only_its_request():
    now = [0.0]
    b = batcher(clock=lambda: now[0], max_batch=8)
    _, hurried = b.submit(FakeLoop(0, steps=3), deadline=1.5)
    _, patient = b.submit(FakeLoop(1, steps=3))
    b.tick()
    now[0] = 2.0
    drain(b)
    assert isinstance(hurried.error, DeadlineExceeded) and "1 of 3 steps" in str(hurried.error)
    assert patient.error is None


def test_a_failing_input_fails_only_its_request():
    den = FakeDenoiser(fail_for=1)
    b = batcher(den, max_batch=8)
    loops = [FakeLoop(rid, steps=2) for rid in range(3)]
    requests = [b.submit(loop)[1] for loop in loops]
    drain(b)
    assert isinstance(requests[1].error, ValueError) and "request 1" in str(requests[1].error)
    assert requests[0].error is None and requests[2].error is None
    assert loops[0].done == loops[2].done == 2
    # the failed call was retried one request at a time, then the survivors batched again
    assert [len(call) for call in den.calls] == [3, 1, 1, 1, 2]


def test_a_failing_scheduler_step_or_progress_hook_fails_only_its_request():
    class BrokenStep(FakeLoop):
        def advance(self, output):
            raise ArithmeticError("step failed")

    b = batcher(max_batch=8)
    _, broken = b.submit(BrokenStep(0, steps=2))

    def bad_progress(done, total):
        raise KeyError("progress hook")

    _, hook = b.submit(FakeLoop(1, steps=2), on_step=bad_progress)
    good = FakeLoop(2, steps=2)
    _, fine = b.submit(good)
    drain(b)
    assert isinstance(broken.error, ArithmeticError) and isinstance(hook.error, KeyError)
    assert fine.error is None and good.done == 2


def test_progress_reports_each_request_s_own_steps():
    b = batcher(max_batch=8)
    seen: dict[int, list] = {0: [], 1: []}
    b.submit(FakeLoop(0, steps=2), on_step=lambda d, t: seen[0].append((d, t)))
    b.submit(FakeLoop(1, steps=3), on_step=lambda d, t: seen[1].append((d, t)))
    drain(b)
    assert seen == {0: [(1, 2), (2, 2)], 1: [(1, 3), (2, 3), (3, 3)]}


def test_the_worker_thread_serves_concurrent_callers():
    den = FakeDenoiser()
    b = StepBatcher(den, BatchingOptions(max_batch=8))
    loops = [FakeLoop(rid, steps=4) for rid in range(6)]
    results: dict[int, object] = {}

    def call(loop):
        results[loop.rid] = b.run(loop)

    threads = [threading.Thread(target=call, args=(loop,)) for loop in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    b.close()
    assert sorted(results) == list(range(6))
    assert all(loop.done == 4 for loop in loops)
    assert sum(len(call) for call in den.calls) == 6 * 4


def test_run_raises_the_request_s_own_error_and_close_fails_what_is_left():
    b = batcher(FakeDenoiser(fail_for=0), max_batch=8)
    _, request = b.submit(FakeLoop(0, steps=1))
    drain(b)
    assert isinstance(request.error, ValueError)
    _, left = b.submit(FakeLoop(1, steps=5))
    b.close()
    assert isinstance(left.error, RuntimeError)
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(FakeLoop(2, steps=1))


class KeywordLoop(FakeLoop):
    """A loop whose denoiser takes keyword inputs, one of them shared by every row (position ids)."""

    denoiser = "transformer"

    def model_inputs(self):
        x, _ = super().model_inputs()
        return {"x": x, "ids": Shared(torch.arange(4)), "nothing": None}


def test_keyword_and_shared_inputs_are_merged_once_per_call():
    seen = []

    def denoiser(*, x, ids, nothing):
        assert nothing is None
        seen.append((x.shape[0], ids.tolist()))
        return x + 1000

    b = batcher(denoiser, max_batch=4, buckets=(4,))
    loops = [KeywordLoop(i, steps=1) for i in range(3)]
    for loop in loops:
        b.submit(loop)
    drain(b)
    assert seen == [(4, [0, 1, 2, 3])]  # three rows padded to the bucket; the shared ids passed once, unbatched
    assert [int(loop.latents[0, 0]) for loop in loops] == [1000, 1001, 1002]


def test_loops_that_disagree_on_their_inputs_fail_alone_not_together():
    class Positional(FakeLoop):
        def model_inputs(self):
            return (super().model_inputs()[0],)

    b = batcher(lambda *args, **kwargs: (args[0] if args else kwargs["x"]) + 1000, max_batch=8)
    mixed = [KeywordLoop(0, steps=1), Positional(1, steps=1)]
    requests = [b.submit(loop)[1] for loop in mixed]
    drain(b)
    # the merged call is refused; retried one by one, each runs alone
    assert all(r.done.is_set() and r.error is None for r in requests)
    with pytest.raises(ValueError, match="disagree"):
        concat_inputs([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}], 1)


def test_a_named_tuple_input_is_merged_field_by_field():
    from typing import NamedTuple

    class Condition(NamedTuple):
        rows: torch.Tensor
        ids: object
        absent: object

    parts = [(torch.full((n, 2), float(n)), Condition(torch.full((n, 1), float(n)), Shared(torch.arange(3)), None))
             for n in (1, 2)]
    args, kwargs = concat_inputs(parts, 4)
    x, cond = args
    assert not kwargs and x.shape == (4, 2) and isinstance(cond, Condition)
    assert cond.rows[:, 0].tolist() == [1, 2, 2, 2] and cond.ids.tolist() == [0, 1, 2] and cond.absent is None
    with pytest.raises(ValueError, match="disagree"):
        concat_inputs([(Condition(torch.zeros(1), None, None),), ((torch.zeros(1), None, None),)], 1)


def test_the_runner_keeps_one_batcher_per_denoiser_and_closing_refuses_more():
    class Components:
        unet = FakeDenoiser()

        @staticmethod
        def transformer(*, x, ids, nothing):
            return x + 1000

    runner = PipelineRunner(Components(), BatchingOptions(max_batch=4))
    runner.drive(FakeLoop(0, steps=2))
    runner.drive(KeywordLoop(1, steps=2))
    assert set(runner.batchers) == {"unet", "transformer"}
    assert len(Components.unet.calls) == 2
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.drive(FakeLoop(2, steps=1))
    assert PipelineRunner(Components(), None).batches("sd1.5-scifi") is False
