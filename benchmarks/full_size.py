"""Full-size architectures with random weights: real shapes on the GPU, no weights downloaded.

``benchmarks/configs/*.json`` hold the published configs of the networks the five slugs run
(SD1.5 / Segmind-Vega / SDXL UNets, the SD and SDXL VAEs, the CLIP ViT-L and OpenCLIP bigG
text encoders, the SDXL ControlNet, the FLUX.1-schnell transformer); tests check each by its
parameter count, counted on the ``meta`` device so nothing is allocated. Latency does not
depend on weight values, so a module built from its config with random weights times like
the trained one.

Building is done directly on the target device and in the target dtype (``torch.device``
and default-dtype context), so the 11.9B-parameter FLUX transformer never exists in fp32 or
on the host, and the initialisers run on the GPU: building any slug's networks takes seconds.

``full_size_setup`` returns what the engine benchmark needs for a slug: a weight-less
"skeleton" checkpoint directory (model_index.json, component configs, scheduler config and an
offline tokenizer, so ``read_architecture`` and tokenisation work exactly as with a real
checkpoint), ``Components`` over the in-memory modules (the same ``run_component`` as
``TorchComponents``), and the raw diffusers/transformers modules for diffusers' own pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from diffserve.engine.runtime_torch import (
    TextEncoderModule, TorchComponents, UNetModule, VaeDecoderModule, VaeEncoderModule, resolve_device_dtype,
)

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

EXPECTED_PARAMS_M: dict[str, float] = {
    # Millions of parameters, rounded to 0.1M; the four the design names are the published ones.
    "sd15_unet": 859.5,
    "segmind_vega_unet": 745.2,
    "sdxl_unet": 2567.5,
    "flux1_schnell_transformer": 11891.2,  # FLUX.1-dev adds a 10.2M guidance embedder: 11901.4
    "sd_vae": 83.7,
    "sdxl_vae": 83.7,
    "clip_vit_l_text_encoder": 123.1,
    "openclip_bigg_text_encoder": 694.7,
    "sdxl_controlnet": 1251.0,
}

_TRANSFORMERS_CLASSES = {"CLIPTextModel", "CLIPTextModelWithProjection"}


def _slug_architectures() -> dict[str, dict[str, str]]:
    from diffserve.benchmarks.figures import all_figures

    return {slug: dict(fig.full_size) for slug, _, fig in all_figures() if fig.full_size}


SLUG_ARCHITECTURES: dict[str, dict[str, str]] = _slug_architectures()
"""Networks per slug: role -> config name (roles match the checkpoint sub-directories), as each slug's
family states them (``BenchmarkFigures.full_size``). Omni-Zero's IP-Adapter image encoder and face
analysis, and FLUX's T5/CLIP text encoders and 16-channel VAE, have no config here: their stages are
not timed at full size."""


def end_to_end_at_full_size(slug: str) -> bool:
    """Whether every network of ``slug``'s pipeline has a config here, so it runs end to end at full size."""
    from diffserve.benchmarks.figures import figures

    fig = figures(slug)
    return fig is not None and fig.full_size_end_to_end


def _end_to_end_slugs() -> str:
    return ", ".join(slug for slug in SLUG_ARCHITECTURES if end_to_end_at_full_size(slug))


def config_names(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in Path(config_dir or CONFIG_DIR).glob("*.json"))


def load_config(name: str, config_dir: Path | None = None) -> dict[str, Any]:
    path = Path(config_dir or CONFIG_DIR) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no full-size config {name!r} in {path.parent}; have: "
                                f"{', '.join(config_names(config_dir))}")
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_module(name: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32,
                 config_dir: Path | None = None, seed: int = 0) -> nn.Module:
    """The network of config ``name`` with random weights, allocated on ``device`` in ``dtype``."""
    config = load_config(name, config_dir)
    cls_name = config["_class_name"]
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    if str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        if cls_name in _TRANSFORMERS_CLASSES:
            import transformers

            model_type = kwargs.pop("model_type", None)
            cfg = transformers.CLIPTextConfig(**kwargs)
            assert model_type in (None, cfg.model_type), model_type
            module = getattr(transformers, cls_name)(cfg)
        else:
            import diffusers

            module = getattr(diffusers, cls_name).from_config(kwargs)
    return module.eval().requires_grad_(False)


def count_parameters(name: str, config_dir: Path | None = None) -> int:
    """Parameters of config ``name``, counted on the meta device (no memory, no init)."""
    return sum(p.numel() for p in build_module(name, "meta", config_dir=config_dir).parameters())


# -- a skeleton checkpoint and Components over in-memory modules ------------------------------------

def write_skeleton_checkpoint(slug: str, root: Path, config_dir: Path | None = None) -> Path:
    """A weight-less diffusers directory for ``slug``: configs, scheduler config, offline tokenizers."""
    from diffserve.engine.catalog import get_model
    from diffserve.engine.tiny.checkpoints import SD15_SCHEDULER, SDXL_SCHEDULER, build_clip_tokenizer

    arch = SLUG_ARCHITECTURES[slug]
    family = get_model(slug).architecture
    if not end_to_end_at_full_size(slug):
        raise ValueError(f"{slug}: only {_end_to_end_slugs()} run end to end at full size")
    root = Path(root)
    marker = root / "diffserve_full_size.json"
    stamp = {"slug": slug, "configs": {role: load_config(name, config_dir) for role, name in arch.items()}}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return root
    root.mkdir(parents=True, exist_ok=True)
    sdxl = family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1"}
    if sdxl:
        index["force_zeros_for_empty_prompt"] = True
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    for role in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if role in arch:
            (root / role).mkdir(exist_ok=True)
            cfg = {k: v for k, v in stamp["configs"][role].items() if k != "_source"}
            (root / role / "config.json").write_text(json.dumps(cfg, indent=2))
    scheduler = dict(SDXL_SCHEDULER if sdxl else SD15_SCHEDULER)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    # The offline byte-level tokenizer: ids stay inside the real 49408-token vocabulary and a
    # prompt still pads to 77 tokens, so the encoders see the real sequence length.
    build_clip_tokenizer(root / "tokenizer")
    if "text_encoder_2" in arch:
        build_clip_tokenizer(root / "tokenizer_2")
    marker.write_text(json.dumps(stamp))
    return root


class InMemoryTorchComponents(TorchComponents):
    """``TorchComponents`` over modules already in memory (same wrappers, same ``run_component``)."""

    def __init__(self, checkpoint: Path, raw: dict[str, nn.Module], device: torch.device, dtype: torch.dtype,
                 optimizations: str | None = None):
        modules = {"text_encoder": TextEncoderModule(raw["text_encoder"]), "unet": UNetModule(raw["unet"]),
                   "vae_encoder": VaeEncoderModule(raw["vae"]), "vae_decoder": VaeDecoderModule(raw["vae"])}
        if "text_encoder_2" in raw:
            modules["text_encoder_2"] = TextEncoderModule(raw["text_encoder_2"])
        self._setup(checkpoint, device, dtype, modules, optimizations)


@dataclass
class FullSizeSetup:
    slug: str
    device: torch.device
    dtype: torch.dtype
    raw: dict[str, nn.Module]
    """role -> diffusers/transformers module (``text_encoder``, ``unet``, ``vae``, ``controlnet``, ...)."""
    components: InMemoryTorchComponents | None
    """None unless the slug runs end to end at full size (``end_to_end_at_full_size``; else only its networks
    are timed)."""
    checkpoint: Path | None
    parameters_m: dict[str, float] = field(default_factory=dict)
    build_seconds: float = 0.0


def save_checkpoint(slug: str, out_dir: Path, *, device: str | None = None, precision: str | None = None,
                    config_dir: Path | None = None) -> Path:
    """Write a full-size random-weight diffusers checkpoint of ``slug`` (``save_pretrained``).

    For what needs weights on disk — ``diffserve export`` and the Triton repository, ``diffserve
    serve --checkpoint`` — so the serving benchmark runs on the real shapes too. The networks are
    built on ``device`` (fast on a GPU) and saved in ``precision``.
    """
    import diffusers

    from diffserve.engine.catalog import get_model
    from diffserve.engine.checkpoint import read_architecture

    spec = get_model(slug)
    if not end_to_end_at_full_size(slug):
        raise ValueError(f"{slug}: only {_end_to_end_slugs()} have every network's config")
    out_dir = Path(out_dir)
    skeleton = write_skeleton_checkpoint(slug, out_dir / ".skeleton", config_dir)
    dev, dtype = resolve_device_dtype(device, precision, spec.architecture)
    raw = {role: build_module(name, dev, dtype, config_dir, seed=i)
           for i, (role, name) in enumerate(SLUG_ARCHITECTURES[slug].items())}
    config = read_architecture(skeleton)
    from transformers import CLIPTokenizer

    from diffserve.engine.schedulers import make_scheduler

    scheduler = make_scheduler("PNDM" if spec.architecture == "sd15" else "Euler", config.scheduler_config)
    tokenizer = CLIPTokenizer.from_pretrained(skeleton / "tokenizer")
    if spec.architecture == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=raw["vae"], text_encoder=raw["text_encoder"], text_encoder_2=raw["text_encoder_2"],
            tokenizer=tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(skeleton / "tokenizer_2"),
            unet=raw["unet"], scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=raw["vae"], text_encoder=raw["text_encoder"], tokenizer=tokenizer, unet=raw["unet"],
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # The checkpoint keeps its own scheduler config (the slug's API names pick schedulers per request).
    (out_dir / "scheduler" / "scheduler_config.json").write_text(
        (skeleton / "scheduler" / "scheduler_config.json").read_text())
    import shutil

    shutil.rmtree(out_dir / ".skeleton", ignore_errors=True)
    (out_dir / "diffserve_full_size.json").write_text(json.dumps(
        {"slug": slug, "random_weights": True, "precision": str(dtype).replace("torch.", ""),
         "parameters_m": {role: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for role, m in raw.items()}},
        indent=2))
    logger.info("full-size random-weight checkpoint of %s written to %s", slug, out_dir)
    return out_dir


def full_size_setup(slug: str, *, device: str | None, precision: str | None, skeleton_root: Path,
                    config_dir: Path | None = None, optimizations: str | None = None) -> FullSizeSetup:
    """Every network of ``slug`` at full size with random weights, built on ``device``; ``optimizations``
    (an ``diffserve.engine.torch_optimize`` spec, e.g. ``vae=fp16``) for the components built over them."""
    from diffserve.engine.catalog import get_model

    if slug not in SLUG_ARCHITECTURES:
        raise ValueError(f"no full-size architecture for {slug!r}; have: {', '.join(SLUG_ARCHITECTURES)}")
    dev, dtype = resolve_device_dtype(device, precision, get_model(slug).architecture)
    t0 = time.perf_counter()
    raw: dict[str, nn.Module] = {}
    for i, (role, name) in enumerate(SLUG_ARCHITECTURES[slug].items()):
        logger.info("building full-size %s (%s) on %s in %s", role, name, dev, dtype)
        raw[role] = build_module(name, dev, dtype, config_dir, seed=i)
    params = {role: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for role, m in raw.items()}
    components = checkpoint = None
    if end_to_end_at_full_size(slug):
        checkpoint = write_skeleton_checkpoint(slug, Path(skeleton_root) / slug, config_dir)
        components = InMemoryTorchComponents(checkpoint, raw, dev, dtype, optimizations=optimizations)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return FullSizeSetup(slug=slug, device=dev, dtype=dtype, raw=raw, components=components, checkpoint=checkpoint,
                         parameters_m=params, build_seconds=time.perf_counter() - t0)
