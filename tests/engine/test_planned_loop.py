"""The device scheduler: diffusers' own steps read off as weights, run with nothing read back to the host.

The plan must reproduce the stock scheduler step for step (every scheduler the API names, with
and without a begin index), refuse the schedulers that draw their own noise, and leave each
pipeline's output where the stock loop puts it. "No host synchronisation" is checked on what the
loop dispatches: between the first and the last step no op may read a tensor back (``item``,
``nonzero``), convert or move one (``_to_copy``) or draw noise on the host.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffserve.engine.catalog import validate
from diffserve.engine.pipelines import RunControl, run
from diffserve.engine.pipelines.common import step_kwargs
from diffserve.engine.runtime_torch import TorchComponents
from diffserve.engine.planned_loop import PlannedLoop, SchedulerPlan, plan_scheduler, try_plan
from diffserve.engine.schedulers import SCHEDULER_NAMES, make_scheduler
from diffserve.engine.torch_optimize import TorchOptimizations
from tests.engine.test_torch_optimize import _image, _params
from tests.devices import torch_components

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}
# These draw fresh noise inside ``step`` and take no ``variance_noise``: they keep the stock loop.
STOCHASTIC = {"DDPM", "Euler a", "DPM2 a Karras"}
# This one draws one N(0, I) per step but takes it as ``variance_noise``: planned, the noise drawn up front.
NOISE_FED = {"dpmpp_sde_ancestral"}
PLAN_TOL = 1e-5
"""Max pixel difference, planned vs stock loop, per pipeline (seen: 0 … 1.2e-6)."""
HOST_SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "aten.equal", "_to_copy", "randn", "normal",
                 "lift_fresh")


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in denoiser: nonlinear in x and dependent on t, so trajectories differ per scheduler."""
    return torch.tanh(0.2 * x) + 1e-3 * t.to(torch.float32)


def _stock(sched, timesteps, x, seed: int = 0):
    generator = {"generator": torch.Generator().manual_seed(seed)} if "generator" in step_kwargs(sched, None) else {}
    for t in timesteps:
        x = sched.step(_model(sched.scale_model_input(x, t), t), t, x, **generator, return_dict=False)[0]
    return x


def _planned(plan: SchedulerPlan, x, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.stack([torch.randn(x.shape, generator=generator) for _ in range(plan.steps)]) if plan.noise else None
    loop = PlannedLoop(plan, x, noise)
    for i in range(plan.steps):
        x = loop.advance(i, _model(loop.model_input(i), plan.timesteps[i]))
    return x


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("begin", [0, 8], ids=["txt2img", "img2img"])
def test_the_plan_reproduces_every_deterministic_scheduler(name, begin, caplog):
    sched = make_scheduler(name, SD15_SCHEDULER)
    sched.set_timesteps(20)
    timesteps = sched.timesteps
    if begin:  # img2img: start part-way, as the strength selects
        timesteps = timesteps[begin * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin * sched.order)
    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma
    with caplog.at_level(logging.INFO, logger="diffserve.engine.planned_loop"):
        plan = try_plan(sched, timesteps, init_sigma=float(sched.init_noise_sigma), noise=None)
    if name in STOCHASTIC:
        assert plan is None
        assert "not linear in its inputs" in caplog.text
        return
    assert plan is not None and plan.steps == len(timesteps) and plan.noise == (name in NOISE_FED)
    assert getattr(sched, "step_index", None) is None  # planned on a copy: the request's scheduler is untouched
    reference = _stock(sched, timesteps, x0.clone())
    assert (_planned(plan, x0.clone()) - reference).abs().max() <= 2e-6 * reference.abs().max()


def test_plans_are_cached_per_schedule_and_refuse_clipping():
    a, b = make_scheduler("UniPC", SD15_SCHEDULER), make_scheduler("UniPC", SD15_SCHEDULER)
    a.set_timesteps(12)
    b.set_timesteps(12)
    plan = try_plan(a, a.timesteps)
    assert try_plan(b, b.timesteps) is plan  # a new request with the same schedule reuses it
    b.set_timesteps(13)
    assert try_plan(b, b.timesteps) is not plan
    clipping = make_scheduler("DDIM", {**SD15_SCHEDULER, "clip_sample": True})
    clipping.set_timesteps(10)
    with pytest.raises(ValueError, match="clip_sample"):
        plan_scheduler(clipping, clipping.timesteps)
    with pytest.raises(ValueError, match="noise must be given"):
        PlannedLoop(plan, torch.zeros(1, 4, 8, 8), noise=torch.zeros(12, 1, 4, 8, 8))


def test_the_fast_presets_include_it():
    assert TorchOptimizations.parse("fast").device_scheduler and TorchOptimizations.parse("max").device_scheduler
    only = TorchOptimizations.parse("device_scheduler")
    assert only.enabled and not only.compile and only.spec() == "device_scheduler"
    assert TorchOptimizations.parse(only.spec()) == only


SLUGS = ["sd1.5-scifi", "sd1.5-img2img", "segmind-vega", "omni-zero", "ominicontrol"]


def _slug_params(slug: str) -> dict:
    if slug == "sd1.5-img2img":
        params = validate(slug, {"image": "<tensor>", "prompt": "a lake", "strength": 0.6, "scheduler": "UniPC",
                                 "num_inference_steps": 20, "guidance_scale": 6, "seed": 9})
        params["image"] = _image()
        return params
    params = _params(slug)
    if slug == "segmind-vega":
        params["num_inference_steps"] = 8  # 1024² under the op recorder: fewer steps, same checks
    return params


@pytest.fixture(scope="module")
def components(tiny_checkpoints):
    """(stock, planned) components per slug, loaded on first use."""
    cache: dict[str, tuple[TorchComponents, TorchComponents]] = {}

    def get(slug: str):
        if slug not in cache:
            cache[slug] = (torch_components(tiny_checkpoints[slug]),
                           torch_components(tiny_checkpoints[slug], optimizations="device_scheduler"))
        return cache[slug]

    return get


class _Recorder(TorchDispatchMode):
    """Counts the ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _run_recording_the_loop(slug: str, comps: TorchComponents,
                            params: dict | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Run ``slug``, recording every op from the first step's cancellation check to the last step's end."""
    recorder, started = _Recorder(), []

    def is_cancelled() -> bool:
        if not started:
            started.append(True)
            recorder.__enter__()
        return False

    def on_step(done: int, total: int) -> None:
        if done == total:
            recorder.__exit__(None, None, None)

    result = run(slug, params or _slug_params(slug), comps, RunControl(on_step=on_step, is_cancelled=is_cancelled))
    syncs = {op: n for op, n in recorder.ops.items() if any(s in op for s in HOST_SYNC_OPS)}
    return result.images, syncs


@pytest.mark.parametrize("slug", SLUGS)
def test_planned_loop_matches_the_stock_loop_and_reads_nothing_back(slug, components):
    stock, planned = components(slug)
    reference, stock_syncs = _run_recording_the_loop(slug, stock)
    images, syncs = _run_recording_the_loop(slug, planned)
    assert np.abs(images - reference).max() <= PLAN_TOL
    assert syncs == {}
    if slug != "ominicontrol":  # flow-matching Euler with a begin index is already sync-free
        assert stock_syncs, "the recorder sees the stock scheduler's host reads"


def test_schedulers_that_draw_noise(components):
    stock, planned = components("sd1.5-scifi")
    # Euler a draws inside its step and takes no noise argument: the stock step runs, same image.
    params = {**_params("sd1.5-scifi"), "scheduler": "Euler a", "num_inference_steps": 6}
    assert np.array_equal(run("sd1.5-scifi", params, planned).images, run("sd1.5-scifi", params, stock).images)
    # SDE-DPM++ takes its noise: the request generator's draws are made before the loop, same image.
    params = {**_params("sd1.5-scifi"), "scheduler": "dpmpp_sde_ancestral", "num_inference_steps": 8}
    reference, stock_syncs = _run_recording_the_loop("sd1.5-scifi", stock, params)
    images, syncs = _run_recording_the_loop("sd1.5-scifi", planned, params)
    assert np.abs(images - reference).max() <= PLAN_TOL
    assert syncs == {} and stock_syncs.get("aten.randn.generator") == 8  # one host draw per step, then none


def test_a_planned_run_stops_between_steps_when_cancelled(components):
    from diffserve.engine.pipelines import Cancelled

    _, planned = components("sd1.5-scifi")
    seen: list[int] = []
    control = RunControl(on_step=lambda done, total: seen.append(done), is_cancelled=lambda: len(seen) >= 3)
    with pytest.raises(Cancelled):
        run("sd1.5-scifi", _params("sd1.5-scifi"), planned, control)
    assert seen == [1, 2, 3]
