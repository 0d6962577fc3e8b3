"""Run requests together through one ``StepBatcher``, holding its ticks until every request has joined.

The step-batching tests (SD, Omni-Zero, OminiControl) drive a batcher built with ``start_thread=False``:
each request runs in its own thread, and the test ticks the batcher only once all of them wait in its
queue, so the requests really share their first denoiser calls.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

from diffserve.engine.batching import StepBatcher


def run_together(batcher: StepBatcher, calls: Sequence[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Each of ``calls`` in a thread of its own; ``batcher`` ticked here once all have joined its queue, until the
    threads end. Returns their results in order; fails on the first call that raised (all of them are listed)."""
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def target(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i, call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while len(batcher.scheduler.waiting) < len(calls) and not errors:  # all joined: tick
        assert time.monotonic() < deadline, "the requests did not all join the batcher"
        time.sleep(0.001)
    while any(t.is_alive() for t in threads):
        if not batcher.tick():
            time.sleep(0.001)
    assert not errors, errors
    return [results[i] for i in range(len(calls))]


class DeviceScheduled:
    """The same components with the scheduler run as a precomputed plan (``device_scheduler``)."""

    device_scheduler = True

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)
