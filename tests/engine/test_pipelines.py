"""Our pipelines equal diffusers' own pipelines on identical tiny components, seeds and schedulers."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffserve.engine.catalog import validate
from diffserve.engine.models.sd import img2img as sd15_img2img, txt2img
from diffserve.engine.pipelines import Cancelled, RunControl, run
from diffserve.engine.schedulers import SCHEDULER_NAMES, make_scheduler

TOL = 1e-4
REFERENCE_SCHEDULERS = ["DDIM", "Euler a", "DPM Multi", "UniPC", "dpmpp_2m", "DPM2 Karras", "Heun"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def sd_pipe(sd15_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def img2img_pipe(sd_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**sd_pipe.components)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", REFERENCE_SCHEDULERS)
def test_sd15_txt2img_matches_diffusers(sd15, sd_pipe, scheduler):
    ours = txt2img.generate(sd15, prompt="a photo of the city", negative_prompt="blurry", width=64, height=96,
                            num_inference_steps=4, guidance_scale=5.0, num_images=2, seed=516797155652,
                            scheduler=scheduler)
    sd_pipe.scheduler = make_scheduler(scheduler, sd15.config.scheduler_config)
    ref = sd_pipe("a photo of the city", negative_prompt="blurry", width=64, height=96, num_inference_steps=4,
                  guidance_scale=5.0, num_images_per_prompt=2, generator=_gen(516797155652), output_type="np").images
    assert ours.images.shape == ref.shape == (2, 96, 64, 3)
    assert np.abs(ours.images - ref).max() <= TOL


@pytest.mark.parametrize("scheduler", REFERENCE_SCHEDULERS)
def test_sd15_img2img_matches_diffusers(sd15, img2img_pipe, input_image, scheduler):
    ours = sd15_img2img.generate(sd15, image=input_image, prompt="a fantasy landscape", negative_prompt="blurry",
                                 width=64, height=64, strength=0.75, num_inference_steps=5, guidance_scale=10.5,
                                 num_images=2, seed=98877465625, scheduler=scheduler)
    img2img_pipe.scheduler = make_scheduler(scheduler, sd15.config.scheduler_config)
    ref = img2img_pipe("a fantasy landscape", negative_prompt="blurry", image=PIL.Image.fromarray(input_image),
                       strength=0.75, num_inference_steps=5, guidance_scale=10.5, num_images_per_prompt=2,
                       generator=_gen(98877465625), output_type="np").images
    assert ours.images.shape == ref.shape
    assert np.abs(ours.images - ref).max() <= TOL


@pytest.mark.parametrize("scheduler", REFERENCE_SCHEDULERS)
@pytest.mark.parametrize("negative", [None, "low quality"])
def test_sdxl_txt2img_matches_diffusers(sdxl, sdxl_pipe, scheduler, negative):
    ours = txt2img.generate(sdxl, prompt="a portrait photo", negative_prompt=negative, width=64, height=64,
                            num_inference_steps=4, guidance_scale=9.0, num_images=2, seed=1232788698,
                            scheduler=scheduler)
    sdxl_pipe.scheduler = make_scheduler(scheduler, sdxl.config.scheduler_config)
    ref = sdxl_pipe("a portrait photo", negative_prompt=negative, width=64, height=64, num_inference_steps=4,
                    guidance_scale=9.0, num_images_per_prompt=2, generator=_gen(1232788698), output_type="np").images
    assert np.abs(ours.images - ref).max() <= TOL


def test_guidance_at_or_below_one_disables_cfg_like_diffusers(sd15, sd_pipe):
    ours = txt2img.generate(sd15, prompt="a photo", width=64, height=64, num_inference_steps=3,
                            guidance_scale=0.5, seed=3, scheduler="Euler")
    sd_pipe.scheduler = make_scheduler("Euler", sd15.config.scheduler_config)
    ref = sd_pipe("a photo", width=64, height=64, num_inference_steps=3, guidance_scale=0.5,
                  generator=_gen(3), output_type="np").images
    assert np.abs(ours.images - ref).max() <= TOL


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs_in_every_pipeline(sd15, sdxl, input_image, scheduler):
    common = dict(prompt="a photo", width=64, height=64, num_inference_steps=3, guidance_scale=7.0, seed=7,
                  scheduler=scheduler)
    outputs = [
        txt2img.generate(sd15, **common),
        sd15_img2img.generate(sd15, image=input_image, strength=0.8, **common),
        txt2img.generate(sdxl, **common),
    ]
    for out in outputs:
        assert out.images.shape == (1, 64, 64, 3)
        assert np.isfinite(out.images).all()


def test_same_seed_same_pixels_different_seed_different_pixels(sd15):
    kw = dict(prompt="a photo", width=64, height=64, num_inference_steps=3, scheduler="Euler a")
    a = txt2img.generate(sd15, seed=11, **kw).to_uint8()
    b = txt2img.generate(sd15, seed=11, **kw).to_uint8()
    c = txt2img.generate(sd15, seed=12, **kw).to_uint8()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_samples_three_gives_three_distinct_images(sd15):
    out = txt2img.generate(sd15, prompt="a photo", width=64, height=64, num_inference_steps=3,
                           num_images=3, seed=5)
    assert out.images.shape == (3, 64, 64, 3)
    assert not np.array_equal(out.images[0], out.images[1])


def test_seed_minus_one_draws_and_reports_a_seed(sd15):
    kw = dict(prompt="a photo", width=64, height=64, num_inference_steps=3)
    drawn = txt2img.generate(sd15, seed=-1, **kw)
    assert drawn.seed >= 0
    again = txt2img.generate(sd15, seed=drawn.seed, **kw)
    assert np.array_equal(drawn.to_uint8(), again.to_uint8())


def test_img2img_strength_sets_the_number_of_steps(sd15, input_image):
    out = sd15_img2img.generate(sd15, image=input_image, prompt="p", width=64, height=64, strength=0.5,
                                num_inference_steps=20, seed=1, scheduler="DDIM")
    assert out.steps == 10


def test_img2img_resizes_the_input_to_the_requested_size(sd15, input_image):
    out = sd15_img2img.generate(sd15, image=input_image, prompt="p", width=128, height=64, strength=0.3,
                                num_inference_steps=4, seed=1)
    assert out.images.shape == (1, 64, 128, 3)


def test_progress_and_cancellation(sd15):
    seen = []
    txt2img.generate(sd15, prompt="p", width=64, height=64, num_inference_steps=4, seed=1,
                     scheduler="DDIM", control=RunControl(on_step=lambda d, t: seen.append((d, t))))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    steps = []
    control = RunControl(on_step=lambda d, t: steps.append(d), is_cancelled=lambda: len(steps) >= 2)
    with pytest.raises(Cancelled):
        txt2img.generate(sd15, prompt="p", width=64, height=64, num_inference_steps=10, seed=1,
                         scheduler="DDIM", control=control)
    assert steps == [1, 2]  # stopped before the third UNet step


def test_catalog_request_runs_at_a_served_resolution(sd15, sdxl, input_image):
    params = validate("sd1.5-scifi", {"prompt": "futuristic city", "img_width": 512, "img_height": 768,
                                      "samples": 2, "seed": 516797155652, "scheduler": "dpmpp_2m"})
    out = run("sd1.5-scifi", params, sd15)
    assert out.images.shape == (2, 768, 512, 3) and out.seed == 516797155652 and out.steps == 20
    params = validate("sd1.5-img2img", {"image": "x", "prompt": "landscape", "strength": 0.75})
    out = run("sd1.5-img2img", params | {"image": input_image}, sd15)
    assert out.images.shape == (1, 512, 512, 3) and out.steps == 15
    params = validate("segmind-vega", {"prompt": "portrait", "seed": 1232788698, "num_inference_steps": 20,
                                       "scheduler": "UniPC"})
    out = run("segmind-vega", params, sdxl)
    assert out.images.shape == (1, 1024, 1024, 3)
    assert set(out.timings) >= {"encode_text", "denoise", "decode", "total"}
