"""Omni-Zero's scheduler start vs the reference's, written independently here.

Scheduler: okaris/omni-zero's pipeline sets timesteps/sigmas without a begin
index, so diffusers' ``index_for_timestep`` starts at index 0 — or, when the first timestep is
repeated (high base_image_strength, few steps), at index 1, where its last step indexes past the
sigmas and raises; ``set_begin_index(0)`` equals it wherever it runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.pipelines import omni_zero
from engine.tiny.omni_zero import build_tiny_omni_zero


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    from engine.runtime_torch import TorchComponents

    return TorchComponents(build_tiny_omni_zero(tmp_path_factory.mktemp("oz")))


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
