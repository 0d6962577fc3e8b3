"""Each slug's benchmark constants, as its model family states them (``ModelFamily.benchmarks``).

The families (``diffserve.engine.models``) hold the per-slug numbers; the catalog says which family serves a slug.
This only looks them up: it imports no torch, so ``diffserve.benchmarks.floors`` and the reports stay light.
"""

from __future__ import annotations

from typing import Iterator

from diffserve.engine.models import FAMILIES
from diffserve.engine.models.core import BenchmarkFigures, ModelFamily


def all_figures() -> Iterator[tuple[str, ModelFamily, BenchmarkFigures]]:
    """(slug, family, figures) of every slug with benchmark constants, in registration order."""
    for family in FAMILIES.values():
        for slug, fig in family.benchmarks.items():
            yield slug, family, fig


def family_of(slug: str) -> ModelFamily | None:
    """The family stating ``slug``'s benchmark constants (None: no family does)."""
    return next((family for s, family, _ in all_figures() if s == slug), None)


def figures(slug: str) -> BenchmarkFigures | None:
    """``slug``'s benchmark constants (None for a slug no family states them for)."""
    family = family_of(slug)
    return None if family is None else family.benchmarks[slug]


def denoiser_tflop(slug: str) -> dict[tuple[int, int], float] | None:
    """TFLOP per evaluation and image by (width, height) of the denoiser that gives ``slug``'s FLOP floor."""
    fig, family = figures(slug), family_of(slug)
    if fig is None or family is None or fig.floor_denoiser is None:
        return None
    return dict(family.denoiser_tflop[fig.floor_denoiser])
