"""One ONNX Runtime session with named numpy inputs and outputs.

Kept free of torch so the Triton component models that run ONNX Runtime start light (a python
backend stub per model instance; importing torch in each would cost ~200 MB apiece).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class OnnxSession:
    """One ONNX Runtime session with named numpy inputs and outputs."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's CPU arena keeps every session at its high-water mark (2 GB for a 1024² VAE), and
        # a repository runs one process per model: off by default, DIFFSERVE_ORT_ARENA=1 turns it on.
        options.enable_cpu_mem_arena = os.environ.get("DIFFSERVE_ORT_ARENA", "0") == "1"
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
