"""Step-level batching: one denoiser call per tick over every active request whose shapes agree.

Requests join and leave at step boundaries. Each request brings its own loop (a step object with
``model_inputs()``, ``advance(output)``, ``rows``, ``shape_key``, ``done``/``total``/``finished``;
``diffserve.engine.pipelines.common.DenoiseLoop`` is the one the SD pipelines use), so its scheduler,
generator (the same noise as alone), guidance scale and step count stay its own; the batcher only
concatenates the model inputs of the loops it picks, runs the denoiser once, and hands each loop
its rows of the output.

``StepScheduler`` is the pure policy (no torch, no threads), tested with fake requests:

* **admission** is FIFO: the head of the queue joins the active set when its rows fit in
  ``max_batch`` next to the active rows (or nothing is active). A request bigger than ``max_batch``
  runs alone. Nothing overtakes the head, so a big request is never starved by small ones.
* **wait bound**: once the head has waited ``max_wait_ticks`` ticks it joins anyway, as long as the
  active rows stay within ``max_active`` (default twice ``max_batch``); the active set then time-shares
  the denoiser calls. A new request therefore waits for a free slot at most ``max_wait_ticks`` ticks
  unless the active set is already over-committed.
* **selection**: each tick runs the least recently stepped active request (ties: earliest admitted)
  with every other active request of the same ``shape_key`` in that order, up to ``max_batch`` rows.
  Every active request runs at least once every (number of active requests) ticks: no starvation,
  and requests of different resolutions alternate.
* **buckets**: the call's rows are padded (by repeating the last row) up to the smallest bucket that
  holds them — the sizes compiled or captured as CUDA graphs; above the largest bucket, no padding.

``PipelineRunner`` is what a server holds per set of loaded components (the local backend per checkpoint,
a Triton fused pipeline instance for its slug): it runs the slugs whose pipeline is step-batched through
its ``StepBatcher`` and every other request one at a time.

``StepBatcher`` owns one denoiser and a worker thread and runs that policy; ``run(loop, control)``
blocks the calling thread until its loop is done. Per request: progress (``control.on_step``),
cancellation (``control.is_cancelled``, polled every tick) and a deadline fail or report that request
only. A denoiser call that raises is retried with each of its requests alone, so one request's bad
input fails that request only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import torch

from diffserve.engine.options import BatchingOptions  # noqa: F401  (the batcher's options, re-exported)
from diffserve.engine.pipelines.common import Cancelled

logger = logging.getLogger(__name__)


class DeadlineExceeded(TimeoutError):
    """A request's deadline passed before its loop finished."""


class BatchedLoop(Protocol):
    """What the batcher needs of one request's denoising loop (``DenoiseLoop`` is one)."""

    done: int
    total: int

    @property
    def finished(self) -> bool: ...

    @property
    def rows(self) -> int: ...

    @property
    def shape_key(self) -> Hashable: ...

    def model_inputs(self) -> Sequence[Any] | Mapping[str, Any]:
        """This step's denoiser arguments (positional or keyword; ``None``, ``Shared`` and NamedTuples of
        inputs, merged field by field, allowed).
        A loop may name the component it calls in ``denoiser`` (default ``unet``)."""

    def advance(self, output: torch.Tensor) -> None: ...


class Shared:
    """A denoiser input that every row of a call shares instead of concatenating (the rotary position
    ids of one resolution, say). The loops' ``shape_key`` must make it equal across the requests of a
    call; the call takes the first request's value."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


# -- the policy ------------------------------------------------------------------------------------

@dataclass(eq=False)
class Entry:
    """A request as the scheduler sees it."""

    rows: int
    key: Hashable
    payload: Any = None
    seq: int = 0
    """Arrival order."""
    queued_at: int = 0
    """Tick count when it arrived."""
    last_run: int = -1
    """Tick of its last denoiser call (-1: never)."""


@dataclass
class Tick:
    entries: list[Entry]
    """The requests of this tick's denoiser call, in row order."""
    rows: int
    padded_rows: int


@dataclass
class StepScheduler:
    """FIFO admission with a wait bound, least-recently-stepped selection, buckets. No torch, no threads."""

    options: BatchingOptions = field(default_factory=BatchingOptions)
    waiting: deque[Entry] = field(default_factory=deque)
    active: list[Entry] = field(default_factory=list)
    ticks: int = 0
    _seq: int = 0

    def add(self, entry: Entry) -> Entry:
        entry.seq, entry.queued_at = self._seq, self.ticks
        self._seq += 1
        self.waiting.append(entry)
        return entry

    def remove(self, entry: Entry) -> None:
        """Drop a request wherever it is (finished, cancelled, failed)."""
        if entry in self.active:
            self.active.remove(entry)
        elif entry in self.waiting:
            self.waiting.remove(entry)

    @property
    def active_rows(self) -> int:
        return sum(e.rows for e in self.active)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def admit(self) -> list[Entry]:
        """Move requests from the head of the queue into the active set; returns those admitted."""
        admitted = []
        opts = self.options
        while self.waiting:
            head = self.waiting[0]
            rows = self.active_rows
            fits = not self.active or rows + head.rows <= opts.max_batch
            overdue = self.ticks - head.queued_at >= opts.max_wait_ticks and rows + head.rows <= opts.active_limit
            if not (fits or overdue):
                break
            self.active.append(self.waiting.popleft())
            admitted.append(head)
        return admitted

    def schedule(self) -> Tick | None:
        """Admit, then pick this tick's call; None when nothing is active."""
        self.admit()
        if not self.active:
            return None
        order = sorted(self.active, key=lambda e: (e.last_run, e.seq))
        first = order[0]
        chosen, rows = [first], first.rows
        for entry in order[1:]:
            if entry.key == first.key and rows + entry.rows <= self.options.max_batch:
                chosen.append(entry)
                rows += entry.rows
        chosen.sort(key=lambda e: e.seq)
        return Tick(chosen, rows, self.options.padded(rows))

    def ran(self, tick: Tick) -> None:
        """Record that ``tick``'s call ran; advances the tick count."""
        for entry in tick.entries:
            entry.last_run = self.ticks
        self.ticks += 1


# -- the engine side -------------------------------------------------------------------------------

@dataclass(eq=False)
class _Request:
    loop: BatchedLoop
    on_step: Callable[[int, int], None] | None
    is_cancelled: Callable[[], bool] | None
    deadline: float | None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    batch_requests: int = 0
    """Most requests in one denoiser call this request took part in."""
    batch_rows: int = 0
    """Most rows (before padding) in one denoiser call this request took part in."""


def _merge(parts: Sequence[Any], pad_to: int) -> Any:
    first = parts[0]
    if first is None:
        if any(p is not None for p in parts):
            raise ValueError("requests disagree on which denoiser inputs they pass")
        return None
    if isinstance(first, Shared):
        if not all(isinstance(p, Shared) for p in parts):
            raise ValueError("requests disagree on which denoiser inputs are shared")
        return first.value
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # a NamedTuple of inputs: field by field
        if any(type(p) is not type(first) for p in parts):
            raise ValueError("requests disagree on the type of a denoiser input")
        return type(first)(*(_merge(list(fields), pad_to) for fields in zip(*parts)))
    x = torch.cat(parts)
    if x.shape[0] < pad_to:
        x = torch.cat([x, x[-1:].expand(pad_to - x.shape[0], *x.shape[1:])])
    return x


def concat_inputs(inputs: list[Sequence[Any] | Mapping[str, Any]], pad_to: int) -> tuple[list[Any], dict[str, Any]]:
    """Concatenate per-request denoiser arguments along the batch axis, padded to ``pad_to`` rows.

    Each request gives its arguments as a sequence (positional) or a mapping (keyword); ``None`` stays
    ``None`` and a ``Shared`` value is passed once. Returns ``(args, kwargs)`` for the denoiser call."""
    if isinstance(inputs[0], Mapping):
        names = list(inputs[0])
        if any(not isinstance(i, Mapping) or list(i) != names for i in inputs):
            raise ValueError("requests disagree on the denoiser's keyword inputs")
        return [], {name: _merge([i[name] for i in inputs], pad_to) for name in names}
    if any(isinstance(i, Mapping) or len(i) != len(inputs[0]) for i in inputs):
        raise ValueError("requests disagree on the denoiser's inputs")
    return [_merge(parts, pad_to) for parts in zip(*inputs)], {}


class StepBatcher:
    """Runs the denoising loops of concurrent requests through one denoiser, a tick at a time.

    ``denoiser(*args)`` takes the concatenated ``model_inputs()`` of the loops and returns one output
    row per input row. ``run`` is called from any number of threads; the first call starts the worker
    thread (``start_thread=False`` leaves ticking to ``tick()``, as the unit tests do).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], options: BatchingOptions | None = None,
                 *, clock: Callable[[], float] = time.monotonic, start_thread: bool = True, name: str = "batcher"):
        self.denoiser = denoiser
        self.options = options or BatchingOptions()
        self.scheduler = StepScheduler(self.options)
        self.clock = clock
        self.calls: list[int] = []
        """Rows (before padding) of the last denoiser calls, newest last (kept short)."""
        self._cv = threading.Condition()
        self._start_thread = start_thread
        self._thread: threading.Thread | None = None
        self._closed = False
        self._name = name

    @property
    def capacity(self) -> int:
        """How many single-row requests one call takes (what a job runner should keep in flight)."""
        return self.options.max_batch

    def submit(self, loop: BatchedLoop, *, on_step: Callable[[int, int], None] | None = None,
               is_cancelled: Callable[[], bool] | None = None, deadline: float | None = None) -> tuple[Entry, _Request]:
        request = _Request(loop, on_step, is_cancelled, deadline)
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            entry = self.scheduler.add(Entry(rows=loop.rows, key=loop.shape_key, payload=request))
            if self._start_thread and self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify_all()
        if loop.finished:  # a zero-step loop never needs the denoiser
            self._finish(entry, None)
        return entry, request

    def run(self, loop: BatchedLoop, control: Any = None, deadline: float | None = None,
            report: dict[str, int] | None = None) -> torch.Tensor:
        """Run ``loop`` to the end with the other requests; returns its final latents.

        ``control`` is an ``diffserve.engine.pipelines.RunControl`` (its ``on_step`` and ``is_cancelled`` are used),
        so this is a ``RunControl.driver``. ``report`` receives ``requests`` and ``rows``: the most of each
        in one denoiser call this loop took part in. Raises what failed this request: ``Cancelled``,
        ``DeadlineExceeded`` or the denoiser's or step's own error.
        """
        _, request = self.submit(loop, on_step=getattr(control, "on_step", None),
                                 is_cancelled=getattr(control, "is_cancelled", None), deadline=deadline)
        request.done.wait()
        if report is not None:
            report.update(requests=request.batch_requests, rows=request.batch_rows)
        if request.error is not None:
            raise request.error
        return loop.latents  # type: ignore[attr-defined]

    def close(self) -> None:
        """Fail what is left with ``RuntimeError`` and stop the worker thread."""
        with self._cv:
            self._closed = True
            pending = list(self.scheduler.active) + list(self.scheduler.waiting)
            self._cv.notify_all()
        for entry in pending:
            self._finish(entry, RuntimeError("the batcher closed"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- one tick --------------------------------------------------------------------------------

    def tick(self) -> bool:
        """Drop cancelled and overdue requests, then run one denoiser call; False when idle."""
        now = self.clock()
        with self._cv:
            entries = list(self.scheduler.active) + list(self.scheduler.waiting)
        for entry in entries:
            request: _Request = entry.payload
            try:
                if request.is_cancelled is not None and request.is_cancelled():
                    self._finish(entry, Cancelled("cancelled"))
                elif request.deadline is not None and now >= request.deadline:
                    self._finish(entry, DeadlineExceeded(
                        f"deadline passed after {request.loop.done} of {request.loop.total} steps"))
            except Exception as exc:  # noqa: BLE001 - a failing hook fails its own request only
                self._finish(entry, exc)
        with self._cv:
            tick = self.scheduler.schedule()
        if tick is None:
            return False
        self._run(tick)
        with self._cv:
            self.scheduler.ran(tick)
        return True

    def _run(self, tick: Tick) -> None:
        inputs, ok = [], []
        for entry in tick.entries:
            try:
                inputs.append(entry.payload.loop.model_inputs())
                ok.append(entry)
            except Exception as exc:  # noqa: BLE001
                self._finish(entry, exc)
        if not ok:
            return
        rows = sum(e.rows for e in ok)
        for entry in ok:
            request: _Request = entry.payload
            request.batch_requests = max(request.batch_requests, len(ok))
            request.batch_rows = max(request.batch_rows, rows)
        try:
            output = self._call(inputs, self.options.padded(rows), rows)
        except Exception as exc:  # noqa: BLE001 - find whose input fails: each request alone
            if len(ok) == 1:
                self._finish(ok[0], exc)
                return
            logger.warning("a batched denoiser call of %d requests failed; running them one by one", len(ok),
                           exc_info=True)
            for entry, args in zip(ok, inputs):
                try:
                    self._advance(entry, self._call([args], self.options.padded(entry.rows), entry.rows))
                except Exception as exc:  # noqa: BLE001
                    self._finish(entry, exc)
            return
        start = 0
        for entry in ok:
            self._advance(entry, output[start:start + entry.rows])
            start += entry.rows

    def _call(self, inputs: list[Sequence[Any] | Mapping[str, Any]], pad_to: int, rows: int) -> torch.Tensor:
        self.calls = (self.calls + [rows])[-64:]
        with torch.inference_mode():
            args, kwargs = concat_inputs(inputs, pad_to)
            output = self.denoiser(*args, **kwargs)
        if output.shape[0] != pad_to:
            raise RuntimeError(f"the denoiser returned {output.shape[0]} rows for {pad_to}")
        return output

    def _advance(self, entry: Entry, output: torch.Tensor) -> None:
        request: _Request = entry.payload
        try:
            request.loop.advance(output)
            if request.on_step is not None:
                request.on_step(request.loop.done, request.loop.total)
        except Exception as exc:  # noqa: BLE001
            self._finish(entry, exc)
            return
        if request.loop.finished:
            self._finish(entry, None)

    def _finish(self, entry: Entry, error: BaseException | None) -> None:
        request: _Request = entry.payload
        with self._cv:
            self.scheduler.remove(entry)
        if not request.done.is_set():
            request.error = error
            request.done.set()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self.scheduler.has_work():
                    self._cv.wait()
                if self._closed:
                    return
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - never let the worker die; requests were failed in tick
                logger.exception("batcher tick failed")



class PipelineRunner:
    """Runs requests on one set of components, as many in flight as the batcher takes.

    With ``options`` (batching on), the requests of a slug whose pipeline builds a batchable loop
    (``diffserve.engine.pipelines.step_batched``) go through one ``StepBatcher`` per denoiser (the loop's
    ``denoiser``: the component it calls, ``unet`` when it names none), each in its caller's thread for its
    own stages before and after the loop; every other request (or all of them with batching off) runs one
    at a time. One copy of the weights serves them all: at full size the memory cost of more requests in
    flight is their activations (one batched denoiser call of ``max_batch`` rows), not another
    instance's weights and CUDA context.
    """

    def __init__(self, components: Any, options: BatchingOptions | None = None, *, name: str = "batcher"):
        self.components = components
        self.options = options
        self.batchers: dict[str, StepBatcher] = {}
        """Denoiser component name -> its batcher, made on the first request that needs it."""
        self._name = name
        self._closed = False
        self._lock = threading.Lock()
        self._alone = threading.Lock()

    @property
    def batcher(self) -> StepBatcher | None:
        """The batcher of the first denoiser used (a checkpoint's pipelines share one denoiser)."""
        return next(iter(self.batchers.values()), None)

    def batcher_for(self, denoiser: str) -> StepBatcher:
        with self._lock:
            if self.batchers.get(denoiser) is None:
                if self.options is None or self._closed:
                    raise RuntimeError("batching is off" if self.options is None else "the runner is closed")
                self.batchers[denoiser] = StepBatcher(getattr(self.components, denoiser), self.options,
                                                      name=f"{self._name}-{denoiser}")
            return self.batchers[denoiser]

    def batches(self, slug: str) -> bool:
        """Whether ``slug``'s requests are step-batched here."""
        from diffserve.engine.pipelines import step_batched

        return self.options is not None and step_batched(slug)

    def capacity(self, slug: str) -> int:
        """Requests of ``slug`` worth having in flight: ``max_batch`` when they batch, else 1."""
        return self.options.max_batch if self.options is not None and self.batches(slug) else 1

    def drive(self, loop: BatchedLoop, control: Any = None, deadline: float | None = None,
              report: dict[str, int] | None = None) -> torch.Tensor:
        """A ``RunControl.driver``: ``loop`` through the batcher of its denoiser."""
        return self.batcher_for(getattr(loop, "denoiser", "unet")).run(loop, control, deadline, report)

    def run(self, slug: str, params: dict[str, Any], control: Any = None):
        """``diffserve.engine.pipelines.run`` for one request, batched with the others where ``batches(slug)``; the
        result's ``batch`` says how. Raises what failed this request only."""
        from diffserve.engine.pipelines import RunControl, run

        control = control if control is not None else RunControl()
        if not self.batches(slug):
            with self._alone:
                return run(slug, params, self.components, control)
        report: dict[str, int] = {}
        driven = dataclasses.replace(control, driver=functools.partial(self.drive, report=report))
        result = run(slug, params, self.components, driven)
        result.batch = dict(report)
        return result

    def close(self) -> None:
        """Fail the requests still in the batchers and stop their threads."""
        with self._lock:
            self._closed = True
            batchers = list(self.batchers.values())
        for batcher in batchers:
            batcher.close()
