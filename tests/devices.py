"""The device the engine tests compute on: ``pytest --device cpu`` (the default) or ``--device cuda``.

The engine picks CUDA (in fp16) by itself when it sees a GPU; the tests choose the device
explicitly instead, in fp32, so that the equality tests hold on a GPU host as on this CPU and a
GPU host can run them on either device. Tests whose assertions are what a CPU run reports
(TensorRT skipped, CUDA graphs dropped, ONNX Runtime on its CPU provider) pass ``device="cpu"``.
"""

from __future__ import annotations

from pathlib import Path

DEVICE = "cpu"  # set from --device by tests/conftest.py


def torch_components(checkpoint: str | Path, **kwargs):
    """``TorchComponents`` on the session's device, fp32 unless the test asks otherwise."""
    from diffserve.engine.runtime_torch import TorchComponents

    kwargs.setdefault("device", DEVICE)
    kwargs.setdefault("precision", "fp32")
    return TorchComponents(checkpoint, **kwargs)
