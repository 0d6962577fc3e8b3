"""One text-to-image pipeline serves both families; the checkpoint's family picks the conditioning.

Equality with diffusers' StableDiffusionPipeline and StableDiffusionXLPipeline is in test_pipelines.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffserve.engine.catalog import get_model, validate
from diffserve.engine.checkpoint import read_architecture
from diffserve.engine.models.sd import txt2img
from diffserve.engine.pipelines import Cancelled, RunControl, run
from diffserve.engine.schedulers import make_scheduler


class Recording:
    """Real components whose UNet calls record the shapes and the conditioning they get."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        self.calls.append(dict(sample=tuple(sample.shape), hidden=tuple(encoder_hidden_states.shape),
                               text_embeds=text_embeds, time_ids=time_ids))
        return self.inner.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)


def _first_step(components, **kw):
    """Run one UNet step, then stop; returns (the recorded call, the total steps announced)."""
    recording, totals = Recording(components), []
    control = RunControl(on_step=lambda done, total: totals.append(total), is_cancelled=lambda: bool(totals))
    with pytest.raises(Cancelled):
        txt2img.generate(recording, prompt="a photo", control=control, **kw)
    return recording.calls[0], totals[0]


def test_sd15_conditions_on_one_encoder_without_micro_conditioning(sd15):
    call, _ = _first_step(sd15, width=64, height=64, num_inference_steps=3)
    assert call["text_embeds"] is None and call["time_ids"] is None
    assert call["hidden"][-1] == sd15.config.text_hidden_sizes[0]


def test_sdxl_conditions_on_both_encoders_pooled_embeds_and_time_ids(sdxl):
    call, _ = _first_step(sdxl, width=64, height=96, num_inference_steps=3, num_images=2)
    assert call["hidden"][-1] == sum(sdxl.config.text_hidden_sizes)
    assert call["text_embeds"].shape[0] == call["sample"][0] == 4  # CFG: 2 unconditional + 2 conditional rows
    assert call["time_ids"].tolist() == [[96, 64, 0, 0, 96, 64]] * 4


@pytest.mark.parametrize("slug, fixture", [("sd1.5-scifi", "sd15"), ("segmind-vega", "sdxl")])
def test_left_out_arguments_take_the_family_s_catalog_defaults(slug, fixture, request):
    components = request.getfixturevalue(fixture)
    assert txt2img.catalog_entry(components.config.family).slug == slug
    defaults = {p.name: p.default for p in get_model(slug).params}
    call, total = _first_step(components)
    factor = components.config.vae_scale_factor
    assert call["sample"][2:] == (defaults["img_height"] // factor, defaults["img_width"] // factor)
    sched = make_scheduler(defaults["scheduler"], components.config.scheduler_config)
    sched.set_timesteps(defaults["num_inference_steps"])
    assert total == len(sched.timesteps)
    assert call["sample"][0] == 2  # guidance_scale 7.5 > 1: classifier-free guidance


def test_run_through_the_catalog_equals_generate(sdxl):
    params = validate("segmind-vega", {"prompt": "portrait", "seed": 7, "num_inference_steps": 20})
    kw = dict(prompt="portrait", negative_prompt=None, width=64, height=64, num_inference_steps=3,
              guidance_scale=7.5, num_images=1, seed=7, scheduler="DPM2 Karras")
    direct = txt2img.generate(sdxl, **kw).images
    mapped = run("segmind-vega", params | {"img_width": 64, "img_height": 64, "num_inference_steps": 3}, sdxl)
    assert np.array_equal(direct, mapped.images)


def test_a_flux_checkpoint_is_refused(tiny_checkpoints):
    flux = SimpleNamespace(config=read_architecture(tiny_checkpoints["ominicontrol"]), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="sd15 and sdxl"):
        txt2img.generate(flux, prompt="a photo", width=64, height=64)
