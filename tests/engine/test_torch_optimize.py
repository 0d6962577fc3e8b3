"""The optimised torch runtime computes what eager torch computes, and says what it could not apply.

CUDA graphs, fp16/bf16 and the GPU timings need a GPU session (``benchmarks/gpu/``); on this CPU
the fused projections, channels-last and inductor compilation run for real.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from diffserve.engine.catalog import validate
from diffserve.engine.pipelines import run
from diffserve.engine.models.omni_zero.tiny import synthetic_portrait
from diffserve.engine.torch_optimize import PRESETS, TorchOptimizations
from tests.devices import torch_components

TOL = 1e-4
# Fusion and NHWC only reorder fp32 sums (oneDNN picks its conv algorithm per run), and the
# sampler amplifies the reordering: 20 steps at CFG 5 (SD1.5), 1024² at CFG 9 (Vega), two
# ControlNets on 1024² conditions and the SDE sampler (Omni-Zero). Stated tolerances per slug:
SLUG_TOL = {"sd1.5-scifi": 2e-4, "segmind-vega": 1e-3, "omni-zero": 1e-3, "ominicontrol": 1e-4}


def _image() -> np.ndarray:
    y, x = np.mgrid[0:512, 0:512]
    return np.stack([x // 2, y // 2, (x + y) // 4], axis=-1).astype(np.uint8)


PAYLOADS = {
    "sd1.5-scifi": {"prompt": "futuristic city", "negative_prompt": "blurry", "scheduler": "dpmpp_2m",
                    "guidance_scale": 5, "num_inference_steps": 20, "seed": 5, "img_width": 512, "img_height": 512},
    "segmind-vega": {"prompt": "portrait", "scheduler": "UniPC", "num_inference_steps": 20, "guidance_scale": 9,
                     "seed": 7},
    "omni-zero": {"prompt": "A person", "seed": 42, "number_of_steps": 4, "guidance_scale": 3,
                  "base_image": "<tensor>", "style_image": "<tensor>", "identity_image": "<tensor>",
                  "composition_image": "<tensor>", "base_image_strength": 0.15},
    "ominicontrol": {"image": "<tensor>", "prompt": "a sofa in a living room", "steps": 4, "seed": 12467},
}


def _params(slug: str) -> dict:
    params = validate(slug, PAYLOADS[slug])
    if slug == "omni-zero":
        params.update(identity_image=synthetic_portrait(96, 128), style_image=synthetic_portrait(128, 128, shade=40),
                      base_image=synthetic_portrait(96, 128, shade=-20),
                      composition_image=synthetic_portrait(128, 96, shade=20))
    elif "image" in params:
        params["image"] = _image()
    return params


def test_spec_strings_parse_presets_and_round_trip():
    fast = TorchOptimizations.parse("fast")
    assert fast.fuse_qkv and fast.channels_last and fast.cuda_graphs and fast.compile == "default"
    assert TorchOptimizations.parse(fast.spec()) == fast
    assert TorchOptimizations.parse("max").compile == "max-autotune"
    assert TorchOptimizations.parse("cuda_graphs").compile == "default"  # graphs replay a compiled step
    custom = TorchOptimizations.parse("fuse_qkv, compile=max-autotune-no-cudagraphs, components=unet, vae=bf16, "
                                      "sizes=512x768+768x512")
    assert custom.components == ("unet",) and custom.vae_precision == "bf16" and not custom.channels_last
    assert custom.warmup_sizes == ((512, 768), (768, 512))
    assert TorchOptimizations.parse(custom.spec()) == custom
    assert TorchOptimizations.parse(None).spec() == "none" and not TorchOptimizations.parse("none").enabled
    assert set(PRESETS) == {"none", "fast", "max"}
    for bad in ("turbo", "compile=fastest", "vae=fp8", "sizes=512", "sizes=0x512"):
        with pytest.raises(ValueError, match="unknown"):
            TorchOptimizations.parse(bad)


@pytest.mark.parametrize("slug", ["sd1.5-scifi", "segmind-vega", "omni-zero", "ominicontrol"])
def test_fused_projections_and_channels_last_match_eager(slug, tiny_checkpoints):
    eager = torch_components(tiny_checkpoints[slug])
    fast = torch_components(tiny_checkpoints[slug], optimizations="fuse_qkv,channels_last")
    denoiser = {"ominicontrol": "transformer", "omni-zero": "controlnet_unet"}.get(slug, "unet")
    applied = fast.optimization_report.applied[denoiser]
    assert applied[0].startswith("fuse_qkv (") and (denoiser == "transformer") != ("channels_last" in applied)
    if slug == "omni-zero":  # the IP-Adapter cross-attentions keep their own projections
        assert "kept separate" in applied[0]
    reference = run(slug, _params(slug), eager)
    out = run(slug, _params(slug), fast)
    assert out.images.shape == reference.images.shape
    assert np.abs(out.images - reference.images).max() <= SLUG_TOL[slug]


def test_compiled_components_are_warmed_up_at_load_and_match_eager(sd15_dir, diffserve_home, caplog):
    import torch._dynamo.utils as dynamo_utils

    caplog.set_level(logging.WARNING, logger="diffserve.engine.torch_optimize")
    # device="cpu": on a CPU device the CUDA graphs are dropped with a log line (asserted below).
    eager = torch_components(sd15_dir, device="cpu")
    # The VAE decoder: the smallest compile of the pipeline's networks (CPU inductor compiles C++).
    spec = "fuse_qkv,channels_last,compile,cuda_graphs,components=vae_decoder,sizes=512x768"
    compiled = torch_components(sd15_dir, device="cpu", optimizations=spec)
    report = compiled.optimization_report
    # A CPU device has no CUDA graphs: they are dropped with a log line, the compile stays.
    assert any("CUDA graphs need a CUDA device" in r.getMessage() for r in caplog.records)
    assert report.fallbacks and report.applied["vae_decoder"] == ["channels_last", "compile=default"]
    assert report.applied["unet"] == ["fuse_qkv (8 attentions)", "channels_last"]
    assert set(report.warmup_seconds) == {"vae_decoder"}
    # The warm-up compiled the slug's default shape and the size asked for: requests compile nothing.
    graphs_after_load = dynamo_utils.counters["stats"]["unique_graphs"]
    params = _params("sd1.5-scifi")
    out = run("sd1.5-scifi", dict(params), compiled)
    tall = run("sd1.5-scifi", dict(params, img_height=768, num_inference_steps=20), compiled)
    assert tall.images.shape[1:3] == (768, 512)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs_after_load
    reference = run("sd1.5-scifi", dict(params), eager)
    assert np.abs(out.images - reference.images).max() <= SLUG_TOL["sd1.5-scifi"]
    # Compiled kernels are cached on disk for the next process.
    cache = diffserve_home / "torch-compile-cache"
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*"))


def test_missing_compiler_falls_back_to_eager_with_a_log_line(sd15_dir, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="diffserve.engine.torch_optimize")
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr("shutil.which", lambda name: None)
    components = torch_components(sd15_dir, optimizations="compile")
    assert any("needs a C++ compiler" in r.getMessage() and "running eager" in r.getMessage() for r in caplog.records)
    assert components.optimization_report.warmup_seconds == {}
    assert all("compile" not in step for steps in components.optimization_report.applied.values() for step in steps)


def test_vae_precision_is_its_own_setting(sd15_dir):
    components = torch_components(sd15_dir, optimizations="vae=bf16")
    assert components.dtype == torch.float32 and components.vae_dtype == torch.bfloat16
    assert components.modules["vae_decoder"].vae.dtype == torch.bfloat16
    out = run("sd1.5-scifi", _params("sd1.5-scifi") | {"num_inference_steps": 20}, components)
    reference = run("sd1.5-scifi", _params("sd1.5-scifi"), torch_components(sd15_dir))
    assert 0 < np.abs(out.images - reference.images).max() <= 0.05  # bf16 decode: close, not equal


def test_local_backend_compiles_at_start_not_on_a_request(sd15_dir):
    import asyncio
    import time

    import torch._dynamo.utils as dynamo_utils

    from diffserve.api.backend_local import EngineBackend

    backend = EngineBackend({"sd1.5-scifi": sd15_dir, "sd1.5-img2img": sd15_dir},
                            optimizations="fuse_qkv,channels_last,compile,components=vae_decoder")

    async def scenario():
        status = await backend.ready()
        assert status["sd1.5-scifi"] is False and status["sd1.5-img2img"] is False  # still compiling
        deadline = time.monotonic() + 900
        while not all((await backend.ready()).values()):
            assert time.monotonic() < deadline, "the preload never finished"
            await asyncio.sleep(0.2)
        (runner,) = backend._runners.values()  # one load for the two slugs sharing it
        components = runner.components
        assert set(components.optimization_report.warmup_seconds) == {"vae_decoder"}
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        result = await backend.generate("sd1.5-scifi", _params("sd1.5-scifi"), request_id="compiled")
        assert len(result.images) == 1
        assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
        await backend.close()

    asyncio.run(scenario())
