"""Denoising pipelines: one readable module per pipeline, and ``run``, which serves a slug with one.

* ``txt2img`` — text-to-image for the SD1.5 and SDXL families (``sd1.5-scifi``, ``segmind-vega``);
* ``sd15_img2img`` — SDEdit image-to-image on SD1.5 (``sd1.5-img2img``);
* ``omni_zero`` — SDXL ControlNet img2img with three IP-Adapters (``omni-zero``);
* ``flux`` — the FLUX.1-schnell flow-matching loop, and ``ominicontrol`` on top of it (``ominicontrol``);
* ``common`` — the pieces they share (prompt encoding, noise, the CFG loop, decoding, ``RunControl``).

Each module's ``generate(components, **arguments)`` is the pipeline; it takes decoded images as uint8
arrays [H, W, 3] and returns a ``GenerationResult``. ``run`` translates a validated request into those
arguments through the catalog (``ModelSpec.arguments``: API parameter -> ``generate`` keyword), so no
module restates the API's parameter names.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from engine.catalog import get_model
from engine.components import Components
from engine.pipelines.common import Cancelled, GenerationResult, RunControl

__all__ = ["Cancelled", "GenerationResult", "RunControl", "pipeline_module", "run", "step_batched"]


def pipeline_module(slug: str) -> ModuleType:
    """The module under ``engine.pipelines`` whose ``generate`` runs ``slug`` (``ModelSpec.pipeline``)."""
    return importlib.import_module(f"engine.pipelines.{get_model(slug).pipeline}")


def step_batched(slug: str) -> bool:
    """Whether ``slug``'s pipeline runs its loop as a ``DenoiseLoop`` that a ``RunControl.driver`` (a step
    batcher) can batch with other requests (its module sets ``STEP_BATCHED``)."""
    return bool(getattr(pipeline_module(slug), "STEP_BATCHED", False))


def run(slug: str, params: dict[str, Any], components: Components,
        control: RunControl | None = None) -> GenerationResult:
    """Run one validated request (``engine.catalog.validate``) whose image parameters are decoded uint8 arrays."""
    arguments = get_model(slug).pipeline_arguments(params)
    return pipeline_module(slug).generate(components, **arguments, control=control)
