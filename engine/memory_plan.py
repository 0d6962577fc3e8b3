"""A deployment's GPU (or host) memory before anything is loaded: weights, activations, processes.

Weights are read from the checkpoint's file headers (a safetensors header lists every tensor's dtype and
shape; no weight is read), counted as parameters and priced at the precision each network is served in
(``diffserve.engine.options.network_precisions``): a float32 file served in fp16 costs 2 bytes a parameter. Files
without a header (a ``.bin``, an ``.onnx``) count their size as stored. Activations are an estimate for the
slug's largest allowed request (its largest resolution and image count, classifier-free guidance doubling
the denoiser batch), from per-megapixel constants named below; the per-process overhead is a CUDA context
and the allocator's slack. ``plan_deployment`` adds them up per GPU and says whether they fit.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from diffserve.engine.catalog import get_model
from diffserve.engine.options import default_precision, vae_forces_upcast

GB = 1e9
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

ACTIVATION_GB_PER_MEGAPIXEL = {"sd15": 1.5, "sdxl": 2.5, "flux": 4.0}
"""Estimated peak activations per generated image and megapixel, denoiser (CFG batch of 2) and VAE decode
together, at 16-bit with a 32-bit VAE: the VAE decoder's full-resolution 128-channel stage dominates
(~0.5 GB per buffer at 1024² in fp32, a few alive at once); FLUX adds its 4096 + 1024 condition tokens'
attention (no CFG). Estimates, not measurements: the H200 runs recorded peak memory per entry
(``benchmarks/results/engine-*-h200-*``) to check them against."""
PROCESS_OVERHEAD_GB = {"cuda": 1.0, "cpu": 0.5}
"""Per serving process: a CUDA context (~0.5 GB) plus torch's allocator slack and cuBLAS workspaces; on a CPU,
the python stub with torch imported."""


def safetensors_params(path: str | Path) -> dict[str, int]:
    """``{stored dtype: parameter count}`` from a safetensors file's header (its first bytes only)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    out: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        out[info["dtype"]] = out.get(info["dtype"], 0) + count
    return out


def _weight_files(directory: Path) -> list[Path]:
    """The files a loader reads: safetensors preferred; the ``.fp16`` variant only where it is all there is."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".onnx", ".pt")]
    tensors = [p for p in files if p.suffix == ".safetensors"]
    if tensors:
        plain = [p for p in tensors if ".fp16." not in p.name]
        return plain or tensors
    return files


@dataclass
class NetworkWeights:
    network: str
    """The checkpoint sub-directory (``unet``, ``vae``, ``text_encoder_2``, ``controlnet_depth``, ...)."""
    params: int
    """Parameters from safetensors headers (0 where the files have no header)."""
    precision: str
    """What it is served in; ``stored`` for files counted by size as stored."""
    bytes: int


@dataclass
class SlugPlan:
    slug: str
    weights: list[NetworkWeights]
    activation_bytes: int
    processes: int
    overhead_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes

    def weights_by_precision(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.weights:
            out[w.precision] = out.get(w.precision, 0) + w.bytes
        return out


def network_precision(network: str, base: str, vae_upcast: bool) -> str:
    if network == "vae":
        return "fp32" if base != "fp32" and vae_upcast else base
    if network == "face_analysis":
        return "fp32"  # antelopev2's ONNX files, installed unconverted
    return base


def plan_network(directory: Path, precision: str) -> NetworkWeights:
    params, stored = 0, 0
    for f in _weight_files(directory):
        if f.suffix == ".safetensors":
            params += sum(safetensors_params(f).values())
        else:
            stored += f.stat().st_size
    if stored and not params:
        return NetworkWeights(directory.name, 0, "stored", stored)
    return NetworkWeights(directory.name, params, precision, params * BYTES[precision] + stored)


def activation_bytes(slug: str) -> int:
    """The estimate for the slug's largest allowed request (largest resolution, most images)."""
    spec = get_model(slug)
    width, height = max(spec.resolutions() or [(1024, 1024)], key=lambda r: r[0] * r[1])
    return int(ACTIVATION_GB_PER_MEGAPIXEL[spec.architecture] * GB * spec.max_batch() * width * height / 1e6)


def plan_slug(slug: str, checkpoint: str | Path, device: str = "cuda", precision: str | None = None,
              processes: int = 1) -> SlugPlan:
    """Weights of every network under ``checkpoint`` at their serving precision, activations, ``processes``
    serving processes (one fused pipeline instance: 1)."""
    root = Path(checkpoint)
    family = get_model(slug).architecture
    base = precision or default_precision(family, device)
    upcast = vae_forces_upcast(root)
    weights = [plan_network(d, network_precision(d.name, base, upcast)) for d in sorted(root.iterdir())
               if d.is_dir() and _weight_files(d)]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return SlugPlan(slug, weights, activation_bytes(slug), processes, int(processes * PROCESS_OVERHEAD_GB[kind] * GB))


@dataclass
class DevicePlan:
    memory_bytes: int
    slugs: list[SlugPlan]

    @property
    def total_bytes(self) -> int:
        return sum(s.total_bytes for s in self.slugs)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.memory_bytes

    def advice(self) -> str:
        """What to drop or move to another GPU when the plan does not fit (largest slugs first)."""
        over = self.total_bytes - self.memory_bytes
        if over <= 0:
            return ""
        moved, freed = [], 0
        for s in sorted(self.slugs, key=lambda s: s.total_bytes, reverse=True):
            if freed >= over:
                break
            moved.append(s.slug)
            freed += s.total_bytes
        return (f"{over / GB:.1f} GB over: serve {', '.join(moved)} from another GPU or host (e.g. --gpus for a "
                f"second device, or leave it out of models.toml)")

    def format(self) -> str:
        lines = []
        for s in self.slugs:
            dtypes = ", ".join(f"{p} {b / GB:.2f} GB" for p, b in sorted(s.weights_by_precision().items()))
            lines.append(f"{s.slug}: weights {s.weight_bytes / GB:.2f} GB ({dtypes}); activations ~"
                         f"{s.activation_bytes / GB:.2f} GB (largest request); {s.processes} process(es) "
                         f"{s.overhead_bytes / GB:.2f} GB; total {s.total_bytes / GB:.2f} GB")
            for w in s.weights:
                count = f"{w.params / 1e6:.1f}M params" if w.params else "size as stored"
                lines.append(f"  {w.network:<20} {count:>18}  {w.precision:<6} {w.bytes / GB:7.2f} GB")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"per GPU: {self.total_bytes / GB:.1f} GB of {self.memory_bytes / GB:.1f} GB: {verdict}")
        if not self.fits:
            lines.append(self.advice())
        return "\n".join(lines)


def plan_deployment(checkpoints: dict[str, Path], memory_gb: float, device: str = "cuda",
                    precision: str | None = None) -> DevicePlan:
    """One fused instance of every slug on each GPU (``diffserve.export.cli.deployment_options``): the per-GPU plan.
    Slugs sharing a checkpoint (the two SD1.5 slugs of one folder) still load one copy each."""
    return DevicePlan(int(memory_gb * GB), [plan_slug(s, p, device, precision) for s, p in checkpoints.items()])
