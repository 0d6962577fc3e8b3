"""OminiControl step-batched: a request batched with others equals it alone, in both condition modes.

As ``test_batched_pipelines.py`` for the SD slugs: three requests (different seeds, step counts,
sample counts, condition images, lora scales and condition strengths) go through one ``StepBatcher``
over the ``transformer`` together — the test holds the ticks until all three have joined, so they
really share transformer calls — and each one's images must equal its images alone within the
tolerance for reordered fp32 sums (``TOLERANCE``, test_flux.py's; measured: at most 1.9e-6 on this CPU with
torch, 0 with ONNX Runtime). The tiny FLUX
checkpoint at 64x64 with 2-4 steps; the condition image is encoded at 128² instead of 512² (64
condition tokens instead of 1024) to keep the file fast: batching does not depend on its size.
The ONNX Runtime components are checked in ``test_flux.py`` (they reuse its exported models).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from diffserve.engine.batching import BatchingOptions, PipelineRunner, StepBatcher
from diffserve.engine.catalog import validate
from diffserve.engine.models.ominicontrol import pipeline as ominicontrol
from diffserve.engine.pipelines import RunControl, run, step_batched
from tests.devices import torch_components
from tests.engine.batching_harness import DeviceScheduled, run_together

TOLERANCE = 1e-4
"""Max pixel difference batched against alone (fp32; the rows of one call are summed in another order)."""
REQUESTS = (  # seed, steps, samples, lora scale, condition strength, which condition image
    dict(seed=1, num_inference_steps=2, num_images=1, lora_scale=1.0, condition_strength=1.0, image=0),
    dict(seed=2, num_inference_steps=3, num_images=2, lora_scale=0.5, condition_strength=0.5, image=1),
    dict(seed=3, num_inference_steps=4, num_images=1, lora_scale=1.0, condition_strength=0.0, image=2),
)


@pytest.fixture(scope="module")
def components(tiny_checkpoints):
    return torch_components(tiny_checkpoints["ominicontrol"])


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, size=(48 + 8 * i, 40, 3)).astype(np.uint8) for i in range(3)]


@pytest.fixture(autouse=True)
def small_condition(monkeypatch):
    monkeypatch.setattr(ominicontrol, "encode_condition",
                        functools.partial(ominicontrol.encode_condition, size=128))


def _generate(components, request, images, mode, control):
    request = dict(request)
    image = images[request.pop("image")]
    return ominicontrol.generate(components, image=image, prompt=f"a photo {request['seed']}", width=64, height=64,
                                 condition_mode=mode, control=control, **request).images


def _batched(components, images, mode):
    """Every request's images when the three run through one batcher together; and the call sizes."""
    batcher = StepBatcher(components.transformer, BatchingOptions(max_batch=16), start_thread=False)
    calls = [functools.partial(_generate, components, request, images, mode, RunControl(driver=batcher.run))
             for request in REQUESTS]
    return run_together(batcher, calls), batcher.calls


@pytest.mark.parametrize("mode, device_scheduler", [("joint", False), ("joint", True), ("cached", False)])
def test_a_request_batched_with_others_equals_it_alone(components, images, mode, device_scheduler):
    components = DeviceScheduled(components) if device_scheduler else components
    batched, calls = _batched(components, images, mode)
    rows = [r["num_images"] for r in REQUESTS]
    # the three shared the first two transformer calls, then the ones left (3 and 4 steps)
    assert calls == [sum(rows), sum(rows), sum(rows[1:]), rows[2]]
    for i, req in enumerate(REQUESTS):
        alone = _generate(components, req, images, mode, RunControl())
        assert batched[i].shape == alone.shape == (req["num_images"], 64, 64, 3)
        assert float(np.abs(batched[i] - alone).max()) <= TOLERANCE, (mode, i, req)


def test_the_runner_batches_ominicontrol_requests_on_the_transformer(components, images, monkeypatch):
    """Served requests (the catalog's parameters, 4 steps; at 64² rather than 512² to stay fast) through a
    ``PipelineRunner``: one batcher over the ``transformer``; the two requests share its calls and each equals
    its image alone."""
    assert step_batched("ominicontrol")
    monkeypatch.setattr(ominicontrol, "generate", functools.partial(ominicontrol.generate, width=64, height=64))
    options = BatchingOptions(max_batch=8)
    runner = PipelineRunner(components, options)
    assert runner.capacity("ominicontrol") == 8
    batcher = runner.batchers["transformer"] = StepBatcher(components.transformer, options, start_thread=False)
    params = [validate("ominicontrol", {"image": "https://example.invalid/x.png", "prompt": f"a photo {i}",
                                        "steps": 4, "seed": i}) | {"image": images[i]} for i in range(2)]
    try:
        results = run_together(batcher, [functools.partial(runner.run, "ominicontrol", p, RunControl())
                                         for p in params])
    finally:
        runner.close()
    assert set(runner.batchers) == {"transformer"} and batcher.calls == [2, 2, 2, 2]
    for i in range(2):
        assert results[i].batch == {"requests": 2, "rows": 2}
        alone = run("ominicontrol", params[i], components).images
        assert results[i].images.shape == alone.shape == (1, 64, 64, 3)
        assert float(np.abs(results[i].images - alone).max()) <= TOLERANCE
