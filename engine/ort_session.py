"""The torch-free ONNX Runtime session: one ``.onnx`` file, named numpy inputs and outputs.

This module owns opening an ONNX Runtime session (graph optimisation, CPU arena, threads, the
execution providers for a device) and running it on numpy arrays. It is kept apart from
``diffserve.engine.runtime_onnx``, which adapts these sessions to the torch-tensor ``Components`` protocol,
because the Triton component models that run ONNX Runtime import only this module: one python
backend stub process per model instance, and torch imported in each would make every one of them
start slower and hold more memory than the session it serves. Options come from the caller
(``diffserve.engine.options.EngineOptions``: device, arena, threads), never from the environment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class OrtSession:
    """One ONNX Runtime session with named numpy inputs and outputs (no torch)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0, *,
                 device: str = "cpu", arena: bool = False):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("onnxruntime is not installed: pip install 'diffserve[cpu]' (or 'diffserve[gpu]' "
                              "for onnxruntime-gpu, in its place)") from exc

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's CPU arena keeps every session at its high-water mark (2 GB for a 1024² VAE), and
        # a repository runs one process per model: off unless the options turn it on.
        options.enable_cpu_mem_arena = arena
        if threads:
            options.intra_op_num_threads = int(threads)
        wanted = providers or session_providers(device, ort.get_available_providers())
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


def session_providers(device: str, available: list[str]) -> list[str]:
    """ONNX Runtime providers for ``device`` (``cpu``, ``cuda`` or ``cuda:N``); CUDA without ORT's CUDA
    provider is an error rather than a silent CPU run."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(f"device {device} requested but this onnxruntime has no CUDAExecutionProvider "
                           f"(available: {', '.join(available)}); install the GPU build in place of the CPU "
                           "one: pip uninstall -y onnxruntime && pip install 'diffserve[gpu]' "
                           "(or serve with --runtime torch, or --device cpu)")
    index = int(device.partition(":")[2] or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
