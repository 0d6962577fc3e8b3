"""ONNX export: components match torch, artifacts are cached by a pure path, TensorRT absence is explicit."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffserve.engine.catalog import get_model
from diffserve.engine.checkpoint import read_architecture
from diffserve.engine.descriptors import component_descriptors, needed_components
from diffserve.engine.ort_session import OrtSession, session_providers
from diffserve.engine.runtime_onnx import OnnxComponents
from diffserve.engine.runtime_torch import load_component_modules
from diffserve.export.onnx_export import (
    ExportError, _finalize_onnx, artifact_path, build_tensorrt_engine, check_parity, export_component, onnx_toolkit,
    tensorrt_fingerprint,
)
from tests.devices import torch_components


@pytest.fixture(scope="module")
def sd15_exports(tmp_path_factory, sd15_dir):
    out = tmp_path_factory.mktemp("onnx-sd15")
    config = read_architecture(sd15_dir)
    descs = component_descriptors(config)
    modules = load_component_modules(sd15_dir)
    results = {name: export_component(modules[name], descs[name], sd15_dir, out)
               for name in needed_components(config, [get_model("sd1.5-img2img")])}
    return out, descs, modules, results


def test_every_component_matches_torch_fp32(sd15_exports):
    _, _, _, results = sd15_exports
    assert set(results) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    for name, r in results.items():
        assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-4, (name, r.max_abs_diff)


def test_artifact_path_is_a_pure_function_and_reexport_skips(sd15_exports, sd15_dir):
    out, descs, modules, results = sd15_exports
    assert results["unet"].path == artifact_path(out, "unet", "fp32", onnx_toolkit())
    again = export_component(modules["unet"], descs["unet"], sd15_dir, out)
    assert again.skipped and again.path == results["unet"].path


def test_onnx_runtime_pipeline_equals_torch_pipeline(sd15_exports, sd15_dir):
    from diffserve.engine.models.sd import txt2img

    _, _, _, results = sd15_exports
    onnx = OnnxComponents(sd15_dir, {name: r.path for name, r in results.items()})
    components = torch_components(sd15_dir, device="cpu")
    kw = dict(prompt="a city", width=64, height=96, num_inference_steps=4, num_images=2, seed=3, scheduler="Euler a")
    a = txt2img.generate(onnx, **kw).images
    b = txt2img.generate(components, **kw).images
    assert abs(a - b).max() <= 1e-4


def test_fp16_export_runs_within_half_precision_tolerance(tmp_path, sd15_dir):
    config = read_architecture(sd15_dir)
    desc = component_descriptors(config)["unet"]
    module = load_component_modules(sd15_dir, components=["unet"])["unet"]
    result = export_component(module, desc, sd15_dir, tmp_path, "fp16")
    assert "fp16" in str(result.path)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 2e-2


def test_unknown_precision_is_rejected(tmp_path, sd15_dir):
    desc = component_descriptors(read_architecture(sd15_dir))["unet"]
    with pytest.raises(ExportError, match="precision"):
        export_component(None, desc, sd15_dir, tmp_path, "int4")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a CUDA device are here: there is nothing unavailable to report")
def test_tensorrt_unavailable_is_said_clearly(tmp_path, sd15_exports):
    _, descs, _, results = sd15_exports
    with pytest.raises(ExportError, match="TensorRT is unavailable"):
        build_tensorrt_engine(results["unet"].path, descs["unet"], tmp_path, "fp16")


def test_profiles_cover_every_catalog_resolution_and_batch(sd15_dir):
    config = read_architecture(sd15_dir)
    descs = component_descriptors(config, [get_model("sd1.5-scifi"), get_model("sd1.5-img2img")])
    unet = descs["unet"]
    assert unet.profile["batch"] == (1, 2, 8)  # 4 samples x CFG
    assert unet.profile["latent_height"][0] == 64 and unet.profile["latent_height"][2] == 128
    assert descs["vae_decoder"].profile["image_width"] == (512, 512, 1024)


def test_export_components_reuses_the_cached_artifacts_and_logs_one_line(sd15_exports, sd15_dir, caplog):
    import logging

    from diffserve.engine.descriptors import family_specs
    from diffserve.export.repository import export_components

    out, _, modules, results = sd15_exports
    caplog.set_level(logging.DEBUG, logger="diffserve.export")
    specs = family_specs(read_architecture(sd15_dir))  # what the fixture's descriptors were made for
    exported = export_components(sd15_dir, specs, lambda _component: out, "fp32", modules=modules,
                                 label="sd1.5-img2img")
    assert {name: e.artifact for name, e in exported.items()} == {name: r.path for name, r in results.items()}
    assert all(e.onnx.skipped for e in exported.values())
    progress = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert progress == [f"export sd1.5-img2img: {len(results)} components (cached)"]


class _Overflowing(torch.nn.Module):
    """A VAE decoder whose output overflows, as the SDXL VAE does in fp16."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, latents):
        image = self.inner(latents)
        return image * torch.finfo(image.dtype).max * 4 - image * torch.finfo(image.dtype).max * 4


def test_a_parity_check_that_is_not_finite_fails_the_export_naming_the_component(tmp_path, sd15_exports, sd15_dir):
    _, descs, modules, _ = sd15_exports
    with pytest.raises(ExportError, match="vae_decoder: the fp32 export's parity check is not finite"):
        export_component(_Overflowing(modules["vae_decoder"]), descs["vae_decoder"], sd15_dir, tmp_path)
    assert not (artifact_path(tmp_path, "vae_decoder", "fp32", onnx_toolkit()).with_suffix(".json")).exists()


def test_a_parity_gap_beyond_the_tolerance_fails():
    check_parity("unet", "fp16", 0.04)  # within fp16's 5e-2
    check_parity("unet", "fp32", 0.02, scale=10.0)  # relative to the output's size
    with pytest.raises(ExportError, match="unet: the fp32 export differs from torch by 0.1"):
        check_parity("unet", "fp32", 0.1)


def test_tensorrt_fingerprint_changes_with_the_weights(tmp_path, sd15_exports, sd15_dir):
    _, descs, modules, _ = sd15_exports
    tuned = copy.deepcopy(modules["vae_decoder"])
    first = export_component(tuned, descs["vae_decoder"], sd15_dir, tmp_path)
    before = tensorrt_fingerprint(first.path, descs["vae_decoder"], "fp32")
    assert tensorrt_fingerprint(first.path, descs["vae_decoder"], "fp32") == before
    with torch.no_grad():  # a fine-tune: same architecture, same checkpoint layout, other weights
        next(tuned.parameters()).add_(0.01)
    again = export_component(tuned, descs["vae_decoder"], sd15_dir, tmp_path, force=True)
    assert again.path == first.path
    assert tensorrt_fingerprint(again.path, descs["vae_decoder"], "fp32") != before
    assert tensorrt_fingerprint(again.path, descs["vae_decoder"], "fp16") != \
        tensorrt_fingerprint(again.path, descs["vae_decoder"], "fp32")


def test_external_data_is_gathered_into_one_file_without_loading_the_weights(tmp_path, sd15_exports):
    import onnx

    _, _, _, results = sd15_exports
    model = onnx.load(str(results["vae_decoder"].path))
    work = tmp_path / "artifact"
    work.mkdir()
    tmp = work / "model.tmp.onnx"  # as the tracer writes a >2 GB model: one file per tensor
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(work.iterdir())) > 3
    _finalize_onnx(tmp, work / "model.onnx")
    assert sorted(f.name for f in work.iterdir()) == ["model.onnx", "model.onnx.data"]
    session, reference = OrtSession(work / "model.onnx"), OrtSession(results["vae_decoder"].path)
    latents = {"latents": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert np.array_equal(session.run(latents)["image"], reference.run(latents)["image"])


def test_cuda_without_its_execution_provider_is_an_error(sd15_exports):
    with pytest.raises(RuntimeError, match=r"no CUDAExecutionProvider.*diffserve\[gpu\]"):
        session_providers("cuda", ["CPUExecutionProvider"])
    assert session_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == \
        ("CUDAExecutionProvider", {"device_id": 1})
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        _, _, _, results = sd15_exports
        with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
            OrtSession(results["unet"].path, device="cuda")


def test_ort_session_imports_no_torch():
    """The ONNX Runtime component stubs open sessions through ``diffserve.engine.ort_session`` and read ``diffserve.engine.options``:
    both stay free of torch, so those stubs start without it."""
    code = "import sys, diffserve.engine.options, diffserve.engine.ort_session; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_export_components_loads_one_network_at_a_time_frees_it_before_parity_and_nothing_when_cached(
        sd15_dir, tmp_path, monkeypatch):
    """A full-size export holds one copy of one network's weights at a time: each module is loaded just
    before its export and released once the parity check has its torch outputs, before the ONNX Runtime
    session (a second copy) opens; an up-to-date repository loads nothing."""
    import gc
    import weakref

    from diffserve.engine import runtime_torch
    from diffserve.engine.ort_session import OrtSession as RealSession
    from diffserve.export import onnx_export
    from diffserve.export.repository import export_components

    loaded: list[tuple[list[str], weakref.ref]] = []
    real_load = runtime_torch.load_component_modules

    def load(checkpoint, dtype, components=None, **kw):
        modules = real_load(checkpoint, dtype, components=components, **kw)
        loaded.extend((list(modules), weakref.ref(m)) for m in modules.values())
        return modules

    alive_at_session: list[list[str]] = []

    def session(path, *args, **kwargs):
        gc.collect()
        alive_at_session.append([names[0] for names, ref in loaded if ref() is not None])
        return RealSession(path, *args, **kwargs)

    monkeypatch.setattr(runtime_torch, "load_component_modules", load)
    monkeypatch.setattr("diffserve.engine.ort_session.OrtSession", session)
    spec = [get_model("sd1.5-scifi")]
    out = export_components(sd15_dir, spec, lambda c: tmp_path / c, "fp32")
    assert [names for names, _ in loaded] == [["text_encoder"], ["unet"], ["vae_decoder"]]  # one at a time
    assert alive_at_session == [[], [], []]  # each module freed before its parity session opened
    assert all(e.onnx.max_abs_diff is not None and e.onnx.max_abs_diff <= 1e-4 for e in out.values())
    loaded.clear()
    again = export_components(sd15_dir, spec, lambda c: tmp_path / c, "fp32")
    assert loaded == [] and all(e.onnx.skipped for e in again.values())  # cached: nothing loaded
    assert onnx_export.current_export(component_descriptors(read_architecture(sd15_dir))["unet"], sd15_dir,
                                      tmp_path / "unet", "fp32").path == again["unet"].onnx.path
