"""``EngineBackend``: runs the engine's pipelines in this process ("serve without Triton").

Each slug maps to a local diffusers checkpoint directory; the torch components of a directory
are loaded on first use and shared by every slug pointing at it (``sd1.5-scifi`` and
``sd1.5-img2img`` can share one SD1.5 checkpoint). With torch optimizations that compile, every
checkpoint is loaded (and its compiled components warmed up) in the pool at start instead, and
``ready`` reports a slug only once that is done: no request pays the compile. Generations run in a thread pool of
``max_workers`` threads so the event loop stays free; progress comes from the pipeline's
``on_step`` hook and cancellation sets a ``threading.Event`` that the pipeline polls before
every denoising step.

With ``batching`` (``diffserve.engine.batching.BatchingOptions``; on by default in ``serve``) each checkpoint
gets one ``diffserve.engine.batching.PipelineRunner`` (as a Triton fused pipeline instance does): concurrent requests of the slugs whose loop is a
``DenoiseLoop`` (``sd1.5-scifi``, ``sd1.5-img2img``, ``segmind-vega``) share UNet calls, while their
text encoding and VAE run in their own pool threads. ``omni-zero`` and ``ominicontrol`` run one
request at a time per checkpoint (see the README's batching section for why). The pool then has
``max_batch`` threads and ``batch_capacity`` tells the job runner to keep that many jobs in flight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from diffserve.api.backend import (
    BackendResult, BackendUnavailable, GenerationFailed, InputRejected, ProgressCallback,
)

logger = logging.getLogger(__name__)


class EngineBackend:
    """In-process ``GenerationBackend`` on ``diffserve.engine.runtime_torch.TorchComponents``."""

    def __init__(self, checkpoints: Mapping[str, str | Path], device: str | None = None,
                 precision: str | None = None, max_workers: int | None = None, optimizations: str | None = None,
                 batching: Any = None):
        from diffserve.engine.catalog import get_model

        for slug in checkpoints:
            get_model(slug)  # raises UnknownModelError for a typo
        self._batching = batching
        if max_workers is None:
            max_workers = batching.max_batch if batching is not None else 1
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._max_workers = max_workers
        self._runners: dict[Path, Any] = {}
        """Checkpoint -> its ``diffserve.engine.batching.PipelineRunner`` (the loaded components and their batcher)."""
        self._checkpoints = {slug: Path(path).resolve() for slug, path in checkpoints.items()}
        self._device = device
        self._precision = precision
        self._optimizations = optimizations
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="engine")
        self._load_lock = threading.Lock()
        self._cancel_events: set[threading.Event] = set()
        self._closed = False
        self._preloading: set[Path] = set()
        if optimizations:
            from diffserve.engine.torch_optimize import TorchOptimizations

            if TorchOptimizations.parse(optimizations).compile:
                # One slug per checkpoint directory: the load is shared.
                first_slug = {path: slug for slug, path in reversed(self._checkpoints.items())}
                self._preloading = set(first_slug)
                for slug in first_slug.values():
                    self._pool.submit(self._preload, slug)

    @property
    def slugs(self) -> frozenset[str]:
        return frozenset(self._checkpoints)

    @property
    def batch_capacity(self) -> int:
        """Requests worth keeping in flight: the batch size with batching, else the pool's threads."""
        return self._batching.max_batch if self._batching is not None else self._max_workers

    # -- GenerationBackend ---------------------------------------------------------------------

    async def generate(self, slug: str, params: dict[str, Any], *, request_id: str,
                       on_progress: ProgressCallback | None = None) -> BackendResult:
        if self._closed:
            raise BackendUnavailable("the local backend is shutting down")
        if slug not in self._checkpoints:
            raise BackendUnavailable(f"model {slug!r} is not loaded by this server")
        cancel = threading.Event()
        submitted = time.perf_counter()
        self._cancel_events.add(cancel)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._pool, self._generate_blocking, slug, params, request_id, on_progress, cancel, submitted)
        try:
            # shield: a cancelled caller must not detach from a thread that is still computing.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            # Wait until the pipeline has noticed (at most one denoising step), so that the
            # caller's concurrency slot is only freed when the compute really is.
            await asyncio.wait({future})
            if not future.cancelled():
                future.exception()  # retrieved: the expected engine Cancelled is not an error
            raise
        finally:
            self._cancel_events.discard(cancel)

    async def ready(self) -> dict[str, bool]:
        status = {"server": not self._closed}
        for slug, path in self._checkpoints.items():
            loadable = path in self._runners or (path not in self._preloading and (path / "model_index.json").is_file())
            status[slug] = not self._closed and loadable
        return status

    async def close(self) -> None:
        self._closed = True
        for event in list(self._cancel_events):
            event.set()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()

    # -- in the worker thread ------------------------------------------------------------------

    def _preload(self, slug: str) -> None:
        try:
            self._runner_for(slug)
        except BackendUnavailable:
            pass  # logged; requests for the slug get the same error
        finally:
            self._preloading.discard(self._checkpoints[slug])

    def _runner_for(self, slug: str) -> tuple[Any, float]:
        """The (possibly shared) ``PipelineRunner`` of ``slug``'s checkpoint and the seconds spent loading."""
        path = self._checkpoints[slug]
        with self._load_lock:
            if path in self._runners:
                return self._runners[path], 0.0
            from diffserve.engine.batching import PipelineRunner
            from diffserve.engine.runtime_torch import TorchComponents

            start = time.perf_counter()
            try:
                components = TorchComponents(path, device=self._device, precision=self._precision,
                                             optimizations=self._optimizations)
            except Exception as exc:  # noqa: BLE001 - any load failure means "this model is unavailable"
                logger.exception("loading checkpoint %s for %s failed", path, slug)
                raise BackendUnavailable(
                    f"model {slug!r} is unavailable: its checkpoint could not be loaded ({type(exc).__name__})"
                ) from exc
            runner = self._runners[path] = PipelineRunner(components, self._batching, name=f"batcher-{path.name}")
            return runner, time.perf_counter() - start

    def _generate_blocking(self, slug: str, params: dict[str, Any], request_id: str,
                           on_progress: ProgressCallback | None, cancel: threading.Event,
                           submitted: float) -> BackendResult:
        from diffserve.engine.catalog import InvalidRequest
        from diffserve.engine.pipelines import Cancelled, RunControl

        started = time.perf_counter()
        if cancel.is_set():
            raise Cancelled("cancelled before start")
        runner, load_s = self._runner_for(slug)
        try:
            result = runner.run(slug, params, RunControl(on_step=on_progress, is_cancelled=cancel.is_set))
        except Cancelled:
            raise
        except InvalidRequest as exc:
            # The catalog admitted the request but the pipeline's own input checks refused it.
            raise InputRejected(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - mapped to a client-safe message; logged in full
            logger.exception("request %s: %s generation failed", request_id, slug)
            raise GenerationFailed(f"generation failed: {type(exc).__name__}") from exc
        timings = {k: float(v) for k, v in result.timings.items()}
        timings["queue"] = started - submitted
        if load_s:
            timings["load"] = load_s
        timings["compute"] = time.perf_counter() - started - load_s
        return BackendResult(images=list(result.to_uint8()), seed=int(result.seed), timings=timings)



def create_local_backend(settings, demo: bool) -> EngineBackend:
    """The backend ``diffserve serve --backend local`` uses: the ``settings.checkpoints`` directories
    (``--checkpoint``/``DIFFSERVE_CHECKPOINTS``), over the tiny demo checkpoints with ``demo``."""
    from diffserve.engine.tiny.demo import demo_checkpoints

    checkpoints = dict(demo_checkpoints()) if demo else {}
    checkpoints.update(settings.checkpoints)
    if not checkpoints:
        raise SystemExit("--backend local needs checkpoints: --checkpoint SLUG=DIR (repeatable) or --demo")
    return EngineBackend(checkpoints, device=settings.device, precision=settings.precision,
                         max_workers=settings.max_concurrent_jobs, optimizations=settings.torch_optimizations,
                         batching=settings.batching_options())
