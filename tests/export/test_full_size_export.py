"""A full-size network through the exporter: the SD1.5 UNet (859.5M parameters, random weights).

The tiny models exercise every code path of the export; only a full-size network shows that a model
over protobuf's 2 GB limit is written with its weights once, in one external data file next to a small
graph, and that ONNX Runtime computes the same denoising step as torch at the real shapes.
"""

from __future__ import annotations

import pytest

from diffserve.benchmarks.full_size import build_module, count_parameters, write_skeleton_checkpoint
from diffserve.engine.checkpoint import read_architecture
from diffserve.engine.descriptors import component_descriptors
from diffserve.engine.runtime_torch import UNetModule
from diffserve.export.onnx_export import PARITY_TOLERANCE, export_component

pytestmark = pytest.mark.slow


def test_full_size_sd15_unet_exports_once_and_one_onnx_step_matches_torch(tmp_path):
    checkpoint = write_skeleton_checkpoint("sd1.5-scifi", tmp_path / "checkpoint")
    desc = component_descriptors(read_architecture(checkpoint))["unet"]
    # A loader: the exporter owns the module and frees it before its ONNX Runtime session opens.
    result = export_component(lambda: UNetModule(build_module("sd15_unet", "cpu")), desc, checkpoint,
                              tmp_path / "onnx")
    assert not result.skipped
    # The parity check ran one UNet step (batch 1, 512x512, the profile's minimum) in both runtimes;
    # export_component raises ExportError above the tolerance or on NaN, this states the bound here too.
    assert result.max_abs_diff is not None and 0 <= result.max_abs_diff <= PARITY_TOLERANCE["fp32"]
    files = {f.name: f.stat().st_size for f in result.path.parent.iterdir()}
    weights = count_parameters("sd15_unet") * 4
    assert weights == pytest.approx(859.5e6 * 4, rel=1e-3)
    assert files[result.path.name] < 20 << 20  # the graph alone
    data = [size for name, size in files.items() if name.endswith(".data")]
    assert len(data) == 1 and data[0] == pytest.approx(weights, rel=0.01)  # the weights, written once
