"""What every model family provides, as one object (``ModelFamily``), and the calls built on it.

A family is a folder under ``engine/models/``: its pipelines, the check and conversion of its published
artifacts, its tiny random-weight writer and its benchmark constants. The folder's ``__init__`` builds
one ``ModelFamily`` object and ``engine.models`` registers it; the catalog (``engine.catalog``, the API
contract) points each slug at its family object and names the family pipeline that serves it. Code
outside a family asks the family object, so no slug- or family-keyed table restates the catalog.

A family object imports nothing heavy: its modules (torch, diffusers) load when first asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One model family (compared by identity)."""

    name: str
    """The family's folder under ``engine/models/``."""
    package: str
    """Its import path (the folder's ``__name__``); its modules load relative to it."""
    pipelines: Mapping[str, str]
    """Pipeline name (``ModelSpec.pipeline``) -> module of this folder whose ``generate`` runs it."""
    demo_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Slug -> the seed page's example payload for the demo (local placeholders for input images)."""

    def module(self, name: str) -> ModuleType:
        """A module of this family's folder, imported on first use."""
        return importlib.import_module(f"{self.package}.{name}")

    def pipeline(self, name: str) -> ModuleType:
        """The module whose ``generate`` runs the family's pipeline ``name`` (``ModelSpec.pipeline``)."""
        if name not in self.pipelines:
            raise KeyError(f"family {self.name} has no pipeline {name!r}; it has {', '.join(self.pipelines)}")
        return self.module(self.pipelines[name])

    @property
    def published(self) -> ModuleType:
        """The module that checks and materializes the family's published artifacts (``ROLES``, ``check``,
        ``materialize``, ``write_tiny``; ``describe`` and ``CODE_VERSION`` optional)."""
        return self.module("published")

    def write_tiny(self, root: Path, slugs: list[str]) -> dict[str, dict[str, Path]]:
        """Tiny random-weight artifacts for ``slugs`` (the catalog's slugs of this family) under ``root``,
        in their publishers' layouts: ``{slug: {role: path}}`` for the demo's models file. The default:
        the ``published`` module writes one set of artifacts that every slug of the family uses."""
        roles = dict(self.published.write_tiny(Path(root)))
        return {slug: roles for slug in slugs}

    def write_demo_inputs(self, directory: Path) -> dict[str, Path]:
        """Input images of the demo payloads that only this family uses: ``{placeholder: file}`` for the
        placeholders of ``demo_params`` (``<local>``, the shared img2img picture, is the demo's)."""
        return {}
