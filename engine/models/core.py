"""What every model family provides, as one object (``ModelFamily``), and the calls built on it.

A family is a folder under ``engine/models/``: its pipelines, the check and conversion of its published
artifacts, its tiny random-weight writer and its benchmark constants. The folder's ``__init__`` builds
one ``ModelFamily`` object and ``diffserve.engine.models`` registers it; the catalog (``diffserve.engine.catalog``, the API
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


@dataclass(frozen=True)
class BenchmarkFigures:
    """One slug's benchmark constants (read by ``benchmarks/``; the formulas and the hardware stay there).

    The numbers are DESIGN.md's ("Compute floors") and the README's; ``diffserve.benchmarks.floors`` turns them
    into per-request floors at 800 TFLOP/s (H100 dense bf16).
    """

    floor_ms: float
    """DESIGN.md's compute floor of ``reference_request`` on an H100 (dense bf16), ms."""
    reference_request: str
    """The request ``floor_ms`` is for, in words."""
    floor_denoiser: str | None = None
    """Key of the family's ``denoiser_tflop`` whose per-evaluation FLOPs give this slug's floor for any
    request (steps, CFG, samples, resolution, plus the VAE); None: ``floor_ms`` is a constant, scaled by
    the steps a request runs against ``reference_steps``."""
    img2img: bool = False
    """SDEdit img2img: a request runs ``int(steps x strength)`` of its steps and VAE-encodes its input
    image (both in the FLOP floor)."""
    reference_steps: int | None = None
    """Denoising steps of ``reference_request`` where ``floor_ms`` is a constant."""
    published: str | None = None
    """Key of ``diffserve.benchmarks.floors.PUBLISHED_H100``: the best published H100 figure shown next to ours."""
    diffusers_pipeline: str | None = None
    """diffusers' pipeline class a user would run instead (the engine benchmark's baseline); None: none."""
    full_size: Mapping[str, str] = field(default_factory=dict)
    """Role -> ``benchmarks/configs`` name of each network that has a full-size config (roles as in the
    checkpoint sub-directories)."""
    full_size_end_to_end: bool = False
    """Every network of the slug's pipeline is in ``full_size``: it runs end to end at full size."""
    network_stages: str | None = None
    """Module of the family folder timing the ``full_size`` networks alone, where the pipeline does not run
    end to end at full size: ``network_stages(raw, params, device, dtype, fmt)`` -> (stage calls, end-to-end
    estimate from their medians, note); optional ``extra_timings(raw, params, device, dtype, repeats,
    stages, time_stages)`` -> {report key: entry}."""
    published_params_m: Mapping[str, float] = field(default_factory=dict)
    """Folder -> millions of parameters of published networks with no full-size config (the memory plan of
    the published slugs writes one tensor of that size)."""
    published_files_gb: Mapping[str, float] = field(default_factory=dict)
    """Folder -> GB of published files counted by size as stored (``.bin``/``.onnx``/``.pt``)."""
    published_folders: Mapping[str, str] = field(default_factory=dict)
    """Full-size role -> its folder in the published layout, where the two differ."""
    gpu_tolerance: float | None = None
    """README's largest pixel difference of the optimised path from eager torch at the same precision (fp32)."""
    sweep_shape: tuple[int, int] | None = None
    """(width, height) of the UNet batch sweep; None: not swept."""
    e2e_size: int | None = None
    """Square size of the full-size end-to-end request (``diffserve.benchmarks.full_size_e2e``); None: not run."""


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

    # -- benchmark constants (benchmarks/ reads them; no slug-keyed table there) --
    benchmarks: Mapping[str, BenchmarkFigures] = field(default_factory=dict)
    """Slug -> its benchmark constants (``BenchmarkFigures``)."""
    denoiser_tflop: Mapping[str, Mapping[tuple[int, int], float]] = field(default_factory=dict)
    """Denoising network (its ``benchmarks/configs`` name) -> TFLOP of one evaluation for one image, keyed
    by (width, height) in pixels (DESIGN.md)."""

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

    # ---- Checkpoint hooks: the networks a family's checkpoints hold (issue #22) ----------------------
    # Each reads a module of the family's folder by convention, imported on first use (so a family
    # object still imports nothing heavy and nothing above it):
    #   ``descriptors``: ``recognizes(architecture)``, ``component_descriptors(config, specs)``,
    #                    ``needed_components(config, specs, condition_mode)`` (diffserve.engine.descriptors asks);
    #   ``modules``:     ``load_modules(root, dtype, components, **options)`` (diffserve.engine.runtime_torch asks).
    # ``architecture``/``config`` is an ``diffserve.engine.checkpoint.CheckpointArchitecture``; ``specs`` are
    # ``diffserve.engine.catalog.ModelSpec``s (passed in: a family never imports the catalog).

    def recognizes(self, architecture: Any) -> bool:
        """Whether a checkpoint of this ``CheckpointArchitecture`` is one of this family's (exactly one
        registered family recognizes a checkpoint: ``diffserve.engine.models.family_of_checkpoint``)."""
        return bool(self.module("descriptors").recognizes(architecture))

    def component_descriptors(self, config: Any, specs: list[Any]) -> dict[str, Any]:
        """``{component: diffserve.engine.descriptors.ComponentDescriptor}`` of a checkpoint of this family serving
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

    def demo_key(self, spec: Any) -> str:
        """Stem of the demo deployment's Triton model names for ``spec``'s tiny checkpoint (``tiny_sd15``:
        ``tiny_sd15_unet``...): ``tiny_<architecture>`` unless the family says otherwise."""
        return f"tiny_{spec.architecture}"
