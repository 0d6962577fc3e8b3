"""The planned loop: a scheduler's steps as precomputed weights, run on the device with no host sync.

Every deterministic diffusers scheduler the engine serves is linear in what it is given. With
``x_0`` the initial latents, ``e_j`` the (guided) model output of step ``j`` and ``n_j`` the
variance noise an SDE solver is handed, step ``i`` produces

    x_{i+1} = w_i0 x_0 + sum_{j <= i} (w_ij e_j + v_ij n_j)        model input_i = s_i x_i

where the weights depend only on the schedule. ``plan_scheduler`` reads them off before the loop
by running a private copy of the scheduler itself on probe tensors whose elements are unit
vectors of those sources (the schedulers are elementwise, so every element is an independent run),
then checks the weights on random trajectories run through the same copy. A scheduler that is not
linear in its inputs (one that draws noise inside its step: ``Euler a``, ``DDPM``, ``DPM2 a``;
thresholding or sample clipping) fails that check and the caller keeps the stock loop. SDE-DPM++
takes its noise as ``variance_noise``: planned with noise sources, the caller draws it up front.

``PlannedLoop`` then runs the update on the device as one matrix-vector product per step over a
pre-allocated buffer of [x_0, n_0, e_0, n_1, e_1, ...]. Inside the loop nothing is read back to the
host: no ``.item()``, no ``nonzero`` timestep lookups, no ``torch.tensor(...)`` uploads, no noise
drawn on the CPU and copied over. On a GPU the host can queue step ``i + 1`` while step ``i`` runs.
The result equals the stock loop up to float rounding (the sum is ordered differently).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

VERIFY_TRAJECTORIES = 8
"""Random trajectories the weights are checked against."""
VERIFY_RTOL = 1e-4
"""Allowed error of the weights on those trajectories, relative to the size of the terms."""
CACHE_SIZE = 64
"""Plans kept (per scheduler, schedule and options); building one costs a few ms (LMS: ~50 ms)."""


class PlanUnavailable(ValueError):
    """The scheduler is not linear in its inputs for this schedule; run the stock loop."""


@dataclass
class SchedulerPlan:
    input_scales: list[float]
    """``s_i``: the model input of step ``i`` is ``s_i x_i`` (``scale_model_input``)."""
    weights: torch.Tensor
    """[steps, 1 + stride * steps] float32: row ``i`` weights the buffer rows [x_0, (n_0,) e_0, ...]."""
    timesteps: torch.Tensor
    """[steps] float32: the denoiser's timestep input per step."""
    noise: bool
    """Whether the steps take variance noise (one buffer row per step before its model output)."""

    @property
    def steps(self) -> int:
        return len(self.input_scales)

    @property
    def stride(self) -> int:
        return 2 if self.noise else 1

    def to(self, device: torch.device) -> "SchedulerPlan":
        return SchedulerPlan(self.input_scales, self.weights.to(device), self.timesteps.to(device), self.noise)


def _cpu_copy(scheduler):
    probe = copy.deepcopy(scheduler)
    for name, value in vars(probe).items():
        if isinstance(value, torch.Tensor):
            setattr(probe, name, value.cpu())
    return probe


def plan_scheduler(scheduler, timesteps: torch.Tensor, *, init_sigma: float = 1.0, noise: bool = False,
                   eta: float = 0.0, scale_input: bool = True) -> SchedulerPlan:
    """The weights of ``scheduler``'s steps over ``timesteps``, from a copy (``scheduler`` is untouched).

    ``scheduler`` must be prepared exactly as the loop would use it (timesteps set, begin index
    set, noise already added). ``init_sigma`` is the typical size of ``x_0`` (for the check only).
    ``noise`` passes ``variance_noise`` to every step (SDE solvers fed with external noise);
    ``scale_input=False`` for loops that feed the latents unscaled (flow matching).
    Raises ``PlanUnavailable`` when the scheduler is not linear in its inputs.
    """
    config = getattr(scheduler, "config", {})
    for flag in ("thresholding", "clip_sample"):
        if config.get(flag):
            raise PlanUnavailable(f"{type(scheduler).__name__} with {flag}=True is not linear")
    probe = _cpu_copy(scheduler)
    ts = timesteps.detach().cpu()
    steps, stride = len(ts), 2 if noise else 1
    sources = 1 + stride * steps
    width = sources + VERIFY_TRAJECTORIES
    params = set(inspect.signature(probe.step).parameters)
    kwargs: dict = {"return_dict": False}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        # A scheduler that draws noise draws it from this throwaway generator, never the request's,
        # and the check below then fails.
        kwargs["generator"] = torch.Generator("cpu").manual_seed(0)
    if noise and "variance_noise" not in params:
        raise PlanUnavailable(f"{type(scheduler).__name__}.step takes no variance_noise")

    rng = torch.Generator("cpu").manual_seed(1234)
    random = torch.randn((sources, VERIFY_TRAJECTORIES), generator=rng, dtype=torch.float64)
    random[0] *= init_sigma
    # Column k < sources is the unit vector of source k; the last columns are random trajectories.
    values = torch.cat([torch.eye(sources, dtype=torch.float64), random], dim=1)  # [sources, width]
    x = values[0].clone().view(1, width, 1, 1)
    weights = torch.zeros((steps, sources), dtype=torch.float64)
    scales: list[float] = []
    for i, t in enumerate(ts):
        if scale_input:
            scales.append(_common_ratio(probe.scale_model_input(x, t), x, f"scale_model_input at step {i}"))
        else:
            scales.append(1.0)
        kw = dict(kwargs)
        if noise:
            kw["variance_noise"] = values[1 + stride * i].view(1, width, 1, 1).clone()
        model_output = values[stride * (i + 1)].view(1, width, 1, 1).clone()
        x = probe.step(model_output, t, x, **kw)[0].to(torch.float64)
        row = x.view(width)[:sources]
        weights[i] = row
        expected = row @ values[:, sources:]  # what the weights predict for the random trajectories
        scale_of_terms = row.abs() @ values[:, sources:].abs()
        error = (x.view(width)[sources:] - expected).abs()
        if bool((error > VERIFY_RTOL * scale_of_terms + 1e-12).any()):
            raise PlanUnavailable(f"{type(scheduler).__name__} step {i} is not linear in its inputs "
                                  f"(error {float(error.max()):.3g}); it draws noise or clips")
    return SchedulerPlan(input_scales=scales, weights=weights.to(torch.float32),
                         timesteps=ts.to(torch.float32), noise=noise)


def _common_ratio(scaled: torch.Tensor, x: torch.Tensor, what: str) -> float:
    x, scaled = x.reshape(-1).to(torch.float64), scaled.reshape(-1).to(torch.float64)
    big = x.abs() > 1e-6
    ratio = scaled[big] / x[big]
    scale = float(ratio[0])
    if not torch.allclose(scaled, scale * x, rtol=1e-6, atol=1e-9):
        raise PlanUnavailable(f"{what} is not one scale factor")
    return scale


_cache: OrderedDict[str, SchedulerPlan | str] = OrderedDict()
_cache_lock = threading.Lock()


def _cache_key(scheduler, timesteps: torch.Tensor, kwargs: dict) -> str:
    """Everything a plan depends on: class, config, the schedule state before the loop, options."""
    parts: list = [type(scheduler).__name__, repr(sorted(dict(getattr(scheduler, "config", {})).items())),
                   repr(sorted(kwargs.items())), timesteps.detach().cpu().numpy().tobytes()]
    for name, value in sorted(vars(scheduler).items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, str(value.dtype), value.detach().cpu().numpy().tobytes()))
        elif isinstance(value, np.ndarray):
            parts.append((name, str(value.dtype), value.tobytes()))
        elif isinstance(value, (int, float, str, bool, type(None))):
            parts.append((name, value))
    return hashlib.sha256(pickle.dumps(parts)).hexdigest()


def takes_variance_noise(scheduler) -> bool:
    """Whether ``scheduler.step`` accepts the noise it would draw as ``variance_noise`` (DPM-Solver, DDIM)."""
    return "variance_noise" in inspect.signature(scheduler.step).parameters


def try_plan(scheduler, timesteps: torch.Tensor, *, noise: bool | None = False, **kwargs) -> SchedulerPlan | None:
    """``plan_scheduler`` (cached), or None with a log line (once per schedule) saying why the stock loop runs.

    ``noise=None`` tries a plan without variance noise first, then, for a step that takes it, one
    with it (SDE-DPM++ draws one latents-shaped N(0, I) per step; the caller then draws them up front).
    """
    key = _cache_key(scheduler, timesteps, dict(kwargs, noise=noise))
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
    if found is None:
        attempts = [noise] if noise is not None else [False] + ([True] if takes_variance_noise(scheduler) else [])
        reasons = []
        for with_noise in attempts:
            try:
                found = plan_scheduler(scheduler, timesteps, noise=with_noise, **kwargs)
                break
            except PlanUnavailable as exc:
                reasons.append(str(exc))
        else:
            found = "; ".join(reasons)
            logger.info("device scheduler: %s; running the scheduler step by step", found)
        with _cache_lock:
            _cache[key] = found
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return found if isinstance(found, SchedulerPlan) else None


class PlannedLoop:
    """The device side of a plan: a pre-allocated source buffer and one matrix-vector product per step.

    Usage per step ``i``: ``model_input(i)`` → run the denoiser → ``advance(i, output)``. The
    latents ``x`` live in one buffer that ``advance`` overwrites.
    """

    def __init__(self, plan: SchedulerPlan, latents: torch.Tensor, noise: torch.Tensor | None = None):
        if plan.noise != (noise is not None):
            raise ValueError("noise must be given exactly when the plan takes variance noise")
        device = latents.device
        self.plan = plan.to(device)
        self.shape = tuple(latents.shape)
        # Rows not yet written have weight 0 and stay 0 (never empty memory: 0 * NaN is NaN).
        self.sources = torch.zeros((1 + plan.stride * plan.steps, latents.numel()), device=device,
                                   dtype=torch.float32)
        self.sources[0].copy_(latents.reshape(-1))
        if noise is not None:
            if noise.shape[0] != plan.steps or tuple(noise.shape[1:]) != self.shape:
                raise ValueError(f"noise must be [{plan.steps}, *{self.shape}], got {tuple(noise.shape)}")
            self.sources[1::2].copy_(noise.reshape(plan.steps, -1))
        self.x = latents.to(torch.float32).clone()

    def model_input(self, i: int) -> torch.Tensor:
        scale = self.plan.input_scales[i]
        return self.x if scale == 1.0 else self.x * scale

    def timestep(self, i: int, batch: int) -> torch.Tensor:
        return self.plan.timesteps[i].expand(batch)

    def output_row(self, i: int) -> torch.Tensor:
        """Where step ``i``'s model output goes (write it there to skip a copy)."""
        return self.sources[self.plan.stride * (i + 1)].view(self.shape)

    def advance(self, i: int, model_output: torch.Tensor | None = None) -> torch.Tensor:
        """x_{i+1} from the sources so far; ``model_output`` None means it is already in ``output_row(i)``."""
        if model_output is not None:
            self.output_row(i).copy_(model_output)
        used = 1 + self.plan.stride * (i + 1)
        torch.mv(self.sources[:used].t(), self.plan.weights[i, :used], out=self.x.view(-1))
        return self.x
