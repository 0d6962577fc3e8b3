"""TensorRT implementation of ``Components``, from the ``.plan`` engines ``diffserve export`` builds.

Buffers are torch CUDA tensors bound by the descriptor names; shapes are set per call inside
the engine's min/opt/max profile. Importing this module needs neither TensorRT nor a GPU;
constructing a session does, and says so clearly when either is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffserve.engine.components import NamedTensorComponents

logger = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    pass


class TrtSession:
    """One deserialised TensorRT engine with named inputs and outputs."""

    def __init__(self, path: str | Path, device: str = "cuda"):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise TensorRTUnavailable("the `tensorrt` package is not installed") from exc
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("TensorRT needs a CUDA GPU and none is visible")
        self.trt = trt
        self.path = Path(path)
        self.device = torch.device(device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialise TensorRT engine {self.path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(self.device)

    def _torch_dtype(self, dt) -> torch.dtype:
        trt = self.trt
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32}[dt]

    def run_torch(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = []
        for name in self.inputs:
            t = torch.as_tensor(feeds[name]).to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs:
            buf = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, buf.data_ptr())
            out[name] = buf
        # Stream-ordered, no host synchronisation: the engine waits for the work that produced its
        # inputs on the caller's stream, and the caller's later work waits for the engine. The
        # caching allocator must not hand these buffers to anyone before the engine is done.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.path.name}")
        current.wait_stream(self.stream)
        for t in (*keep, *out.values()):
            t.record_stream(self.stream)
        return {k: v.float() for k, v in out.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.run_torch({k: torch.from_numpy(np.asarray(v))
                                                               for k, v in feeds.items()}).items()}


class TrtComponents(NamedTensorComponents):
    """``Components`` whose networks are TensorRT engines (one plan per component)."""

    def __init__(self, checkpoint: str | Path, plans: dict[str, str | Path], device: str = "cuda"):
        super().__init__(checkpoint, device)
        self.sessions = {name: TrtSession(path, device) for name, path in plans.items()}

    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.sessions[component].run_torch({k: v for k, v in inputs.items() if v is not None})
