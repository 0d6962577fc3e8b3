from __future__ import annotations

import diffusers
import pytest
import torch

from diffserve.engine.schedulers import SCHEDULER_NAMES, UnknownSchedulerError, canonical_scheduler_name, make_scheduler
from diffserve.engine.tiny.checkpoints import SD15_SCHEDULER

EXPECTED = {
    "DDIM": "DDIMScheduler", "DDPM": "DDPMScheduler", "PNDM": "PNDMScheduler", "LMS": "LMSDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler", "Euler a": "EulerAncestralDiscreteScheduler", "Heun": "HeunDiscreteScheduler",
    "DPM2 Karras": "KDPM2DiscreteScheduler", "DPM2 a Karras": "KDPM2AncestralDiscreteScheduler",
    "DPM Multi": "DPMSolverMultistepScheduler", "DPM Single": "DPMSolverSinglestepScheduler",
    "UniPC": "UniPCMultistepScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_sde_ancestral": "DPMSolverMultistepScheduler",
}


def test_every_design_name_is_served():
    assert set(SCHEDULER_NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_the_mapped_class_fresh_from_the_checkpoint_config(name):
    a = make_scheduler(name, SD15_SCHEDULER)
    b = make_scheduler(name, SD15_SCHEDULER)
    assert type(a).__name__ == EXPECTED[name]
    assert a is not b
    assert a.config.beta_schedule == "scaled_linear" and a.config.beta_end == 0.012


def test_variants():
    assert make_scheduler("DPM2 Karras", SD15_SCHEDULER).config.use_karras_sigmas is True
    assert make_scheduler("DPM2 a Karras", SD15_SCHEDULER).config.use_karras_sigmas is True
    assert make_scheduler("dpmpp_sde_ancestral", SD15_SCHEDULER).config.algorithm_type == "sde-dpmsolver++"
    assert make_scheduler("dpmpp_2m", SD15_SCHEDULER).config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize(("alias", "name"), [("euler_a", "Euler a"), ("EULER A", "Euler a"), ("ddim", "DDIM"),
                                             ("dpm-multi", "DPM Multi"), ("unipc", "UniPC"), ("DPMPP_2M", "dpmpp_2m"),
                                             ("dpm2_a_karras", "DPM2 a Karras"), ("k_lms", "LMS")])
def test_aliases(alias, name):
    assert canonical_scheduler_name(alias) == name


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownSchedulerError) as info:
        make_scheduler("k_dpmpp_3m", SD15_SCHEDULER)
    for name in SCHEDULER_NAMES:
        assert name in str(info.value)


def test_scheduler_state_is_not_shared():
    # Each request gets its own scheduler: one's timesteps and multistep history are not another's.
    a = make_scheduler("DPM Multi", SD15_SCHEDULER)
    b = make_scheduler("DPM Multi", SD15_SCHEDULER)
    assert a is not b and isinstance(a, diffusers.SchedulerMixin)
    a.set_timesteps(5)
    b.set_timesteps(20)
    sample = torch.zeros(1, 4, 8, 8)
    a.step(torch.ones_like(sample), a.timesteps[0], sample)
    assert len(a.timesteps) == 5 and len(b.timesteps) == 20
    assert a.step_index == 1 and b.step_index is None
    assert a.model_outputs[-1] is not None and all(out is None for out in b.model_outputs)
