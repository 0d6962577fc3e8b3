"""The GPU plan's engine checks as tests, for a host with a CUDA device (`pytest -m gpu`).

Skipped where torch sees no CUDA device (tests/conftest.py). They run the tiny checkpoints, so
they check correctness at the GPU's precisions, not speed (the plan's figures come from
`benchmarks/gpu/run.sh`): an fp16 (bf16 for FLUX) image is finite and not uniform — what a NaN
VAE (black images) or a dead pipeline fails —; the SDXL VAE runs in fp32 where its config forces
the upcast; one denoiser step of the fast path (fused projections, channels-last, compile, CUDA
graphs) equals eager at the same precision on two different inputs, within the relative L2 the
plan states, and follows its inputs (a stale CUDA-graph replay fails); and the request's image at
fp16 on the GPU stays near the fp32 image computed on the CPU.

The rest of the engine suite runs on the GPU in fp32 with `pytest --device cuda tests/engine`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffserve.benchmarks.engine_bench import denoiser_check, denoiser_probe, image_check
from diffserve.engine.pipelines import run
from tests.devices import torch_components
from tests.engine.test_torch_optimize import _params

pytestmark = pytest.mark.gpu

SD_SLUGS = ("sd1.5-scifi", "segmind-vega")
FAST = "fuse_qkv,channels_last,compile,cuda_graphs,components=unet"
# fp16 against fp32 on the tiny models: the images stay close (0..1 pixel scale).
FP16_VS_FP32_MAX = 0.1


@pytest.fixture(scope="module")
def fp16(tiny_checkpoints):
    return {slug: torch_components(tiny_checkpoints[slug], device="cuda", precision="fp16") for slug in SD_SLUGS}


@pytest.mark.parametrize("slug", SD_SLUGS)
def test_fp16_image_is_finite_and_not_uniform(fp16, slug):
    images = run(slug, _params(slug), fp16[slug]).images
    check = image_check(images)
    assert check["ok"], check


def test_sdxl_vae_runs_in_fp32_where_its_config_forces_upcast(fp16):
    vega = fp16["segmind-vega"]
    assert vega.modules["vae_decoder"].vae.config.force_upcast and vega.vae_dtype == torch.float32
    assert vega.dtype == torch.float16  # only the VAE is upcast


@pytest.mark.parametrize("slug", SD_SLUGS)
def test_fast_denoiser_step_matches_eager_at_fp16(fp16, tiny_checkpoints, slug):
    fast = torch_components(tiny_checkpoints[slug], device="cuda", precision="fp16", optimizations=FAST)
    params = _params(slug)
    check = denoiser_check(denoiser_probe(fast, params), denoiser_probe(fp16[slug], params))
    assert check["ok"], check


@pytest.mark.parametrize("slug", SD_SLUGS)
def test_fp16_image_stays_near_the_fp32_cpu_image(fp16, tiny_checkpoints, slug):
    reference = run(slug, _params(slug), torch_components(tiny_checkpoints[slug], device="cpu")).images
    images = run(slug, _params(slug), fp16[slug]).images
    diff = float(np.abs(np.asarray(images, np.float64) - np.asarray(reference, np.float64)).max())
    assert diff <= FP16_VS_FP32_MAX, diff


def test_flux_bf16_image_is_finite_and_not_uniform(tiny_checkpoints):
    flux = torch_components(tiny_checkpoints["ominicontrol"], device="cuda", precision="bf16")
    check = image_check(run("ominicontrol", _params("ominicontrol"), flux).images)
    assert check["ok"], check
