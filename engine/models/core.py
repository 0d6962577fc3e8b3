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

    # ---- Checkpoint hooks: the networks a family's checkpoints hold (issue #22) ----------------------
    # Each reads a module of the family's folder by convention, imported on first use (so a family
    # object still imports nothing heavy and nothing above it):
    #   ``descriptors``: ``recognizes(architecture)``, ``component_descriptors(config, specs)``,
    #                    ``needed_components(config, specs, condition_mode)`` (engine.descriptors asks);
    #   ``modules``:     ``load_modules(root, dtype, components, **options)`` (engine.runtime_torch asks).
    # ``architecture``/``config`` is an ``engine.checkpoint.CheckpointArchitecture``; ``specs`` are
    # ``engine.catalog.ModelSpec``s (passed in: a family never imports the catalog).

    def recognizes(self, architecture: Any) -> bool:
        """Whether a checkpoint of this ``CheckpointArchitecture`` is one of this family's (exactly one
        registered family recognizes a checkpoint: ``engine.models.family_of_checkpoint``)."""
        return bool(self.module("descriptors").recognizes(architecture))

    def component_descriptors(self, config: Any, specs: list[Any]) -> dict[str, Any]:
        """``{component: engine.descriptors.ComponentDescriptor}`` of a checkpoint of this family serving
        ``specs`` (shape profiles span every size and batch the specs allow)."""
        return self.module("descriptors").component_descriptors(config, specs)

    def needed_components(self, config: Any, specs: list[Any], condition_mode: str = "joint") -> list[str]:
        """The component names ``specs`` call on a checkpoint of this family, in export order
        (``condition_mode``: ``EngineOptions.ominicontrol_condition``)."""
        return list(self.module("descriptors").needed_components(config, specs, condition_mode))

    def load_modules(self, root: Path, dtype: Any, components: list[str] | None = None,
                     **options: Any) -> dict[str, Any]:
        """The descriptor-ordered torch wrapper modules of checkpoint ``root`` in ``dtype`` (``components``:
        the ones to load; None: the family's default set). ``options`` are family-specific (OminiControl:
        ``condition_lora``); a family ignores the ones it does not know."""
        return self.module("modules").load_modules(Path(root), dtype, components, **options)

    def demo_inputs(self, directory: Path) -> dict[str, Path]:
        """``{placeholder: local file}`` for the input images of this family's ``demo_params`` written under
        ``directory`` (beside the shared ``<local>`` picture of ``engine.tiny.demo``); none by default."""
        return {}

    def demo_key(self, spec: Any) -> str:
        """Stem of the demo deployment's Triton model names for ``spec``'s tiny checkpoint (``tiny_sd15``:
        ``tiny_sd15_unet``...): ``tiny_<architecture>`` unless the family says otherwise."""
        return f"tiny_{spec.architecture}"
