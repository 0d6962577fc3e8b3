"""Same image batched or alone: the three SD slugs, every scheduler of the catalog, tiny fp32 models on CPU.

Three requests (different seeds, step counts, guidance scales, sample counts) go through one
``StepBatcher`` together — the test holds the ticks until all three have joined, so they really share
UNet calls — and each one's images must equal its images alone within the README's tolerances for
reordered fp32 sums (SD1.5 2e-4, Vega 1e-3 max pixel difference). The models are the session's tiny
checkpoints at 64x64 with 2-4 steps, so the whole file stays fast.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from diffserve.engine.batching import BatchingOptions, StepBatcher
from diffserve.engine.models.sd import img2img as sd15_img2img, txt2img
from diffserve.engine.pipelines import RunControl
from diffserve.engine.schedulers import SCHEDULER_NAMES
from tests.engine.batching_harness import DeviceScheduled, run_together

TOLERANCE = {"sd1.5-scifi": 2e-4, "sd1.5-img2img": 2e-4, "segmind-vega": 1e-3}
REQUESTS = (  # seed, steps, guidance, samples
    dict(seed=1, num_inference_steps=2, guidance_scale=7.5, num_images=1),
    dict(seed=2, num_inference_steps=3, guidance_scale=3.0, num_images=2),
    dict(seed=3, num_inference_steps=4, guidance_scale=1.0, num_images=1),
)


def _generate(slug, components, request, control, input_image):
    kw = dict(prompt=f"a photo {request['seed']}", width=64, height=64, control=control, **request)
    if slug == "sd1.5-img2img":
        return sd15_img2img.generate(components, image=input_image, strength=0.8, **kw).images
    return txt2img.generate(components, **kw).images


def _batched(slug, components, scheduler, input_image):
    """Every request's images when the three run through one batcher together; and the call sizes."""
    batcher = StepBatcher(components.unet, BatchingOptions(max_batch=16), start_thread=False)
    calls = [functools.partial(_generate, slug, components, dict(request, scheduler=scheduler),
                               RunControl(driver=batcher.run), input_image) for request in REQUESTS]
    return run_together(batcher, calls), batcher.calls


SLUGS = [("sd1.5-scifi", "sd15"), ("sd1.5-img2img", "sd15"), ("segmind-vega", "sdxl")]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("slug, fixture", SLUGS)
def test_a_request_batched_with_others_equals_it_alone(slug, fixture, scheduler, request, input_image):
    components = request.getfixturevalue(fixture)
    batched, calls = _batched(slug, components, scheduler, input_image)
    rows = [r["num_images"] * (2 if r["guidance_scale"] > 1 else 1) for r in REQUESTS]
    assert calls[0] == sum(rows)  # the three really shared the first UNet call
    for i, req in enumerate(REQUESTS):
        alone = _generate(slug, components, dict(req, scheduler=scheduler), RunControl(), input_image)
        assert batched[i].shape == alone.shape
        assert float(np.abs(batched[i] - alone).max()) <= TOLERANCE[slug], (i, req)


@pytest.mark.parametrize("scheduler", ["DPM Multi", "dpmpp_sde_ancestral", "Euler"])
def test_device_scheduled_loops_batch_to_the_same_image(scheduler, sd15, input_image):
    components = DeviceScheduled(sd15)
    batched, _ = _batched("sd1.5-scifi", components, scheduler, input_image)
    for i, req in enumerate(REQUESTS):
        alone = _generate("sd1.5-scifi", components, dict(req, scheduler=scheduler), RunControl(), input_image)
        assert float(np.abs(batched[i] - alone).max()) <= TOLERANCE["sd1.5-scifi"]
