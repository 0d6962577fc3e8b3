"""ONNX Runtime implementation of ``Components``, from the artifacts ``diffserve export`` writes.

Used by the fused Triton pipeline models, the engine benchmarks and the export checks; the Triton
component models that run ONNX Runtime skip this module and call ``diffserve.engine.ort_session`` directly,
which stays free of torch (this module adapts its numpy sessions to torch tensors). Inputs and
outputs are bound by the descriptor names; fp16 models receive fp16 inputs and return float32 to
the pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffserve.engine.components import NamedTensorComponents
from diffserve.engine.ort_session import OrtSession
from diffserve.engine.options import EngineOptions

logger = logging.getLogger(__name__)


class OnnxComponents(NamedTensorComponents):
    """``Components`` whose networks are ONNX Runtime sessions."""

    def __init__(self, checkpoint: str | Path, artifacts: dict[str, str | Path],
                 providers: list[str] | None = None, options: EngineOptions | None = None):
        super().__init__(checkpoint, "cpu")
        options = options or EngineOptions()
        self.condition_mode = options.ominicontrol_condition
        self.sessions = {name: OrtSession(path, providers, options.ort_threads, device=options.device,
                                          arena=options.ort_arena) for name, path in artifacts.items()}
        logger.info("ONNX Runtime components for %s: %s", self.checkpoint, ", ".join(self.sessions))

    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if component not in self.sessions:
            raise KeyError(f"no ONNX artifact for {component!r}; exported: {', '.join(self.sessions)}")
        out = self.sessions[component].run({k: v.cpu().numpy() for k, v in inputs.items() if v is not None})
        return {k: torch.from_numpy(v.astype(np.float32, copy=False)) for k, v in out.items()}
