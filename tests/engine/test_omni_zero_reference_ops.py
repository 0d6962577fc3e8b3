"""Omni-Zero's depth map and scheduler start vs the reference's operations, written independently here.

Depth: controlnet_aux ``ZoeDetector.__call__`` (``resize_image``, ``ZoeDepth.infer`` with padding and
flip, percentiles 2/85, ``1 - d``, ``cv2.resize`` INTER_LINEAR) on the tiny ZoeDepth; at most one
grey level apart. Scheduler: okaris/omni-zero's pipeline sets timesteps/sigmas without a begin
index, so diffusers' ``index_for_timestep`` starts at index 0 — or, when the first timestep is
repeated (high base_image_strength, few steps), at index 1, where its last step indexes past the
sigmas and raises; ``set_begin_index(0)`` equals it wherever it runs.
"""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from diffserve.engine.models.omni_zero import pipeline as omni_zero
from diffserve.engine.models.omni_zero.tiny import build_tiny_omni_zero, synthetic_portrait
from tests.devices import torch_components


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return torch_components(build_tiny_omni_zero(tmp_path_factory.mktemp("oz")))


def _reference_depth(model, image: np.ndarray, resolution: int, processor) -> np.ndarray:
    h, w = image.shape[:2]
    k = float(resolution) / min(h, w)
    H, W = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    img = cv2.resize(image, (W, H), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)
    x = torch.from_numpy(img).float() / 255.0
    x = x.permute(2, 0, 1)[None]

    def infer_pad(x):
        ph, pw = int(np.sqrt(x.shape[2] / 2) * 3), int(np.sqrt(x.shape[3] / 2) * 3)
        xp = F.pad(x, [pw, pw, ph, ph], mode="reflect")
        th, tw = processor["size"]["height"], processor["size"]["width"]
        sh, sw = th / xp.shape[2], tw / xp.shape[3]
        s = sw if abs(1 - sw) < abs(1 - sh) else sh  # "minimal": the scale closest to 1
        nh, nw = int(np.round(xp.shape[2] * s / 32) * 32), int(np.round(xp.shape[3] * s / 32) * 32)
        net = F.interpolate(xp, (nh, nw), mode="bilinear", align_corners=True)
        out = model((net - 0.5) / 0.5)[:, None]
        out = F.interpolate(out, size=xp.shape[2:], mode="bicubic", align_corners=False)
        return out[:, :, ph:-ph, pw:-pw]

    with torch.no_grad():
        d = (infer_pad(x) + torch.flip(infer_pad(torch.flip(x, dims=[3])), dims=[3])) / 2
    d = d[0, 0].numpy()
    vmin, vmax = np.percentile(d, 2), np.percentile(d, 85)
    d -= vmin  # in place on the float32 map, as ZoeDetector
    d /= vmax - vmin
    d = 1.0 - d
    gray = (d * 255.0).clip(0, 255).astype(np.uint8)
    return cv2.resize(np.stack([gray] * 3, axis=-1), (w, h), interpolation=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def depth_components(components):
    """The tiny ZoeDepth with its metric head's weights scaled by 10, so its depth varies.

    As built, the tiny estimator's depth spans ~3e-5 (p2..p85) around 0.727, where one float32
    ulp is already ~0.6 grey levels after the percentile stretch: a batch of two and two single
    passes (the same maths) differ by 2-3 ulps, i.e. 2 grey levels, and no comparison at one grey
    level could pass or mean anything. Scaled, the span is ~4e-2 of ~0.8, like a real depth map.
    """
    net = components.modules["depth_estimator"].model
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith("metric_head.") and name.endswith("weight") and param.ndim > 1:
                param.mul_(10.0)
    return components


@pytest.mark.parametrize("size, resolution", [((96, 128), 128), ((128, 96), 64), ((80, 80), 128)])
def test_depth_map_matches_zoe_detector_within_one_grey_level(depth_components, size, resolution):
    components = depth_components
    image = synthetic_portrait(*size, shade=-20)
    ours = np.asarray(omni_zero.estimate_depth(components, PIL.Image.fromarray(image), resolution))
    ref = _reference_depth(components.depth_estimator, image, resolution, components.config.omni_zero.depth_processor)
    assert ours.shape == ref.shape
    assert ref.max() - ref.min() > 100  # a map with depth in it, not a flat one
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def _reference_start(components, steps: int, strength: float):
    """The reference's schedule, then diffusers' own start index without set_begin_index."""
    sched = omni_zero.make_scheduler(components.config.scheduler_config)
    full = int(steps / strength) if strength > 0 else steps
    sched.set_timesteps(full + 1)
    xs = np.linspace(0, 1, len(omni_zero.AYS_SDXL_SIGMAS))
    ys = np.log(np.asarray(omni_zero.AYS_SDXL_SIGMAS)[::-1])
    sigmas = np.exp(np.interp(np.linspace(0, 1, full + 1), xs, ys))[::-1].copy()
    sigmas[-1] = 0
    log_sigmas = np.log(np.array((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5)
    ts = np.array([sched._sigma_to_t(s, log_sigmas) for s in sigmas]).round()[-(steps + 1):-1]
    sched.sigmas = torch.from_numpy(sigmas)[-(steps + 1):]
    sched.timesteps = torch.from_numpy(ts).to(torch.int64)
    return sched.index_for_timestep(sched.timesteps[0]), sched


@pytest.mark.parametrize("steps", [2, 4, 10])
@pytest.mark.parametrize("base_strength", [0.15, 0.6, 0.97, 0.99])
def test_scheduler_start_index_matches_the_reference_wherever_it_runs(components, steps, base_strength):
    start, reference = _reference_start(components, steps, 1 - base_strength)
    ours = omni_zero.make_scheduler(components.config.scheduler_config)
    timesteps, sigmas = omni_zero.set_timesteps(ours, steps, 1 - base_strength)
    assert torch.equal(timesteps, reference.timesteps)
    assert torch.allclose(sigmas, reference.sigmas.to(sigmas.dtype), rtol=1e-6, atol=0)
    if start == 0:
        return
    # The first timestep repeats: the reference starts at 1 and its last step reads sigmas[steps + 1].
    assert reference.timesteps[0] == reference.timesteps[1]
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(IndexError):
        for t in reference.timesteps:
            x = reference.step(torch.zeros_like(x), t, x, variance_noise=torch.zeros_like(x), return_dict=False)[0]
