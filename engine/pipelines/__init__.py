"""Denoising pipelines, one readable module per pipeline; ``run`` dispatches a slug to its module."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from engine.catalog import get_model
from engine.components import Components
from engine.pipelines.common import Cancelled, GenerationResult, RunControl

__all__ = ["Cancelled", "GenerationResult", "RunControl", "pipeline_module", "run"]


def pipeline_module(slug: str) -> ModuleType:
    return importlib.import_module(f"engine.pipelines.{get_model(slug).pipeline}")


def run(slug: str, params: dict[str, Any], components: Components,
        control: RunControl | None = None) -> GenerationResult:
    """Run one validated request (``engine.catalog.validate``) with decoded image inputs."""
    return pipeline_module(slug).run(params, components, control)
