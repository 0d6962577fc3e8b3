"""The memory plan of the five published slugs on one GPU, without downloading a weight.

Writes a header-only skeleton of each slug (safetensors headers with the real tensor shapes of the full-size
configs in ``benchmarks/configs``, data left sparse on disk; networks without a config there get one tensor
of their published parameter count, and files that ship as ``.bin``/``.onnx``/``.pt`` a sparse file of their
published size, as each slug's family states them in ``BenchmarkFigures``) and runs ``diffserve.engine.memory_plan``
on it, as ``diffserve models check --device cuda`` does on downloaded weights.
``python -m diffserve.benchmarks.memory_plan_published --out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from pathlib import Path

from diffserve.benchmarks.figures import figures
from diffserve.benchmarks.full_size import SLUG_ARCHITECTURES, build_module, load_config
from diffserve.engine.memory_plan import GB, plan_deployment


def _write_header(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for d in shape:
            count *= d
        size = count * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no disk, no memory


def write_skeleton(slug: str, root: Path) -> Path:
    fig = figures(slug)
    # A network the family counts by its published size replaces a full-size config of the same folder.
    roles = {role: config for role, config in SLUG_ARCHITECTURES[slug].items()
             if fig.published_folders.get(role, role) not in fig.published_params_m}
    for role, config in roles.items():
        sub = fig.published_folders.get(role, role)
        module = build_module(config, "meta")
        _write_header(root / sub / "model.safetensors",
                      {k: ("F32", list(t.shape)) for k, t in module.state_dict().items()})
        if role == "vae":
            cfg = {k: v for k, v in load_config(config).items() if k != "_source"}
            (root / "vae" / "config.json").write_text(json.dumps(cfg | {"force_upcast": True}))
    for sub, millions in fig.published_params_m.items():
        _write_header(root / sub / "model.safetensors", {"weight": ("F32", [int(millions * 1e6)])})
        if sub == "vae":
            (root / "vae" / "config.json").write_text(json.dumps({"force_upcast": True}))
    for sub, gb in fig.published_files_gb.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        with open(root / sub / "weights.bin", "wb") as f:
            f.truncate(int(gb * GB))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write memory-plan-published.{json,txt} here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {slug: write_skeleton(slug, Path(tmp) / slug) for slug in SLUG_ARCHITECTURES}
        plans = {gpu: plan_deployment(checkpoints, gb) for gpu, gb in (("H200", 141), ("H100", 80))}
        text = "\n\n".join(f"{gpu} ({p.memory_bytes / GB:.0f} GB):\n{p.format()}" for gpu, p in plans.items())
        summary = {gpu: {"memory_gb": p.memory_bytes / GB, "total_gb": round(p.total_bytes / GB, 1), "fits": p.fits,
                         "advice": p.advice(),
                         "slugs": {s.slug: {"weights_gb": round(s.weight_bytes / GB, 2),
                                            "weights_by_precision_gb": {k: round(v / GB, 2) for k, v in
                                                                        s.weights_by_precision().items()},
                                            "activations_gb": round(s.activation_bytes / GB, 2),
                                            "overhead_gb": round(s.overhead_bytes / GB, 2)} for s in p.slugs}}
                   for gpu, p in plans.items()}
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory-plan-published.txt").write_text(text + "\n")
        (args.out / "memory-plan-published.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
