"""Omni-Zero step-batched: a request batched with others equals it alone (tiny fp32 models on CPU).

Three requests (different seeds, step counts 2-4, guidance 3/1/5, 1-2 samples, every strength and the
style image different) run through one ``PipelineRunner`` together — the test holds the batcher's ticks
until all three have joined, so they really share ``controlnet_unet`` calls — and each one's images must
equal its images alone within ``TOLERANCE`` (reordered fp32 sums, as for Vega). Omni-Zero has one
scheduler (its DPM-Solver++ SDE on the Align-Your-Steps schedule), checked stock and as a device plan,
and the same with the denoiser run by ONNX Runtime (its exported graph, batch axis dynamic). Images fit
64 px (``max_side``) so the file stays fast.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from diffserve.engine.batching import BatchingOptions, PipelineRunner, StepBatcher
from diffserve.engine.catalog import validate
from diffserve.engine.models.omni_zero import pipeline as omni_zero
from diffserve.engine.models.omni_zero.tiny import synthetic_portrait
from diffserve.engine.pipelines import RunControl, run, step_batched
from tests.engine.omni_zero_fixtures import components, omni_dir, one_thread  # noqa: F401, F811 - fixtures
from tests.engine.batching_harness import DeviceScheduled, run_together

SLUG = "omni-zero"
SMALL = 64
TOLERANCE = 1e-3
"""Max pixel difference batched against alone (fp32; measured on CPU: see README "Step-level batching")."""
REQUESTS = (  # API parameters besides the images
    dict(seed=1, number_of_steps=2, guidance_scale=3, number_of_images=1, prompt="A person"),
    dict(seed=2, number_of_steps=3, guidance_scale=1, number_of_images=2, prompt="A painting",
         identity_image_strength=0.6, style_image_strength=0.3, composition_image_strength=0.8,
         depth_image_strength=0.9, base_image_strength=0.4),
    dict(seed=3, number_of_steps=4, guidance_scale=5, number_of_images=1, prompt="A statue",
         identity_image_strength=0.2, style_image_strength=0.7, composition_image_strength=0.0,
         depth_image_strength=0.1, base_image_strength=0.0, negative_prompt=None),
)


@pytest.fixture(autouse=True)
def small_images(monkeypatch):
    """The catalog path at 64 px: ``run`` calls the module's ``generate``, here with a smaller ``max_side``."""
    monkeypatch.setattr(omni_zero, "generate", functools.partial(omni_zero.generate, max_side=SMALL))


def _params(i: int, request: dict) -> dict:
    params = validate(SLUG, dict(request, identity_image="<tensor>", style_image="<tensor>", base_image="<tensor>"))
    return params | {"identity_image": synthetic_portrait(96, 128), "base_image": synthetic_portrait(96, 128, shade=-20),
                     "style_image": synthetic_portrait(128, 128, shade=40 - 30 * i)}


class OnnxDenoiser:
    """The components with ``controlnet_unet`` run by ``OnnxComponents`` from its exported graph."""

    def __init__(self, inner, onnx):
        self.inner, self.onnx = inner, onnx

    def controlnet_unet(self, *args, **kwargs):
        return self.onnx.controlnet_unet(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _batched(components):
    """Every request's result when the three run through one runner together; and the batcher."""
    runner = PipelineRunner(components, BatchingOptions(max_batch=16))
    # The runner's batcher for Omni-Zero's denoiser, ticked here once all three have joined.
    batcher = runner.batchers["controlnet_unet"] = StepBatcher(components.controlnet_unet, runner.options,
                                                                start_thread=False)
    steps = {i: [] for i in range(len(REQUESTS))}

    def call(i, request):
        return runner.run(SLUG, _params(i, request), RunControl(on_step=lambda d, t: steps[i].append((d, t))))

    results = run_together(batcher, [functools.partial(call, i, r) for i, r in enumerate(REQUESTS)], timeout=120)
    for i, request in enumerate(REQUESTS):
        total = request["number_of_steps"]
        assert steps[i] == [(d + 1, total) for d in range(total)]  # each its own progress
    return results, batcher


def _check_same_as_alone(components) -> float:
    batched, batcher = _batched(components)
    rows = [r["number_of_images"] * (2 if r["guidance_scale"] > 1 else 1) for r in REQUESTS]
    assert batcher.calls[0] == sum(rows)  # the three really shared the first controlnet_unet call
    worst = 0.0
    for i, request in enumerate(REQUESTS):
        assert batched[i].batch == {"requests": 3, "rows": sum(rows)}
        alone = run(SLUG, _params(i, request), components)
        assert batched[i].images.shape == alone.images.shape
        assert batched[i].steps == alone.steps == request["number_of_steps"]
        diff = float(np.abs(batched[i].images - alone.images).max())
        assert diff <= TOLERANCE, (i, request, diff)
        worst = max(worst, diff)
    return worst


def test_omni_zero_is_step_batched():
    assert step_batched(SLUG)
    runner = PipelineRunner(object(), BatchingOptions(max_batch=8))
    assert runner.batches(SLUG) and runner.capacity(SLUG) == 8


@pytest.mark.parametrize("planned", [False, True], ids=["stock", "device_scheduler"])
def test_a_request_batched_with_others_equals_it_alone(components, planned):
    _check_same_as_alone(DeviceScheduled(components) if planned else components)


@pytest.fixture(scope="module")
def onnx(components, omni_dir, tmp_path_factory):
    """``OnnxComponents`` with the exported ``controlnet_unet`` (its descriptor's axes: batch dynamic)."""
    from diffserve.engine.runtime_onnx import OnnxComponents
    from diffserve.export.onnx_export import export_component

    desc = components.descriptors["controlnet_unet"]
    exported = export_component(components.modules["controlnet_unet"], desc, omni_dir,
                                tmp_path_factory.mktemp("onnx"))
    return OnnxComponents(omni_dir, {"controlnet_unet": exported.path})


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_controlnet_unet_rows_are_independent(components, runtime, request):
    """Every input has a batch axis and each row sees only its own values: the strengths are per row."""
    from diffserve.export.onnx_export import example_inputs

    denoiser = request.getfixturevalue("onnx") if runtime == "onnx" else components
    desc = components.descriptors["controlnet_unet"]
    assert all(spec.dims[0] == "batch" for spec in desc.inputs)
    inputs = example_inputs(desc, "min", seed=5, batch=3)
    inputs["ip_scales"], inputs["controlnet_scales"] = torch.rand(3, 3), torch.rand(3, 2)
    rows = denoiser.controlnet_unet(**inputs)
    for i in range(3):
        alone = denoiser.controlnet_unet(**{k: v[i:i + 1] for k, v in inputs.items()})
        assert float((rows[i:i + 1] - alone).abs().max()) <= 1e-5, i
    swapped = dict(inputs, ip_scales=inputs["ip_scales"].flip(0), controlnet_scales=inputs["controlnet_scales"].flip(0))
    moved = denoiser.controlnet_unet(**swapped)
    for i in (0, 2):  # another row's strengths give another prediction
        assert float((moved[i] - rows[i]).abs().max()) > 1e-3, i


def test_batched_through_onnx_runtime_equals_alone(components, onnx):
    """The exported ``controlnet_unet`` takes the concatenated rows of three requests."""
    _check_same_as_alone(OnnxDenoiser(components, onnx))
