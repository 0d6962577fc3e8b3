"""``GenerationBackend`` over Triton: the pipeline client of ``diffserve.triton_serving.client``, its
failures mapped to the API's backend errors, and the server start-up of ``serve`` (a Triton this
process starts is supervised: restarted when it dies, and reported unhealthy when it stays down)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffserve.api.backend import (
    BackendError, BackendResult, BackendTimeout, BackendUnavailable, GenerationFailed, InputRejected, ProgressCallback,
)
from diffserve.triton_serving.client import (
    TritonGenerationFailed, TritonOutput, TritonPipelineClient, TritonRequestError, TritonRequestRejected,
    TritonTimeout, TritonUnavailable,
)

if TYPE_CHECKING:
    from diffserve.api.settings import Settings

logger = logging.getLogger(__name__)

_ERRORS: dict[type[TritonRequestError], type[BackendError]] = {
    TritonRequestRejected: InputRejected, TritonUnavailable: BackendUnavailable, TritonTimeout: BackendTimeout,
    TritonGenerationFailed: GenerationFailed,
}


class TritonBackend:
    """A ``GenerationBackend`` whose pipelines run on a Triton server (through ``TritonPipelineClient``)."""

    def __init__(self, grpc_url: str, pipelines: dict[str, dict[str, Any]], *, timeout_s: float = 600.0):
        self.client = TritonPipelineClient(grpc_url, pipelines, timeout_s=timeout_s)

    @classmethod
    def from_repository(cls, grpc_url: str, repository: str | Path, **kw) -> TritonBackend:
        from diffserve.triton_serving.manifest import read_manifest

        return cls(grpc_url, read_manifest(repository)["pipelines"], **kw)

    @property
    def slugs(self) -> Collection[str]:
        return tuple(self.client.models)

    @property
    def batch_capacity(self) -> int:
        """Requests worth keeping in flight (``Settings.job_concurrency``): the most that one served pipeline
        model works on at once, as the repository manifest records it (``batch_capacity``: ``max_batch`` per
        step-batching fused instance, one per other instance). A repository built before batching records
        none: 1."""
        return max((int(self.client.pipelines[name].get("batch_capacity", 1)) for name in self.client.models.values()),
                   default=1)

    async def infer(self, model: str, params: dict[str, Any], **kw) -> TritonOutput:
        """One pipeline-model request, its failure raised as the API's ``BackendError``."""
        try:
            return await self.client.infer(model, params, **kw)
        except TritonRequestError as exc:
            raise _ERRORS[type(exc)](str(exc)) from exc

    async def generate(self, slug: str, params: dict[str, Any], *, request_id: str,
                       on_progress: ProgressCallback | None = None) -> BackendResult:
        if slug not in self.client.models:
            raise BackendUnavailable(f"{slug} is not served by this Triton repository")
        t0 = time.perf_counter()
        out = await self.infer(self.client.models[slug], params, request_id=request_id, on_progress=on_progress)
        wall = time.perf_counter() - t0
        timings = {k: float(v) for k, v in out.info.get("timings", {}).items()}
        compute = float(out.info.get("model_seconds", timings.get("total", wall)))
        timings.update(compute=compute, queue=max(0.0, wall - compute), round_trip=wall)
        return BackendResult(images=list(out.images), seed=out.seed, timings=timings)

    async def ready(self) -> dict[str, bool]:
        return await self.client.ready()

    async def close(self) -> None:
        await self.client.close()


class ManagedTritonBackend(TritonBackend):
    """A ``TritonBackend`` that owns the Triton server it talks to, through a ``TritonSupervisor``.

    The supervisor restarts the server when it dies; :meth:`liveness_problem` (what ``/healthz``
    reads) reports it once it has been down longer than ``unhealthy_after_s``, so an orchestrator
    replaces a process whose Triton cannot come back. The server is stopped on close.
    """

    def __init__(self, supervisor, pipelines: dict[str, dict[str, Any]], *, unhealthy_after_s: float = 60.0, **kw):
        super().__init__(supervisor.server.grpc_url, pipelines, **kw)
        self.supervisor = supervisor
        self.server = supervisor.server
        self.unhealthy_after_s = unhealthy_after_s

    def triton_restarts(self) -> int:
        """Restart attempts of the server so far (``diffserve_triton_restarts_total``)."""
        return self.supervisor.restarts

    def liveness_problem(self) -> str | None:
        """Why this process is unhealthy (its Triton down for too long), or None."""
        down = self.supervisor.down_for()
        if down is None or down < self.unhealthy_after_s:
            return None
        reason = (f"the Triton server this process started has been down for {down:.0f} s "
                  f"(limit triton_unhealthy_after_s={self.unhealthy_after_s:g}); "
                  f"{self.supervisor.restarts} restart attempts so far")
        if self.supervisor.last_error:
            reason += f"; last error: {self.supervisor.last_error}"
        return reason

    async def close(self) -> None:
        await super().close()
        await asyncio.get_running_loop().run_in_executor(None, self.supervisor.stop)


def create_triton_backend(settings: Settings, demo: bool) -> TritonBackend:
    """The backend ``diffserve serve --backend triton`` uses.

    With ``settings.triton_url`` it connects to a Triton server someone else runs (the model
    repository, for its manifest, is ``settings.repository``); otherwise it starts one on the
    repository (the demo repository with ``demo``: tiny checkpoints, exported on first use),
    supervised: it dies with this process and is restarted when it dies first.
    """
    from diffserve.triton_serving.manifest import read_manifest
    from diffserve.triton_serving.server import TritonServer, TritonServerConfig
    from diffserve.triton_serving.supervisor import TritonSupervisor

    repository = settings.repository
    if demo:
        from diffserve.export.repository import build_demo_repository

        repository = build_demo_repository(repository, **settings.repository_batching()).repository
    if repository is None:
        raise SystemExit("--backend triton needs a model repository: --repository DIR "
                         "(built by `diffserve export`) or --demo")
    pipelines = read_manifest(repository)["pipelines"]
    timeout = settings.triton_timeout_s or settings.job_timeout_s
    if settings.triton_url:
        return TritonBackend(settings.triton_url, pipelines, timeout_s=timeout)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = TritonServer(TritonServerConfig(repository=Path(repository), log_file=settings.data_dir / "triton.log",
                                             startup_timeout_s=settings.triton_startup_timeout_s))
    supervisor = TritonSupervisor(server, backoff_s=settings.triton_restart_backoff_s,
                                  max_backoff_s=max(30.0, settings.triton_restart_backoff_s))
    supervisor.start()
    return ManagedTritonBackend(supervisor, pipelines, unhealthy_after_s=settings.triton_unhealthy_after_s,
                                timeout_s=timeout)
