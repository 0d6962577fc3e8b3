"""What the Triton stubs share: their typed ``config.pbtxt`` parameters and their exit hook.

``diffserve.export.repository`` writes one ``PipelineModelParams`` or ``ComponentModelParams`` into each
model's ``config.pbtxt`` ``parameters`` (``to_parameters``); the stub templates under
``model_repository/templates/`` read the same dataclass back from the model config Triton hands
them (``from_model_config``), so a parameter's name and type are written once. The module imports
only the standard library: the ONNX Runtime component stub imports it and must stay torch-free (an
import of torch would multiply the resident memory of every component process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

COMPONENT_RUNTIMES = ("onnxruntime", "tensorrt", "torch")
"""What a component model runs its network with."""
PIPELINE_MODES = ("bls", "fused")
"""``bls``: components are BLS calls to the component models; ``fused``: they run in the pipeline process."""
FUSED_RUNTIMES = ("onnxruntime", "torch")

_P = TypeVar("_P", bound="_StubParams")


class _StubParams:
    """``to_parameters``/``from_model_config`` for a dataclass of ``str`` and ``dict`` fields.

    Triton parameters are strings; dict fields travel as JSON. Reading refuses unknown and missing
    keys, so a repository written by another version of export fails at load with the names."""

    def to_parameters(self) -> list[dict[str, Any]]:
        """``config.pbtxt`` ``parameters`` entries (``{"key": ..., "value": {"string_value": ...}}``)."""
        out = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out.append({"key": f.name, "value": {"string_value": value if isinstance(value, str)
                                                 else json.dumps(value, sort_keys=True)}})
        return out

    @classmethod
    def from_model_config(cls: type[_P], config: Mapping[str, Any]) -> _P:
        """Parse the ``parameters`` of a model config (the JSON Triton passes to ``initialize``)."""
        # proto3 JSON may leave out an empty string_value
        raw = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(raw) - set(names))
        missing = [n for n in names if n not in raw]
        if unknown or missing:
            raise ValueError(f"{config.get('name', '?')}: config.pbtxt parameters do not match {cls.__name__}"
                             f" (unknown: {unknown or 'none'}, missing: {missing or 'none'}); rebuild the "
                             "repository with `diffserve export`")
        return cls(**{n: raw[n] if hints[n] is str else json.loads(raw[n]) for n in names})


@dataclass(frozen=True)
class ComponentModelParams(_StubParams):
    """Parameters of a component model (``templates/component/model.py``)."""

    component: str
    """Descriptor name: ``text_encoder``, ``unet``, ``vae_decoder``, ..."""
    runtime: str
    """One of ``COMPONENT_RUNTIMES``."""
    checkpoint: str
    """The diffusers checkpoint directory (the torch runtime loads the module from it)."""
    options: dict[str, Any] = field(default_factory=dict)
    """``diffserve.engine.options.EngineOptions.to_dict()``: device, this network's precision, torch and ORT settings."""
    artifact: str = ""
    """ONNX file or TensorRT plan, relative to the version directory (empty for the torch runtime)."""

    def __post_init__(self) -> None:
        if self.runtime not in COMPONENT_RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(COMPONENT_RUNTIMES)}")
        if self.runtime != "torch" and not self.artifact:
            raise ValueError(f"{self.component}: the {self.runtime} runtime needs an artifact")


@dataclass(frozen=True)
class PipelineModelParams(_StubParams):
    """Parameters of a pipeline model (``templates/pipeline/model.py``)."""

    slug: str
    mode: str
    """One of ``PIPELINE_MODES``."""
    checkpoint: str
    components: dict[str, str] = field(default_factory=dict)
    """Component name -> the component model serving it (what ``bls`` calls)."""
    fused_runtime: str = "onnxruntime"
    """What ``fused`` runs the networks with: one of ``FUSED_RUNTIMES``."""
    artifacts: dict[str, str] = field(default_factory=dict)
    """Component name -> absolute path of its ONNX file (``fused`` with ONNX Runtime)."""
    options: dict[str, Any] = field(default_factory=dict)
    """``diffserve.engine.options.EngineOptions.to_dict()`` (parsed by the stub with ``EngineOptions.from_dict``)."""

    def __post_init__(self) -> None:
        if self.mode not in PIPELINE_MODES:
            raise ValueError(f"{self.slug}: unknown mode {self.mode!r}; choose one of {', '.join(PIPELINE_MODES)}")
        if self.fused_runtime not in FUSED_RUNTIMES:
            raise ValueError(f"{self.slug}: unknown fused_runtime {self.fused_runtime!r}; "
                             f"choose one of {', '.join(FUSED_RUNTIMES)}")


def instance_device(device: str, args: Mapping[str, Any]) -> str:
    """The device of this model instance: ``cuda:<model_instance_device_id>`` for a ``KIND_GPU`` instance
    (the ``gpus`` of its ``instance_group``), else ``device`` as the options say."""
    if device.startswith("cuda") and str(args.get("model_instance_kind", "")).upper() == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return device


def exit_without_teardown() -> None:
    """End this stub process now, skipping the interpreter's teardown and the C libraries' exit handlers.

    Both templates register it in ``finalize`` (last, so it runs first); it runs when the stub
    returns to exit, after the parent has its answer. Triton waits for a model's process without a
    limit when it unloads the model or shuts down, so a stub blocked in an exit handler would hold
    the unload for ever; and tearing down torch, onnxruntime and diffusers costs about a second of
    CPU per stub.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
