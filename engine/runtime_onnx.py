"""ONNX Runtime implementation of ``Components``, from the artifacts ``diffserve export`` writes.

Used by the fused Triton pipeline models, by the ORT component models, and by the export
checks. Inputs and outputs are bound by the descriptor names; fp16 models receive fp16
inputs and return float32 to the pipeline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from engine.components import NamedTensorComponents

logger = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class OnnxSession:
    """One ONNX Runtime session with named numpy inputs and outputs."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads or os.environ.get("DIFFSERVE_ORT_THREADS"):
            options.intra_op_num_threads = int(threads or os.environ["DIFFSERVE_ORT_THREADS"])
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        self.input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(inputs[name], dtype=dtype) for name, dtype in self.input_types.items()
                if name in inputs}
        missing = set(self.input_types) - set(feed)
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {sorted(missing)}")
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))


class OnnxComponents(NamedTensorComponents):
    """``Components`` whose networks are ONNX Runtime sessions."""

    def __init__(self, checkpoint: str | Path, artifacts: dict[str, str | Path],
                 providers: list[str] | None = None):
        super().__init__(checkpoint, "cpu")
        self.sessions = {name: OnnxSession(path, providers) for name, path in artifacts.items()}
        logger.info("ONNX Runtime components for %s: %s", self.checkpoint, ", ".join(self.sessions))

    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if component not in self.sessions:
            raise KeyError(f"no ONNX artifact for {component!r}; exported: {', '.join(self.sessions)}")
        out = self.sessions[component].run({k: v.cpu().numpy() for k, v in inputs.items() if v is not None})
        return {k: torch.from_numpy(v.astype(np.float32, copy=False)) for k, v in out.items()}
