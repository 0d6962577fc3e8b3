"""The engine's options, as one typed object that travels with the artifacts.

``EngineOptions`` is built once, by the command line that exports or serves (``export/cli.py``,
``api/cli.py``), from settings and flags; ``diffserve.export.repository`` writes it into the repository
manifest and into every model's ``config.pbtxt`` parameters (``options``, JSON), and the Triton
stubs parse it back and hand it to the engine. The engine reads no environment variable on the
request path: what a pipeline or a runtime needs to know comes from here.

``BatchingOptions`` are the step batcher's limits (``diffserve.engine.batching``); they live here, torch-free, so the
ONNX Runtime component stub can parse ``EngineOptions`` without importing torch.

``network_precisions`` is the one rule for the dtype of each network on a device (fp16 for the
UNets and CLIP text encoders, the VAE in fp32 where its config forces upcast, bf16 for FLUX).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16")
OMINICONTROL_CONDITION_MODES = ("joint", "cached")
"""``joint``: condition tokens attend to text + image + condition (the reference as shipped);
``cached``: the independent-condition mode, condition K/V computed once per request."""
ONNX_FP32_COMPONENTS = ("face_detector", "face_recognizer")
"""Networks that ship as ONNX and are installed unconverted (float32 whatever the repository asks)."""


@dataclass(frozen=True)
class BatchingOptions:
    """The step batcher's limits (``diffserve.engine.batching.StepScheduler``)."""

    max_batch: int = 8
    """Most rows in one denoiser call (a CFG request with N samples takes 2N rows)."""
    buckets: tuple[int, ...] = ()
    """Batch sizes the denoiser is compiled or captured for; a call is padded up to the next one."""
    max_wait_ticks: int = 4
    """Ticks the head of the queue waits for room before it joins an active set that is full."""
    max_active: int | None = None
    """Most rows active at once when the wait bound admits past ``max_batch`` (default 2 * max_batch)."""

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be increasing positive sizes, got {list(self.buckets)}")
        if self.buckets and self.buckets[-1] < self.max_batch:
            raise ValueError(f"the largest bucket ({self.buckets[-1]}) must hold max_batch ({self.max_batch})")
        if self.max_wait_ticks < 0:
            raise ValueError(f"max_wait_ticks must be >= 0, got {self.max_wait_ticks}")
        if self.max_active is not None and self.max_active < self.max_batch:
            raise ValueError(f"max_active ({self.max_active}) must be >= max_batch ({self.max_batch})")

    @property
    def active_limit(self) -> int:
        return self.max_active if self.max_active is not None else 2 * self.max_batch

    def padded(self, rows: int) -> int:
        """The call size for ``rows`` rows: the smallest bucket that holds them, else ``rows``."""
        for bucket in self.buckets:
            if bucket >= rows:
                return bucket
        return rows


@dataclass(frozen=True)
class EngineOptions:
    """What the engine needs to know about a deployment; one value per repository."""

    device: str = "cpu"
    """``cpu`` or ``cuda``; a model instance's GPU comes from Triton's ``model_instance_device_id``."""
    precisions: dict[str, str] = field(default_factory=dict)
    """Component name -> ``fp32``/``fp16``/``bf16`` (``network_precisions``); absent: ``precision``."""
    precision: str = "fp32"
    """Default precision of the networks not named in ``precisions``."""
    ominicontrol_condition: str = "joint"
    """One of ``OMINICONTROL_CONDITION_MODES``; the cached mode needs its own exported components."""
    torch_optimizations: str = ""
    """``diffserve.engine.torch_optimize`` spec (fuse_qkv, channels_last, compile, cuda_graphs, ...)."""
    ort_arena: bool = False
    """ONNX Runtime's CPU memory arena: off, since it keeps each model process at its high-water mark
    (2 GB for a 1024² VAE) and a repository runs one process per model."""
    ort_threads: int = 0
    """ONNX Runtime intra-op threads (0: ORT's default, one per core)."""
    batching: bool = True
    """Step-level batching (``diffserve.engine.batching``) of the requests in flight in one fused pipeline instance: one
    UNet call per tick over every request of the same shapes. Off: the instance runs one request at a time."""
    max_batch: int = 8
    """Most UNet rows in one batched call (a CFG request with N samples takes 2N rows); also how many requests
    one instance takes in flight."""
    batch_buckets: tuple[int, ...] = ()
    """Batch sizes a call is padded up to (those compiled or captured as CUDA graphs); empty: no padding."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_buckets", tuple(int(b) for b in self.batch_buckets))  # JSON gives a list
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        bad = {k: v for k, v in {"": self.precision, **self.precisions}.items() if v not in PRECISIONS}
        if bad:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {bad}")
        if self.ominicontrol_condition not in OMINICONTROL_CONDITION_MODES:
            raise ValueError(f"ominicontrol_condition must be one of {', '.join(OMINICONTROL_CONDITION_MODES)}, "
                             f"got {self.ominicontrol_condition!r}")
        if self.ort_threads < 0:
            raise ValueError(f"ort_threads must be >= 0, got {self.ort_threads}")
        self.batching_options(check=True)

    def batching_options(self, check: bool = False) -> BatchingOptions | None:
        """The ``BatchingOptions`` of this deployment, or None with batching off (``check``: validate the limits
        even then)."""
        options = BatchingOptions(max_batch=self.max_batch, buckets=self.batch_buckets)
        return options if self.batching else None

    def precision_of(self, component: str) -> str:
        return self.precisions.get(component, self.precision)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native values (``batch_buckets`` as a list), so a dict read back from JSON compares equal."""
        return asdict(self) | {"batch_buckets": list(self.batch_buckets)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineOptions:
        """The inverse of ``to_dict``; unknown keys are an error (options written by another version)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown engine options {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> EngineOptions:
        return cls.from_dict(json.loads(text) if text else {})

    def with_precisions(self, precisions: dict[str, str]) -> EngineOptions:
        return EngineOptions.from_dict({**self.to_dict(), "precisions": {**self.precisions, **precisions}})


def vae_forces_upcast(checkpoint: str | Path) -> bool:
    """The VAE config's ``force_upcast`` (diffusers' default, True, when the key is absent): the SDXL VAE
    overflows in fp16 (NaN, black images); the fp16-fix VAE ships with ``force_upcast: false``."""
    path = Path(checkpoint) / "vae" / "config.json"
    if not path.is_file():
        return True
    return bool(json.loads(path.read_text()).get("force_upcast", True))


def default_precision(family: str, device: str) -> str:
    """The denoiser's precision: bf16 for FLUX on a GPU (trained in bf16; overflows in fp16), fp16 for the
    SD family on a GPU, fp32 on a CPU (fp16 there is slow and inexact)."""
    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if family == "flux" else "fp16"


def network_precisions(checkpoint: str | Path, family: str, components: list[str], device: str,
                       precision: str | None = None) -> dict[str, str]:
    """Each network's precision: ``precision`` (default ``default_precision``) for the denoisers and text
    encoders (CLIP and FLUX's T5 alike), the VAE in fp32 where its config forces upcast, and the face models
    in fp32 (they ship as ONNX and are installed unconverted)."""
    base = precision or default_precision(family, device)
    out = {}
    for component in components:
        if component in ONNX_FP32_COMPONENTS:
            out[component] = "fp32"
        elif component.startswith("vae_") and base != "fp32" and vae_forces_upcast(checkpoint):
            out[component] = "fp32"
        else:
            out[component] = base
    return out
