"""OminiControl's published artifacts: a FLUX.1-schnell diffusers folder and the subject LoRA file as published.

Roles: ``base`` (black-forest-labs/FLUX.1-schnell) and ``subject_lora`` (Yuanshi/OminiControl
``omini/subject_512.safetensors``, or the older ``subject.safetensors``). The LoRA is what
OminiControl's trainer saves with ``FluxPipeline.save_lora_weights(get_peft_model_state_dict(...))``:
PEFT keys prefixed ``transformer.`` (``transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight``,
``lora_B``), rank 16 with alpha 16 in the release configs. ``check`` reads only key names and
shapes, against a meta-device transformer built from the base's config: a LoRA for another
base (a UNet's keys, or FLUX layers of other widths) is named as such. ``materialize`` links
the base's parts and the LoRA into ``condition_lora/``, the layout ``diffserve.engine.checkpoint`` reads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from diffserve.engine.checkpoint import CONDITION_LORA_DIR
from diffserve.engine.published import ArtifactProblem, mark_tiny, tiny_is_current

TINY_VERSION = 1
"""Bump when the tiny artifacts written by ``write_tiny`` change, so cached copies are rewritten."""

ROLES = {"base": True, "subject_lora": True}
"""Role -> required."""
WHERE = {"base": "download black-forest-labs/FLUX.1-schnell (the diffusers folder)",
         "subject_lora": "download Yuanshi/OminiControl's omini/subject_512.safetensors"}
_LORA_PREFIXES = ("transformer.", "base_model.model.")
_UNET_MARKERS = ("unet.", "lora_unet_", "down_blocks.", "up_blocks.", "mid_block.")


def _lora_shapes(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module path: {"down"|"up": shape}}`` of a PEFT LoRA file (prefixes removed), raw keys on failure."""
    from safetensors import safe_open

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name = key
            for prefix in _LORA_PREFIXES:
                name = name.removeprefix(prefix)
            for part, slot in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
                if name.endswith(part):
                    pairs.setdefault(name[: -len(part)], {})[slot] = tuple(f.get_slice(key).get_shape())
                    break
            else:
                pairs.setdefault(key, {})["unknown"] = ()
    return pairs


def check(slug: str, artifacts: Mapping[str, Path]) -> list[ArtifactProblem]:
    """Missing files, a base that is not FLUX.1-schnell, a LoRA whose targets or shapes do not fit it."""
    import torch
    from diffusers import FluxTransformer2DModel

    from diffserve.engine.models.ominicontrol.condition import condition_lora_targets

    problems = []
    paths = {r: Path(p) for r, p in artifacts.items()}
    for role in ROLES:
        if role not in paths:
            problems.append(ArtifactProblem(slug, role, None, "not configured", WHERE[role]))
        elif not paths[role].exists():
            problems.append(ArtifactProblem(slug, role, paths[role], "missing", WHERE[role]))
    if problems:
        return problems
    base, lora = paths["base"], paths["subject_lora"]
    config_path = base / "transformer" / "config.json"
    if not config_path.is_file():
        return [ArtifactProblem(slug, "base", base, "no transformer/config.json: not a FLUX diffusers folder",
                                WHERE["base"])]
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("_class_name") != "FluxTransformer2DModel":
        return [ArtifactProblem(slug, "base", base, f"a {config.get('_class_name')}, not FLUX", WHERE["base"])]
    if config.get("guidance_embeds"):
        problems.append(ArtifactProblem(slug, "base", base, "a guidance-distilled FLUX (FLUX.1-dev); the subject LoRA "
                                        "and the 8-step schedule are FLUX.1-schnell's", WHERE["base"]))
    if lora.suffix != ".safetensors":
        return problems + [ArtifactProblem(slug, "subject_lora", lora, "not a .safetensors file", WHERE["subject_lora"])]
    try:
        pairs = _lora_shapes(lora)
    except Exception as exc:
        return problems + [ArtifactProblem(slug, "subject_lora", lora, f"unreadable ({exc})", WHERE["subject_lora"])]
    fix = WHERE["subject_lora"]
    if any(n.startswith(_UNET_MARKERS) for n in pairs):
        return problems + [ArtifactProblem(slug, "subject_lora", lora, "a LoRA for a UNet (SD/SDXL), not for FLUX",
                                           fix)]
    unknown = [n for n, p in pairs.items() if "unknown" in p]
    if unknown:
        return problems + [ArtifactProblem(slug, "subject_lora", lora, f"not a PEFT LoRA: key {unknown[0]!r}", fix)]
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    modules = dict(transformer.named_modules())
    targets = set(condition_lora_targets(len(transformer.transformer_blocks),
                                         len(transformer.single_transformer_blocks)))
    foreign = [n for n in pairs if n not in modules]
    if foreign:
        return problems + [ArtifactProblem(slug, "subject_lora", lora, f"{len(foreign)} target(s) this FLUX transformer "
                                           f"does not have (a LoRA of another base?), e.g. {foreign[0]}", fix)]
    ranks = set()
    for name, pair in sorted(pairs.items()):
        if "down" not in pair or "up" not in pair:
            return problems + [ArtifactProblem(slug, "subject_lora", lora, f"{name} has only one of lora_A/lora_B",
                                               fix)]
        linear = modules[name]
        rank = pair["down"][0]
        if pair["down"] != (rank, linear.in_features) or pair["up"] != (linear.out_features, rank):
            return problems + [ArtifactProblem(
                slug, "subject_lora", lora, f"{name}: LoRA {list(pair['down'])}/{list(pair['up'])} does not fit a "
                f"{linear.in_features} -> {linear.out_features} layer: a LoRA of another FLUX base", fix)]
        ranks.add(rank)
    if not set(pairs) & targets:
        problems.append(ArtifactProblem(slug, "subject_lora", lora, "no LoRA on the condition branch (x_embedder, "
                                        "norm/attention/MLP linears of the blocks)", fix))
    elif len(ranks) > 1:
        problems.append(ArtifactProblem(slug, "subject_lora", lora, f"mixed ranks {sorted(ranks)}", fix))
    return problems


def lora_summary(path: Path) -> tuple[int, int]:
    """(rank, number of adapted layers) of a LoRA file, for ``models check``'s report."""
    pairs = _lora_shapes(Path(path))
    ranks = {p["down"][0] for p in pairs.values() if "down" in p}
    return (ranks.pop() if len(ranks) == 1 else -1), len(pairs)


def materialize(slug: str, artifacts: Mapping[str, Path], out: Path, **_deps) -> Path:
    """``out``: links to the base's parts plus ``condition_lora/<the published file name>``."""
    base, lora = Path(artifacts["base"]).resolve(), Path(artifacts["subject_lora"]).resolve()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.name == CONDITION_LORA_DIR:
            continue
        link = out / item.name
        if link.is_symlink():
            link.unlink()
        os.symlink(item, link)
    lora_dir = out / CONDITION_LORA_DIR
    if lora_dir.exists():
        shutil.rmtree(lora_dir)
    lora_dir.mkdir()
    os.symlink(lora, lora_dir / lora.name)
    return out


def write_tiny(root: Path) -> dict[str, Path]:
    """The tiny FLUX.1-schnell folder and the subject LoRA at ``OminiControl/omini/subject_512.safetensors``."""
    from diffserve.engine.models.ominicontrol.tiny import build_tiny_flux

    root = Path(root)
    base, lora = root / "FLUX.1-schnell", root / "OminiControl" / "omini" / "subject_512.safetensors"
    if tiny_is_current(root, TINY_VERSION):
        return {"base": base, "subject_lora": lora}
    shutil.rmtree(root, ignore_errors=True)
    build_tiny_flux(base, force=True)
    lora.parent.mkdir(parents=True, exist_ok=True)
    # The published FLUX.1-schnell has no LoRA: the one the tiny builder adds moves to OminiControl's place.
    for file in (base / CONDITION_LORA_DIR).glob("*.safetensors"):
        shutil.move(str(file), str(lora))
    shutil.rmtree(base / CONDITION_LORA_DIR)
    mark_tiny(root, TINY_VERSION)
    return {"base": base, "subject_lora": lora}
