"""Stable Diffusion checkpoints as published: SD1.5 (``sd1.5-*``), Segmind-Vega and SDXL bases.

One role, ``checkpoint``: either a diffusers directory as its publisher ships it
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``,
weights possibly only or also as ``*.fp16.safetensors`` variants) or an original single-file
checkpoint (``.safetensors``/``.ckpt`` with LDM keys, as fine-tunes are shared). A directory
is used as published: the engine's directory links to its entries, and the runtime picks the
fp16 weight variant when the run precision is fp16/bf16 (``diffserve.engine.checkpoint.weights_variant``).
A single file is converted once by diffusers' own single-file loading, with the architecture's
configs, scheduler and tokenizer shipped in ``configs/`` next to this module and
``local_files_only=True`` — nothing is fetched. Which shipped architecture a single file has is
decided from its tensor shapes before anything is loaded.

The checks read only configs and file headers (safetensors headers; a ``.ckpt`` is memory-mapped),
build each network on the ``meta`` device and compare every tensor shape and the parameter
counts against the architecture the slug needs (SD1.5 UNet 859.5M, Vega 745.2M, SDXL 2567.5M).
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from diffserve.engine.published import ArtifactProblem
from diffserve.engine.models.sd.ldm_keys import SD15_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ldm_shapes

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
BPE_FILE = CONFIGS / "bpe_simple_vocab_16e6.txt.gz"
"""CLIP's BPE merges as open_clip_torch 3.3.0 ships them (MIT, LICENSE beside it): the vocabulary of
every SD/SDXL CLIP tokenizer (``vocab.json``/``merges.txt`` are derived from it, see ``_write_clip_vocab``)."""

CODE_VERSION = 1
"""Part of the materialized directory's fingerprint: bump when a conversion changes."""

ROLES = {"checkpoint": True}
"""Role -> required."""

@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    description: str
    unet_params_m: float | None = None
    """The published UNet's parameter count (millions), for the check's report; None for the tiny demo."""


ARCHITECTURES = {
    "sd15": Architecture("sd15", "sd15", "Stable Diffusion 1.5", 859.5),
    "tiny-sd15": Architecture("tiny-sd15", "sd15", "the tiny demo SD1.5 (diffserve.engine.tiny)"),
    "tiny-sdxl": Architecture("tiny-sdxl", "sdxl", "the tiny demo SDXL (diffserve.engine.tiny)"),
    "segmind-vega": Architecture("segmind-vega", "sdxl", "Segmind-Vega", 745.2),
    "sdxl-base": Architecture("sdxl-base", "sdxl", "SDXL base 1.0", 2567.5),
}

DOWNLOADS = {
    "sd1.5-scifi": "download the fine-tune's single file (.safetensors) or the stable-diffusion-v1-5/"
                   "stable-diffusion-v1-5 diffusers folder (huggingface-cli download stable-diffusion-v1-5/"
                   "stable-diffusion-v1-5 --local-dir DIR)",
    "sd1.5-img2img": "download the stable-diffusion-v1-5/stable-diffusion-v1-5 diffusers folder (huggingface-cli "
                     "download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR) or an SD1.5 single file",
    "segmind-vega": "download the segmind/Segmind-Vega diffusers folder (huggingface-cli download segmind/Segmind-Vega "
                    "--local-dir DIR)",
}
_SDXL_DOWNLOAD = ("download the stabilityai/stable-diffusion-xl-base-1.0 diffusers folder or its "
                  "sd_xl_base_1.0.safetensors single file")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                 "text_encoder_2": "model"}


def family_of(slug: str) -> str:
    """The architecture ``slug``'s checkpoint must have (the catalog's ``ModelSpec.architecture``)."""
    from diffserve.engine.catalog import get_model

    return get_model(slug).architecture


def _download_hint(slug: str) -> str:
    return DOWNLOADS.get(slug, _SDXL_DOWNLOAD)


# -- reading shapes without loading weights ------------------------------------------------------

def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file; safetensors from its header, torch pickles memory-mapped."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

    # weights_only: a pickle that needs more than tensors (some training checkpoints) is refused, not run.
    data = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    return {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}


def find_weights(component_dir: Path, name: str) -> list[Path]:
    """The weight files of one diffusers component (sharded or not, any variant), safetensors first."""
    found = []
    for pattern in (f"{name}*.safetensors", f"{name}*.bin"):
        found += sorted(p for p in component_dir.glob(pattern) if not p.name.endswith(".index.json"))
        if found:
            break
    return found


def _component_shapes(component_dir: Path, name: str) -> dict[str, tuple[int, ...]] | None:
    """Shapes of one variant of a component's weights (the non-variant files, else the fp16 ones)."""
    files = find_weights(component_dir, name)
    if not files:
        return None
    plain = [f for f in files if ".fp16" not in f.name]
    chosen = plain or files
    shapes: dict[str, tuple[int, ...]] = {}
    for f in chosen:
        shapes.update(read_shapes(f))
    return shapes


@lru_cache(maxsize=None)
def _meta_shapes(kind: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter and persistent buffer of a network built from its config on ``meta``."""
    import torch

    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
        elif kind == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if kind == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _count_m(shapes: Mapping[str, tuple[int, ...]] | Any) -> float:
    import math

    items = shapes.items() if isinstance(shapes, Mapping) else shapes
    return sum(math.prod(s) for k, s in items if not k.endswith("position_ids")) / 1e6


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _norm_text_key(k: str) -> str:
    return k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k


def _compare(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
             ignore=("position_ids",)) -> list[str]:
    """Short descriptions of missing, unexpected and mis-shaped tensors."""
    out = []
    missing = [k for k in expected if k not in found and not k.endswith(ignore)]
    extra = [k for k in found if k not in expected and not k.endswith(ignore)]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing:
        out.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if extra:
        out.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
    if wrong:
        k = wrong[0]
        out.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {list(found[k])}, expected {list(expected[k])})")
    return out


# -- checks --------------------------------------------------------------------------------------

def check(slug: str, artifacts: Mapping[str, Path]) -> list[ArtifactProblem]:
    """Problems with a slug's ``checkpoint`` (empty list: it can be served)."""
    return check_checkpoint(slug, "checkpoint", artifacts.get("checkpoint"), family_of(slug))


def check_checkpoint(slug: str, role: str, path: Path | None, family: str) -> list[ArtifactProblem]:
    """Problems with one SD1.5/SDXL checkpoint (a diffusers dir or a single file) for ``family``."""
    def problem(message: str, fix: str) -> ArtifactProblem:
        return ArtifactProblem(slug, role, path, message, fix)

    hint = _download_hint(slug)
    if path is None:
        return [problem("not configured", f"{hint}, and set `{role} = \"PATH\"` under [{slug}]")]
    if not path.exists():
        return [problem("missing: no such file or directory", hint)]
    if path.is_dir():
        return [problem(m, f) for m, f in _check_directory(path, family, hint)]
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        return [problem(f"not a diffusers folder nor a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})",
                        hint)]
    try:
        arch, problems = detect_single_file(path, family)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is a problem to report, not a crash
        return [problem(f"cannot be read: {type(exc).__name__}: {exc}",
                        "re-download it, or convert a .ckpt to .safetensors (a pickle holding more than tensors "
                        "is refused)")]
    return [problem(m, f) for m, f in problems]


def _check_directory(root: Path, family: str, hint: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not (root / "model_index.json").is_file():
        return [("not a diffusers folder (no model_index.json)",
                 f"point at the folder that holds model_index.json, or at a single-file checkpoint; {hint}")]
    components = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if family == "sdxl":
        components += ["text_encoder_2", "tokenizer_2"]
    for name in components:
        d = root / name
        config = d / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if name.startswith("tokenizer"):
            if not (d / "vocab.json").is_file() and not (d / "tokenizer.json").is_file():
                problems.append((f"{name}/ missing (no vocab.json or tokenizer.json)", f"download the whole folder; {hint}"))
            continue
        if not config.is_file():
            problems.append((f"{name}/{config.name} missing", f"download the whole folder; {hint}"))
    if problems:
        return problems
    unet = _load_json(root / "unet" / "config.json")
    is_sdxl = unet.get("addition_embed_type") == "text_time"
    if is_sdxl != (family == "sdxl"):
        found = "an SDXL-family UNet (text_time embedding)" if is_sdxl else "an SD1.5-family UNet"
        want = "an SDXL-family checkpoint (Segmind-Vega, SDXL)" if family == "sdxl" else "an SD1.5 checkpoint"
        return [(f"unet/ is {found}; this slug needs {want}", hint)]
    if int(unet.get("in_channels", 4)) != 4:
        problems.append((f"unet/ has {unet['in_channels']} input channels (an inpainting model?); 4 are needed", hint))
    for name in [c for c in components if c in _WEIGHT_NAMES]:
        d = root / name
        found = _component_shapes(d, _WEIGHT_NAMES[name])
        if found is None:
            problems.append((f"{name}/ has no weights ({_WEIGHT_NAMES[name]}[.fp16].safetensors)",
                             f"download the weights too; {hint}"))
            continue
        cfg = _load_json(d / "config.json")
        expected = dict(_meta_shapes(name, json.dumps(cfg, sort_keys=True)))
        if name.startswith("text_encoder"):
            expected = {_norm_text_key(k): s for k, s in expected.items()}
            found = {_norm_text_key(k): s for k, s in found.items()}
        for diff in _compare(expected, found):
            problems.append((f"{name}/ weights do not match {name}/config.json: {diff}",
                             f"re-download {name}/ (a partial or mixed download?); {hint}"))
    return problems


def detect_single_file(path: Path, family: str) -> tuple[Architecture | None, list[tuple[str, str]]]:
    """The shipped architecture whose LDM tensor shapes the file has exactly, or the problems why none fits."""
    shapes = read_shapes(path)
    has_sdxl = any(k.startswith("conditioner.embedders.") for k in shapes)
    has_sd15_text = any(k.startswith(SD15_TEXT_PREFIX) for k in shapes)
    unet = {k: s for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        return None, [("not an LDM single-file checkpoint (no model.diffusion_model.* tensors)",
                       f"{_download_hint_for(family)}")]
    file_family = "sdxl" if has_sdxl or f"{UNET_PREFIX}label_emb.0.0.weight" in shapes else "sd15"
    if file_family != family:
        return None, [(f"an {'SDXL' if file_family == 'sdxl' else 'SD1.5'}-family single file "
                       f"({_count_m(unet):.1f}M UNet parameters); this slug needs "
                       f"{'an SDXL-family' if family == 'sdxl' else 'an SD1.5'} checkpoint", _download_hint_for(family))]
    vae = {k: s for k, s in shapes.items() if k.startswith(VAE_PREFIX)}
    candidates = [a for a in ARCHITECTURES.values() if a.family == family and (CONFIGS / a.name).is_dir()]
    reports = []
    for arch in candidates:
        expected = expected_ldm_shapes(arch.name)
        diffs = _compare({k: s for k, s in expected.items() if k.startswith(UNET_PREFIX)}, unet)
        if not diffs:
            vae_diffs = _compare({k: s for k, s in expected.items() if k.startswith(VAE_PREFIX)}, vae)
            problems = [(f"VAE (first_stage_model.*) does not match {arch.description}'s: {d}",
                         "use a complete single file (with its VAE) or the diffusers folder") for d in vae_diffs]
            if family == "sd15" and not has_sd15_text:
                problems.append(("no text encoder (cond_stage_model.transformer.*)",
                                 "use a complete single file or the diffusers folder"))
            if family == "sdxl" and not {"conditioner.embedders.0", "conditioner.embedders.1"} <= {
                    ".".join(k.split(".")[:3]) for k in shapes}:
                problems.append(("no text encoders (conditioner.embedders.0/1.*)",
                                 "use a complete single file or the diffusers folder"))
            return arch, problems
        expected_m = arch.unet_params_m or _count_m(
            {k: s for k, s in expected.items() if k.startswith(UNET_PREFIX)})
        reports.append(f"{arch.description} ({expected_m:.1f}M): {diffs[0]}")
    return None, [(f"UNet ({_count_m(unet):.1f}M parameters) matches no known "
                   f"{'SDXL-family' if family == 'sdxl' else 'SD1.5'} architecture: " + "; ".join(reports),
                   _download_hint_for(family))]


def _download_hint_for(family: str) -> str:
    return DOWNLOADS["sd1.5-img2img"] if family == "sd15" else _SDXL_DOWNLOAD


@lru_cache(maxsize=None)
def expected_ldm_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """LDM key -> shape of a shipped architecture's UNet and VAE."""
    unet_cfg = _load_json(CONFIGS / arch / "unet" / "config.json")
    vae_cfg = _load_json(CONFIGS / arch / "vae" / "config.json")
    return ldm_shapes(_meta_shapes("unet", json.dumps(unet_cfg, sort_keys=True)), unet_cfg,
                      _meta_shapes("vae", json.dumps(vae_cfg, sort_keys=True)), vae_cfg)


def describe(slug: str, artifacts: Mapping[str, Path]) -> list[str]:
    """One line per fact worth showing in ``models check`` for a checkpoint that passed ``check``."""
    path = artifacts.get("checkpoint")
    if path is None or not path.exists():
        return []
    if path.is_file():
        arch, _ = detect_single_file(path, family_of(slug))
        return [f"single file, {arch.description if arch else 'unknown'} architecture "
                f"(UNet {_count_m({k: s for k, s in read_shapes(path).items() if k.startswith(UNET_PREFIX)}):.1f}M "
                "parameters); converted with diffusers' single-file loading"]
    unet = _component_shapes(path / "unet", "diffusion_pytorch_model") or {}
    variants = sorted({"fp16" for d in ("unet", "vae", "text_encoder") if list((path / d).glob("*.fp16.*"))})
    return [f"diffusers folder, UNet {_count_m(unet):.1f}M parameters"
            + (f"; {'/'.join(variants)} weight variants present (used for fp16/bf16 runs)" if variants else "")]


# -- materialize ---------------------------------------------------------------------------------

def materialize(slug: str, artifacts: Mapping[str, Path], out: Path, **_deps: Any) -> Path:
    """The engine's checkpoint directory for ``slug`` written at ``out`` (which must not exist yet)."""
    return materialize_checkpoint(artifacts["checkpoint"], out, family_of(slug))


def materialize_checkpoint(path: Path, out: Path, family: str) -> Path:
    """A diffusers dir is linked entry by entry; a single file is converted into diffusers folders."""
    out.mkdir(parents=True)
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            if not entry.name.startswith("."):
                (out / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        return out
    arch, problems = detect_single_file(path, family)
    if arch is None or problems:
        raise ValueError(f"{path}: " + "; ".join(m for m, _ in problems))
    config_dir = local_config_dir(arch.name, out.parent / ".configs")
    convert_single_file(path, config_dir, out, family)
    return out


def local_config_dir(arch: str, cache: Path) -> Path:
    """The shipped config folder of ``arch``, completed with the CLIP vocabulary where it is not shipped."""
    src = CONFIGS / arch
    if all((src / t / "vocab.json").is_file() for t in ("tokenizer", "tokenizer_2") if (src / t).is_dir()):
        return src
    dst = cache / f"{arch}-v{CODE_VERSION}"
    if (dst / ".complete").is_file():
        return dst
    tmp = cache / f".{arch}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for tok in ("tokenizer", "tokenizer_2"):
        if (tmp / tok).is_dir() and not (tmp / tok / "vocab.json").is_file():
            _write_clip_vocab(tmp / tok)
    (tmp / ".complete").write_text("")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def _write_clip_vocab(out: Path) -> None:
    """CLIP's ``vocab.json`` and ``merges.txt`` from its BPE merges list, built as CLIP builds its vocabulary:
    the 256 byte symbols, the same with ``</w>``, one token per merge (the first 48 894 merges), then
    ``<|startoftext|>`` and ``<|endoftext|>`` — 49 408 tokens, the ids of openai/clip-vit-large-patch14."""
    from diffserve.engine.tiny.checkpoints import _bytes_to_unicode

    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def convert_single_file(path: Path, config_dir: Path, out: Path, family: str) -> None:
    """diffusers' single-file loading with a local config folder, then ``save_pretrained`` (safetensors)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"config": str(config_dir), "local_files_only": True}
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if family == "sdxl":
        kwargs.update(_sdxl_text_encoder_2_if_ambiguous(path, config_dir))
    logger.info("converting single-file checkpoint %s (%s) with the configs of %s", path, cls.__name__, config_dir)
    pipe = cls.from_single_file(str(path), **kwargs)
    pipe.save_pretrained(out, safe_serialization=True)


def _sdxl_text_encoder_2_if_ambiguous(path: Path, config_dir: Path) -> dict[str, Any]:
    """``{"text_encoder_2": model}`` converted from ``conditioner.embedders.1.model.*`` when diffusers' own choice
    would be wrong, else ``{}``.

    diffusers picks the embedder a CLIP model is converted from by the width of its position embedding alone:
    ``conditioner.embedders.0`` (CLIP-L) wins whenever its width equals the model's. In SDXL (768 vs 1280) it
    never does, so real checkpoints take diffusers' path untouched; where both encoders have one width (the tiny
    demo SDXL) ``text_encoder_2`` would be filled from CLIP-L and its projection left unloaded. Then the same
    conversion diffusers runs for SDXL (``convert_open_clip_checkpoint`` on embedder 1) is run here and passed in.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, load_single_file_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    shapes = read_shapes(path)
    clip_l = shapes.get("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight")
    config = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder_2"), local_files_only=True)
    if clip_l is None or clip_l[-1] != config.hidden_size:
        return {}
    logger.info("%s: both text encoders are %d wide; converting text_encoder_2 from conditioner.embedders.1",
                path, config.hidden_size)
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    model = CLIPTextModelWithProjection(config)
    state = convert_open_clip_checkpoint(model, checkpoint, prefix="conditioner.embedders.1.model.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: conditioner.embedders.1 does not fill text_encoder_2 "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return {"text_encoder_2": model.eval()}


# -- tiny artifacts for tests and the demo -------------------------------------------------------

def write_tiny_single_file(path: Path, source: Path) -> Path:
    """An SD1.5 single-file ``.safetensors`` with LDM keys holding the weights of the tiny diffusers checkpoint
    ``source`` (so the two load to the same networks)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from diffserve.engine.models.sd.ldm_keys import to_ldm_state_dict

    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    vae = AutoencoderKL.from_pretrained(source / "vae")
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(to_ldm_state_dict(unet, vae, text_encoder), str(tmp), metadata={"format": "pt"})
    tmp.rename(path)
    return path


def write_tiny_sdxl_single_file(path: Path, source: Path) -> Path:
    """An SDXL single-file ``.safetensors`` in Stability's SGM layout (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``conditioner.embedders.0/1.*``) holding the weights of the tiny SDXL diffusers
    checkpoint ``source`` (so the two load to the same networks)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffserve.engine.models.sd.ldm_keys import to_sdxl_ldm_state_dict

    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    vae = AutoencoderKL.from_pretrained(source / "vae")
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source / "text_encoder_2")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(to_sdxl_ldm_state_dict(unet, vae, text_encoder, text_encoder_2), str(tmp), metadata={"format": "pt"})
    tmp.rename(path)
    return path


def write_tiny(root: Path) -> dict[str, Path]:
    """Tiny artifacts in the publishers' layouts: ``{slug-or-role: path}`` for the three SD slugs.

    ``sd1.5-scifi``: an LDM single file (``scifi-fine-tune.safetensors``); ``sd1.5-img2img``: a
    stable-diffusion-v1-5-style diffusers folder; ``segmind-vega``: a Segmind-Vega-style folder.
    """
    from diffserve.engine.tiny.checkpoints import build_tiny_sd15, build_tiny_sdxl

    root = Path(root)
    sd15 = build_tiny_sd15(root / "stable-diffusion-v1-5")
    vega = build_tiny_sdxl(root / "Segmind-Vega")
    single = root / "scifi-fine-tune.safetensors"
    if not single.is_file() or single.stat().st_mtime < (sd15 / "diffserve_tiny.json").stat().st_mtime:
        write_tiny_single_file(single, sd15)
    return {"sd1.5-scifi": single, "sd1.5-img2img": sd15, "segmind-vega": vega}
