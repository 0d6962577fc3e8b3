"""Running a slug's denoising pipeline, and the machinery every family's pipelines share.

Each family's pipelines live in its folder (``diffserve.engine.models.<family>``); this package holds what they
share (``common``: prompt encoding, noise, the CFG loop as a ``DenoiseLoop``, decoding, ``RunControl``)
and ``run``, which finds the pipeline of a slug through its family object (``ModelSpec.family``).

Each module's ``generate(components, **arguments)`` is the pipeline; it takes decoded images as uint8
arrays [H, W, 3] and returns a ``GenerationResult``. ``run`` translates a validated request into those
arguments through the catalog (``ModelSpec.arguments``: API parameter -> ``generate`` keyword), so no
module restates the API's parameter names.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from diffserve.engine.catalog import get_model
from diffserve.engine.components import Components
from diffserve.engine.pipelines.common import Cancelled, GenerationResult, RunControl

__all__ = ["Cancelled", "GenerationResult", "RunControl", "pipeline_module", "run", "step_batched"]


def pipeline_module(slug: str) -> ModuleType:
    """The module whose ``generate`` runs ``slug``: its family's pipeline named ``ModelSpec.pipeline``."""
    spec = get_model(slug)
    return spec.family.pipeline(spec.pipeline)


def step_batched(slug: str) -> bool:
    """Whether ``slug``'s pipeline runs its loop as a ``DenoiseLoop`` that a ``RunControl.driver`` (a step
    batcher) can batch with other requests (its module sets ``STEP_BATCHED``)."""
    return bool(getattr(pipeline_module(slug), "STEP_BATCHED", False))


def run(slug: str, params: dict[str, Any], components: Components,
        control: RunControl | None = None) -> GenerationResult:
    """Run one validated request (``diffserve.engine.catalog.validate``) whose image parameters are decoded uint8 arrays."""
    arguments = get_model(slug).pipeline_arguments(params)
    return pipeline_module(slug).generate(components, **arguments, control=control)
