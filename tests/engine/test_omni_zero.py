"""Omni-Zero on tiny random-weight components.

With the identity, style and composition adapters at strength 0 our pipeline is an SDXL
ControlNet img2img, and equals diffusers' ``StableDiffusionXLControlNetImg2ImgPipeline`` given
the same components, depth image, seed, schedule and SDE noise. The adapters are pinned to the
reference's placement by comparing our IP-Adapter UNet with diffusers' loader under the
reference's ``set_ip_adapter_scale`` configuration. The rest is checked by identities: every
strength acts, exactly ``number_of_steps`` UNet evaluations run, the image fallbacks, the face
detector's yes and no, and the seed page's example through the catalog.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffserve.engine.catalog import validate
from diffserve.engine.models.omni_zero.face_analysis import NoFaceDetected
from diffserve.engine.models.omni_zero import pipeline as omni_zero
from diffserve.engine.pipelines import RunControl, run
from diffserve.engine.models.omni_zero.tiny import featureless_image, synthetic_portrait
from tests.engine.omni_zero_fixtures import components, omni_dir, one_thread  # noqa: F401, F811 - fixtures

TOL = 1e-4
SMALL = 64  # max_side for the quick tests (the served rule is 1024)


@pytest.fixture(scope="module")
def images():
    y, x = np.mgrid[0:128, 0:96]
    depth = np.repeat((255 * (0.2 + 0.6 * y / 128 + 0.2 * np.sin(x / 9))).astype(np.uint8)[..., None], 3, axis=-1)
    return {
        "identity": synthetic_portrait(96, 128),
        "style": synthetic_portrait(128, 128, shade=40),
        "base": synthetic_portrait(96, 128, shade=-20),
        "composition": synthetic_portrait(128, 96, shade=20),
        "depth": depth,
    }


class Counting:
    """Counts ``run_component`` calls per component; optionally replaces the denoiser by zeros."""

    def __init__(self, inner, fake_denoiser: bool = False):
        self.inner = inner
        self.calls: dict[str, int] = {}
        original = inner.run_component

        def counted(component, inputs):
            self.calls[component] = self.calls.get(component, 0) + 1
            if fake_denoiser and component == "controlnet_unet":
                return {"noise_pred": torch.zeros_like(inputs["sample"])}
            return original(component, inputs)

        inner.run_component = counted

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.inner.run_component


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_zero_adapter_strengths_match_diffusers_controlnet_img2img(omni_dir, components, images):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    steps, base_strength, depth_strength, seed, guidance, count = 3, 0.3, 0.8, 2024, 4.0, 2
    ours = omni_zero.generate(
        components, identity_image=images["identity"], style_image=images["style"], base_image=images["base"],
        composition_image=images["composition"], depth_image=images["depth"], prompt="a portrait photo",
        negative_prompt="blurry", guidance_scale=guidance, base_image_strength=base_strength,
        identity_image_strength=0.0, style_image_strength=0.0, composition_image_strength=0.0,
        depth_image_strength=depth_strength, num_images=count, num_steps=steps, seed=seed, max_side=SMALL)

    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        omni_dir, controlnet=[ControlNetModel.from_pretrained(omni_dir / "controlnet_identity"),
                              ControlNetModel.from_pretrained(omni_dir / "controlnet_depth")])
    pipe.set_progress_bar_config(disable=True)
    base = omni_zero.fit_image(images["base"], SMALL)
    depth = omni_zero.fit_image(images["depth"], SMALL)
    # The same schedule and the same Brownian-tree SDE noise as ours, handed to diffusers' loop.
    scheduler = omni_zero.make_scheduler(components.config.scheduler_config)
    _, sigmas = omni_zero.set_timesteps(scheduler, steps, 1 - base_strength)
    noise = omni_zero.BrownianNoise(torch.zeros(count, 4, base.height // 8, base.width // 8), sigmas, seed)
    step = scheduler.step

    def step_with_tree_noise(model_output, timestep, sample, generator=None, return_dict=True):
        i = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
        return step(model_output, timestep, sample, variance_noise=noise(sigmas[i], sigmas[i + 1]),
                    return_dict=return_dict)

    scheduler.set_timesteps = lambda *args, **kwargs: None
    scheduler.step = step_with_tree_noise
    pipe.scheduler = scheduler
    ref = pipe("a portrait photo", negative_prompt="blurry", image=base,
               control_image=[PIL.Image.new("RGB", base.size), depth], strength=1.0, num_inference_steps=steps,
               guidance_scale=guidance, num_images_per_prompt=count,
               controlnet_conditioning_scale=[0.0, depth_strength],
               generator=_gen(seed), output_type="np").images
    assert ours.images.shape == ref.shape == (count, base.height, base.width, 3)
    assert np.abs(ours.images - ref).max() <= TOL


def test_ip_adapter_unet_matches_diffusers_loader_with_the_reference_scales(omni_dir, components):
    """Our adapter attention and placement equal diffusers' IP-Adapter UNet under the reference's scales."""
    from diffusers import UNet2DConditionModel

    from diffserve.engine.models.omni_zero.checkpoint import find_ip_adapters, read_ip_adapter

    identity_s, style_s, composition_s = 0.7, 0.9, 0.6
    files = find_ip_adapters(omni_dir)
    states = [read_ip_adapter(files.identity), read_ip_adapter(files.image_prompt),
              read_ip_adapter(files.image_prompt)]
    unet = UNet2DConditionModel.from_pretrained(omni_dir / "unet").eval()
    unet._load_ip_adapter_weights(states)

    class Holder:  # IPAdapterMixin.set_ip_adapter_scale on a bare UNet
        pass

    from diffusers.loaders import IPAdapterMixin

    holder = Holder()
    holder.unet = unet
    IPAdapterMixin.set_ip_adapter_scale(holder, [
        identity_s,
        {"down": {"block_2": [0.0, 0.0]}, "up": {"block_0": [0.0, style_s, 0.0]}},
        {"down": {"block_2": [0.0, composition_s]}, "up": {"block_0": [0.0, 0.0, 0.0]}},
    ])
    g = torch.Generator().manual_seed(0)
    o = components.config.omni_zero
    rows = 2
    face = torch.randn(rows, 1, o.face_embedding_dim, generator=g)
    style = torch.randn(rows, o.image_tokens, o.image_hidden_size, generator=g)
    composition = torch.randn(rows, o.image_tokens, o.image_hidden_size, generator=g)
    sample = torch.randn(rows, 4, 8, 16, generator=g)
    timestep = torch.tensor([700.0, 700.0])
    text = torch.randn(rows, 77, components.config.unet_cross_attention_dim, generator=g)
    text_embeds, time_ids = torch.randn(rows, 32, generator=g), torch.tensor([[64.0, 128, 0, 0, 64, 128]] * rows)
    with torch.inference_mode():
        ref = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs={
            "text_embeds": text_embeds, "time_ids": time_ids,
            "image_embeds": [face[:, None], style[:, None], composition[:, None]]}).sample
    tokens = components.ip_projection(face, style, composition)
    ours = components.controlnet_unet(
        sample, timestep, text, text_embeds, time_ids, *tokens,
        torch.tensor([[identity_s, style_s, composition_s]] * rows), torch.zeros(rows, 3, 64, 128),
        torch.zeros(rows, 3, 64, 128), torch.zeros(rows, 2))
    assert np.abs((ours - ref).numpy()).max() <= TOL
    # And each adapter acts where the reference puts it.
    for column in range(3):
        scales = torch.tensor([[identity_s, style_s, composition_s]] * rows)
        scales[:, column] = 0.0
        other = components.controlnet_unet(sample, timestep, text, text_embeds, time_ids, *tokens, scales,
                                           torch.zeros(rows, 3, 64, 128), torch.zeros(rows, 3, 64, 128),
                                           torch.zeros(rows, 2))
        assert np.abs((other - ours).numpy()).max() > 10 * TOL


STRENGTHS = ["identity_image_strength", "style_image_strength", "composition_image_strength",
             "depth_image_strength", "base_image_strength"]


def test_each_strength_changes_the_output_when_raised_from_zero(components, images):
    kw = dict(identity_image=images["identity"], style_image=images["style"], base_image=images["base"],
              composition_image=images["composition"], num_steps=2, seed=5, max_side=SMALL,
              **{name: 0.0 for name in STRENGTHS})
    zero = omni_zero.generate(components, **kw).images
    again = omni_zero.generate(components, **kw).images
    assert np.array_equal(zero, again)  # deterministic
    for name in STRENGTHS:
        raised = omni_zero.generate(components, **(kw | {name: 0.5})).images
        assert np.abs(raised - zero).max() > 10 * TOL, name


# NVIDIA's "Align Your Steps" 10-step noise levels for SDXL, at full precision as the reference
# implementations ship them (ComfyUI's AlignYourStepsScheduler NOISE_LEVELS["SDXL"]; NVIDIA's how-to
# page prints them rounded). Written out here, not read from the module under test.
PUBLISHED_AYS_SDXL = (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                      0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582)


def ays_levels(count: int) -> np.ndarray:
    """The published levels log-linearly interpolated to ``count`` points, as NVIDIA's how-to does it
    (an independent computation: whole schedule, then sliced by the caller)."""
    xs = np.linspace(0, 1, len(PUBLISHED_AYS_SDXL))
    ys = np.log(np.array(PUBLISHED_AYS_SDXL[::-1]))
    return np.exp(np.interp(np.linspace(0, 1, count), xs, ys))[::-1].copy()


def test_ays_levels_are_the_published_ones():
    assert omni_zero.AYS_SDXL_SIGMAS == PUBLISHED_AYS_SDXL
    assert np.allclose(ays_levels(11), PUBLISHED_AYS_SDXL)


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("base_strength", [0.0, 0.15, 0.5, 0.99, 1.0])
def test_schedule_has_exactly_number_of_steps_levels(components, steps, base_strength):
    scheduler = omni_zero.make_scheduler(components.config.scheduler_config)
    timesteps, sigmas = omni_zero.set_timesteps(scheduler, steps, 1 - base_strength)
    assert len(timesteps) == steps and len(sigmas) == steps + 1 and sigmas[-1] == 0
    assert bool((sigmas[1:] <= sigmas[:-1]).all()) and sigmas[0] <= PUBLISHED_AYS_SDXL[0] + 1e-9
    # The strength-scaled schedule: the full one has int(steps / strength) + 1 levels; we run its tail.
    total = int(steps / (1 - base_strength)) if base_strength < 1 else steps
    full = ays_levels(total + 1)
    assert np.allclose(sigmas[:-1].numpy(), full[-(steps + 1):-1])


def test_default_schedule_is_the_reference_one(components):
    # number_of_steps=10 at base_image_strength=0.15: int(10 / 0.85) = 11, so 12 AYS levels, the last 11 used.
    scheduler = omni_zero.make_scheduler(components.config.scheduler_config)
    timesteps, sigmas = omni_zero.set_timesteps(scheduler, 10, 1 - 0.15)
    expected = ays_levels(12)[1:]
    expected[-1] = 0.0
    assert np.allclose(sigmas.numpy(), expected)
    assert timesteps[0] < 999 and timesteps[-1] > 0 and type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.algorithm_type == "sde-dpmsolver++" and scheduler.config.use_karras_sigmas
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.final_sigmas_type == "zero"


@pytest.mark.parametrize("steps,base_strength", [(7, 0.15), (3, 1.0), (4, 0.0), (2, 0.95), (50, 0.999999)])
def test_exactly_number_of_steps_unet_evaluations(components, images, steps, base_strength):
    seen = []
    with Counting(components, fake_denoiser=True) as counter:
        out = omni_zero.generate(components, identity_image=images["identity"], style_image=images["style"],
                                 base_image=images["base"], num_steps=steps, base_image_strength=base_strength,
                                 max_side=SMALL, control=RunControl(on_step=lambda d, t: seen.append((d, t))))
    assert counter.calls["controlnet_unet"] == steps == out.steps
    assert seen == [(i + 1, steps) for i in range(steps)]
    # Depth was estimated (no depth image); text, image prompts and adapter tokens once per request.
    assert counter.calls["depth_estimator"] == counter.calls["image_encoder"] == counter.calls["ip_projection"] == 1
    assert counter.calls["face_recognizer"] == 1 and counter.calls["face_detector"] == 2


def test_missing_image_fallbacks(components, images):
    kw = dict(identity_image=images["identity"], style_image=images["style"], num_steps=2, seed=9, max_side=SMALL)
    with Counting(components) as counter:
        only_base = omni_zero.generate(components, base_image=images["base"], **kw).images
        assert counter.calls["depth_estimator"] == 1
        with_depth = omni_zero.generate(components, base_image=images["base"], depth_image=images["depth"], **kw)
        assert counter.calls["depth_estimator"] == 1  # a given depth image is used as is
    both_base = omni_zero.generate(components, base_image=images["base"], composition_image=images["base"], **kw)
    assert np.array_equal(only_base, both_base.images)
    only_composition = omni_zero.generate(components, composition_image=images["composition"], **kw).images
    both_composition = omni_zero.generate(components, base_image=images["composition"],
                                          composition_image=images["composition"], **kw).images
    assert np.array_equal(only_composition, both_composition)
    assert not np.array_equal(only_base, with_depth.images)
    with pytest.raises(ValueError, match="base image or a composition image"):
        omni_zero.generate(components, **kw)


def test_images_fit_1024_keeping_aspect_in_multiples_of_8():
    assert omni_zero.fit_image(np.zeros((100, 75, 3), np.uint8)).size == (768, 1024)
    assert omni_zero.fit_image(np.zeros((300, 500, 3), np.uint8)).size == (1024, 608)
    assert omni_zero.fit_image(np.zeros((2000, 2000, 3), np.uint8)).size == (1024, 1024)
    with pytest.raises(ValueError, match="aspect ratio"):
        omni_zero.fit_image(np.zeros((10, 400, 3), np.uint8))


def test_depth_image_and_base_are_cropped_to_their_common_size(components, images):
    wide_depth = np.repeat(np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None], 96, 0).repeat(3, 2)
    out = omni_zero.generate(components, identity_image=images["identity"], style_image=images["style"],
                             base_image=images["base"], depth_image=wide_depth, num_steps=1, max_side=SMALL)
    # base 96x128 fits as 48x64, depth 128x96 as 64x48: both become 48x48.
    assert out.images.shape == (1, 48, 48, 3)


def test_face_detector_finds_test_portraits_and_nothing_in_flat_images(components):
    portraits = (synthetic_portrait(96, 128), synthetic_portrait(128, 128, shade=30),
                 synthetic_portrait(200, 150, shade=-10))
    for image in portraits:
        face = omni_zero.largest_face(omni_zero.detect_faces(components, omni_zero.fit_image(image)))
        assert face is not None and face.score >= 0.5 and face.keypoints.shape == (5, 2)
    for value in (0, 60, 128):
        assert omni_zero.detect_faces(components, omni_zero.fit_image(featureless_image(value=value))) == []
    portrait = omni_zero.fit_image(synthetic_portrait())
    face = omni_zero.largest_face(omni_zero.detect_faces(components, portrait))
    embedding = omni_zero.face_embedding(components, portrait, face)
    assert embedding.shape == (1, 512) and torch.isfinite(embedding).all()


def test_identity_without_a_face_is_a_clear_error_and_a_faceless_base_is_fine(components, images):
    kw = dict(style_image=images["style"], num_steps=1, max_side=SMALL)
    with pytest.raises(NoFaceDetected, match="No face found in the identity image"):
        omni_zero.generate(components, identity_image=featureless_image(), base_image=images["base"], **kw)
    assert issubclass(NoFaceDetected, ValueError)  # the API answers 400
    out = omni_zero.generate(components, identity_image=images["identity"], base_image=featureless_image(), **kw)
    assert np.isfinite(out.images).all()


def test_seed_page_example_runs_through_the_catalog(components, images):
    url = "https://segmind-sd-models.s3.amazonaws.com/display_images/omni-zero-{}.jpg"
    params = validate("omni-zero", {
        "seed": 42, "prompt": "A person", "base_image": url.format("base"), "style_image": url.format("style"),
        "guidance_scale": 3, "identity_image": url.format("identity"), "negative_prompt": "blurry, out of focus",
        "number_of_steps": 10, "number_of_images": 1, "composition_image": url.format("base"),
        "base_image_strength": 0.15, "depth_image_strength": 0.5, "style_image_strength": 1,
        "identity_image_strength": 1, "composition_image_strength": 1,
    })
    decoded = {"identity_image": images["identity"], "style_image": images["style"], "base_image": images["base"],
               "composition_image": images["base"]}
    out = run("omni-zero", params | decoded, components)
    assert out.images.shape == (1, 1024, 768, 3) and out.seed == 42 and out.steps == 10
    assert np.isfinite(out.images).all() and 0.0 <= out.images.min() and out.images.max() <= 1.0
    assert {"analyze_faces", "estimate_depth", "encode_text", "denoise", "decode", "total"} <= set(out.timings)


def test_traced_components_export_to_onnx_equal_to_torch(omni_dir, components, tmp_path):
    """The new traced components export through export_component; the step graph stays shape-general."""
    from diffserve.engine.ort_session import OrtSession
    from diffserve.export.onnx_export import example_inputs, export_component

    names = ["image_encoder", "ip_projection", "depth_estimator", "controlnet_unet"]
    for name in names:
        result = export_component(components.modules[name], components.descriptors[name], omni_dir, tmp_path)
        assert result.max_abs_diff is not None and result.max_abs_diff <= TOL, (name, result.max_abs_diff)
    # Traced at 1024 px (latent 128), the step still runs at sides that are not multiples of 4.
    desc = components.descriptors["controlnet_unet"]
    session = OrtSession(result.path)
    inputs = example_inputs(desc, "min", seed=3, batch=2)
    latent = (6, 13)
    inputs["sample"] = torch.randn(2, 4, *latent)
    for key in ("identity_image", "depth_image"):
        inputs[key] = torch.rand(2, 3, latent[0] * 8, latent[1] * 8)
    with torch.inference_mode():
        ref = components.modules["controlnet_unet"](*inputs.values())
    got = session.run({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
    assert np.abs(got - ref.numpy()).max() <= TOL
