"""API scheduler names -> diffusers schedulers, built fresh for every request.

Schedulers carry per-request state (step index, multistep history, ancestral noise), so a
scheduler object is never shared: ``make_scheduler`` builds a new one from the checkpoint's
own ``scheduler_config.json`` each time, overriding only what the API name implies (Karras
sigmas, the SDE solver variant). Names are matched case-insensitively and ignoring spaces,
``_`` and ``-``, so ``euler_a``, ``Euler a`` and ``EULER-A`` are the same scheduler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import diffusers


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    """Canonical API name, as the Segmind pages spell it."""
    cls: str
    """diffusers class name."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


SCHEDULER_SPECS: tuple[SchedulerSpec, ...] = (
    SchedulerSpec("DDIM", "DDIMScheduler"),
    SchedulerSpec("DDPM", "DDPMScheduler"),
    SchedulerSpec("PNDM", "PNDMScheduler"),
    SchedulerSpec("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
    SchedulerSpec("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    SchedulerSpec("Euler a", "EulerAncestralDiscreteScheduler", aliases=("euler_ancestral", "k_euler_a")),
    SchedulerSpec("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    SchedulerSpec("DPM2 Karras", "KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, aliases=("k_dpm_2",)),
    SchedulerSpec("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True},
                  aliases=("k_dpm_2_a",)),
    SchedulerSpec("DPM Multi", "DPMSolverMultistepScheduler", aliases=("dpm_multistep",)),
    SchedulerSpec("DPM Single", "DPMSolverSinglestepScheduler", aliases=("dpm_singlestep",)),
    SchedulerSpec("UniPC", "UniPCMultistepScheduler", aliases=("unipc_multistep",)),
    SchedulerSpec("dpmpp_2m", "DPMSolverMultistepScheduler", aliases=("dpm++_2m", "dpm++2m")),
    SchedulerSpec("dpmpp_sde_ancestral", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
                  aliases=("dpm++_sde_ancestral",)),
)

SCHEDULER_NAMES: tuple[str, ...] = tuple(s.name for s in SCHEDULER_SPECS)


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


_BY_KEY: dict[str, SchedulerSpec] = {}
for _spec in SCHEDULER_SPECS:
    for _alias in (_spec.name, *_spec.aliases):
        if _BY_KEY.setdefault(_key(_alias), _spec) is not _spec:
            raise RuntimeError(f"scheduler alias {_alias!r} is ambiguous")


class UnknownSchedulerError(ValueError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULER_NAMES)}")


def scheduler_spec(name: str) -> SchedulerSpec:
    if not isinstance(name, str) or _key(name) not in _BY_KEY:
        raise UnknownSchedulerError(str(name))
    return _BY_KEY[_key(name)]


def canonical_scheduler_name(name: str) -> str:
    return scheduler_spec(name).name


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> diffusers.SchedulerMixin:
    """A new scheduler for one request, from the checkpoint's scheduler config."""
    spec = scheduler_spec(name)
    cls = getattr(diffusers, spec.cls)
    return cls.from_config(dict(base_config), **spec.overrides)
