"""The interface between the HTTP layer and whatever runs the pipelines.

The API validates a request against the catalog, decodes its images (to uint8 ``[H, W, 3]``
arrays, the form they keep down to the pipeline) and hands the job runner a plain parameter
dict; the runner calls a ``GenerationBackend`` and encodes the uint8 images it gets back. Two implementations: ``diffserve.api.backend_local.EngineBackend`` (pipelines in this process,
in a thread pool) and the Triton backend (pipeline models behind gRPC). Neither knows about
HTTP, the job store or credits; the API never imports engine runtimes.

Errors are reported by raising a ``BackendError`` subclass; its ``status_code`` is what a
synchronous (``/v1``) request answers, and its message is shown to the client (for ``/v2``
as the FAILED job's ``error``), so it must say what went wrong without leaking internals.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "BackendError",
    "BackendResult",
    "BackendTimeout",
    "BackendUnavailable",
    "GenerationBackend",
    "GenerationFailed",
    "InputRejected",
    "ProgressCallback",
]

ProgressCallback = Callable[[int, int], None]
"""``(steps done, total steps)``; may be called from any thread, must be cheap and never raise."""


@dataclass
class BackendResult:
    images: list[np.ndarray]
    """uint8 [H, W, 3] per image, in request order."""
    seed: int
    """The seed actually used (a drawn one when the request said -1)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage as the backend measured them: ``queue`` (waiting inside the backend),
    ``compute`` (the whole generation), and stages such as ``encode_text``, ``denoise``,
    ``decode``, ``total``. ``compute`` is reported to clients as ``inference_time``."""


class BackendError(Exception):
    """A generation could not be done; the message is client-facing."""

    status_code: int = 500
    reason: str = "backend_error"
    """Short label for metrics (``failures by reason``)."""


class BackendUnavailable(BackendError):
    """The backend (Triton server, a model, a checkpoint) is down or not ready."""

    status_code = 502
    reason = "backend_unavailable"


class BackendTimeout(BackendError):
    """The backend did not answer in time."""

    status_code = 504
    reason = "backend_timeout"


class InputRejected(BackendError):
    """The request passed the catalog but the model refused it (e.g. no face in identity_image)."""

    status_code = 400
    reason = "input_rejected"


class GenerationFailed(BackendError):
    """The backend failed while generating (a bug, out of memory, a crashed model instance)."""

    status_code = 500
    reason = "generation_failed"


@runtime_checkable
class GenerationBackend(Protocol):
    """What the job runner needs from a backend. One instance serves every request concurrently."""

    @property
    def slugs(self) -> Collection[str]:
        """Catalog slugs this backend can serve; requests for others get 404 before queueing."""

    async def generate(
        self,
        slug: str,
        params: dict[str, Any],
        *,
        request_id: str,
        on_progress: ProgressCallback | None = None,
    ) -> BackendResult:
        """Run one request.

        ``params`` is the catalog-validated dict (``ModelSpec.validate``) in which every image
        parameter holds a decoded uint8 ``[H, W, 3]`` numpy array (``diffserve.api.images``) or None;
        ``seed`` is never -1 (the API draws it so that a retried job repeats the same image). ``request_id`` is for logs and tracing.
        Cancellation is cancelling the asyncio task awaiting this call: the backend stops the
        work as soon as it can (between denoising steps) and re-raises ``CancelledError`` once
        the work has actually stopped, so that the runner's concurrency bound stays true.
        """

    async def ready(self) -> dict[str, bool]:
        """``{"server": bool, "<slug>": bool, ...}``: whether the backend and each slug can serve."""

    async def close(self) -> None:
        """Release connections, threads and models; called once at API shutdown."""
