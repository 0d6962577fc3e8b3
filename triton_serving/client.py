"""A client for the pipeline models of a repository built by ``diffserve export``.

Each request opens one bidirectional gRPC stream to the slug's decoupled pipeline model, sends
the validated request in the wire form of ``diffserve.engine.request.GenerationRequest`` (parameters as
JSON, images as UINT8 [H, W, 3] tensors), forwards every ``PROGRESS``
response to the caller, and returns the final ``IMAGES``/``SEED``/``INFO``. Cancelling the
awaiting task cancels the gRPC call; Triton then marks the request cancelled and the pipeline
model stops between denoising steps. Failures are raised as ``TritonRequestError`` subclasses.
Used by the API's Triton backend and by the serving benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class TritonOutput:
    images: np.ndarray
    """uint8 [N, H, W, 3]."""
    seed: int
    info: dict[str, Any]
    images_float: np.ndarray | None = None
    """float32 [N, H, W, 3] in [0, 1], when asked for."""


class TritonRequestError(Exception):
    """A pipeline request failed; the subclass says how, the message is fit for a client."""


class TritonRequestRejected(TritonRequestError):
    """The pipeline model refused the request's inputs (INVALID_ARG)."""


class TritonUnavailable(TritonRequestError):
    """The server, the pipeline model or one of its components is down or not ready."""


class TritonTimeout(TritonRequestError):
    """The stream's deadline passed before the final response."""


class TritonGenerationFailed(TritonRequestError):
    """The pipeline model failed while generating (INTERNAL)."""


def _classify(message: str) -> TritonRequestError:
    """Map a Triton error message to the kind of failure it reports."""
    lower = message.lower()
    if "invalid request" in lower or "invalid_arg" in lower:
        return TritonRequestRejected(message.split("invalid request:", 1)[-1].strip() or message)
    if "unavailable" in lower or "component failed" in lower or "not found" in lower or "not ready" in lower \
            or "failed to connect" in lower or "connection refused" in lower or "socket closed" in lower:
        return TritonUnavailable(f"Triton is unavailable: {message}")
    if "deadline" in lower or "timeout" in lower:
        return TritonTimeout(f"Triton did not answer in time: {message}")
    return TritonGenerationFailed(f"generation failed: {message}")


class TritonPipelineClient:
    """Talks to a running Triton server whose repository was built by ``diffserve export``."""

    def __init__(self, grpc_url: str, pipelines: dict[str, dict[str, Any]], *, timeout_s: float = 600.0):
        self.grpc_url = grpc_url
        self.pipelines = pipelines
        self.timeout_s = timeout_s
        self.models = {info["slug"]: name for name, info in pipelines.items() if info.get("default")}
        self._client = None
        self._loop = None

    @classmethod
    def from_repository(cls, grpc_url: str, repository: str | Path, **kw) -> TritonPipelineClient:
        from diffserve.triton_serving.manifest import read_manifest

        return cls(grpc_url, read_manifest(repository)["pipelines"], **kw)

    def _grpc(self):
        # A grpc.aio channel belongs to the event loop that made it.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(self.grpc_url)
            self._loop = loop
        return self._client

    async def infer(self, model: str, params: dict[str, Any], *, request_id: str = "",
                    on_progress: Callable[[int, int], None] | None = None, want_float: bool = False) -> TritonOutput:
        """One pipeline-model request.

        ``params`` are validated (``diffserve.engine.catalog.validate``), their image values uint8 [H, W, 3]
        arrays or None; a request that cannot be one is rejected before it is sent.
        """
        import tritonclient.grpc.aio as grpcclient

        from diffserve.engine.request import REQUEST_TENSOR, GenerationRequest, MalformedRequest

        try:
            payload, images = GenerationRequest.from_params(self.pipelines[model]["slug"], params).encode()
        except MalformedRequest as exc:
            raise TritonRequestRejected(str(exc)) from exc
        request = grpcclient.InferInput(REQUEST_TENSOR, [1], "BYTES")
        request.set_data_from_numpy(np.array([payload], dtype=np.object_))
        inputs = [request]
        for name, pixels in images.items():
            tensor = grpcclient.InferInput(name, list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels)
            inputs.append(tensor)
        names = ["IMAGES", "SEED", "INFO", "PROGRESS"] + (["IMAGES_FLOAT"] if want_float else [])
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        done = asyncio.Event()

        async def requests():
            yield {"model_name": model, "inputs": inputs, "outputs": outputs, "request_id": request_id}
            await done.wait()  # keep the stream open until the final response

        try:
            stream = self._grpc().stream_infer(requests(), stream_timeout=self.timeout_s)
        except Exception as exc:
            raise _classify(str(exc)) from exc
        try:
            async for result, error in stream:
                if error is not None:
                    raise _classify(str(error))
                images = result.as_numpy("IMAGES")
                if images is None:
                    progress = result.as_numpy("PROGRESS")
                    if progress is not None and on_progress is not None:
                        on_progress(int(progress[0]), int(progress[1]))
                    continue
                info = json.loads(result.as_numpy("INFO").reshape(-1)[0])
                return TritonOutput(images=images, seed=int(result.as_numpy("SEED")[0]), info=info,
                                    images_float=result.as_numpy("IMAGES_FLOAT") if want_float else None)
            raise TritonGenerationFailed(f"{model}: the stream ended without a final response")
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except TritonRequestError:
            raise
        except Exception as exc:  # grpc errors surface as InferenceServerException / AioRpcError
            raise _classify(str(exc)) from exc
        finally:
            done.set()

    async def ready(self) -> dict[str, bool]:
        status = {"server": False}
        try:
            client = self._grpc()
            status["server"] = bool(await client.is_server_ready())
            for slug, model in self.models.items():
                status[slug] = status["server"] and bool(await client.is_model_ready(model))
        except Exception as exc:
            logger.warning("Triton readiness check failed: %s", exc)
            status.update({slug: False for slug in self.models})
            status["server"] = False
        return status

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
