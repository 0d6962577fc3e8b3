"""Reading a local diffusers checkpoint directory: its layout and the facts pipelines need from it.

This module owns what a checkpoint directory looks like on disk — ``model_index.json``, the
``unet/`` or ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/`` and ``scheduler/``
configs, and the ``condition_lora/`` folder OminiControl adds to a FLUX directory — and turns it
into a ``CheckpointArchitecture`` that every runtime (torch, ONNX Runtime, TensorRT, Triton BLS) reads the
same way. Only configs, tokenizers and file names are touched here, never network weights, so
reading a checkpoint stays cheap. Omni-Zero's additions to an SDXL directory have their own
reader, ``diffserve.engine.models.omni_zero.checkpoint``, which ``read_architecture`` calls for SDXL checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffserve.engine.models.omni_zero.checkpoint import OmniZeroConfig, read_omni_zero_config

CONDITION_LORA_DIR = "condition_lora"
"""Folder of a FLUX checkpoint holding the OminiControl subject LoRA (one ``.safetensors`` file)."""

# FluxPipeline's T5 default; FLUX.1-schnell's model card suggests 256, the OminiControl reference uses 512.
FLUX_MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class TransformerConfig:
    """Facts of a FLUX transformer (``transformer/config.json``)."""

    in_channels: int
    """Packed token width: 4 x the VAE's latent channels (2x2 patches)."""
    num_layers: int
    """Double-stream (joint text/image) blocks."""
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    """Width of the T5 sequence embeddings."""
    pooled_projection_dim: int
    """Width of the CLIP pooled embedding."""
    guidance_embeds: bool

    @property
    def num_blocks(self) -> int:
        """Blocks with an attention layer (double + single): one condition K/V pair each."""
        return self.num_layers + self.num_single_layers


@dataclass(frozen=True)
class CheckpointArchitecture:
    """A checkpoint's architecture as the pipelines read it (family, latent and tokenizer sizes, scheduler
    config, FLUX transformer and Omni-Zero parts); built by ``read_architecture``."""

    family: str
    """``sd15``, ``sdxl`` or ``flux``."""
    num_text_encoders: int
    vae_scale_factor: int
    vae_scaling_factor: float
    latent_channels: int
    tokenizer_max_length: int
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool = False
    addition_time_embed_dim: int | None = None
    text_encoder_projection_dim: int | None = None
    vae_latents_mean: tuple[float, ...] | None = None
    vae_latents_std: tuple[float, ...] | None = None
    text_hidden_sizes: tuple[int, ...] = field(default_factory=tuple)
    unet_cross_attention_dim: int = 0
    sample_size: int = 64
    """Default latent size (UNet sample size; FLUX: 1024 px / vae_scale_factor)."""
    vae_shift_factor: float | None = None
    """FLUX VAE: latents are ``(z - shift) * scaling`` (SD VAEs have no shift)."""
    transformer: TransformerConfig | None = None
    """FLUX family only."""
    max_sequence_length: int = 0
    """FLUX: T5 tokens per prompt (512 as in the reference pipelines, or the tokenizer's own limit)."""
    omni_zero: OmniZeroConfig | None = None
    """Omni-Zero checkpoints only: image encoder, adapters, face and depth models (``diffserve.engine.models.omni_zero.checkpoint``)."""


def read_architecture(checkpoint: str | Path) -> CheckpointArchitecture:
    """Read a local diffusers checkpoint directory's configs (no weights are touched)."""
    root = Path(checkpoint)
    if not (root / "model_index.json").is_file():
        hint = (" (a single-file checkpoint: name it in a models.toml, `--models FILE`, which converts it)"
                if root.is_file() else "")
        raise FileNotFoundError(f"{root} is not a diffusers checkpoint directory (no model_index.json){hint}")
    if (root / "transformer" / "config.json").is_file() and not (root / "unet").is_dir():
        return _read_flux_config(root)
    index = _load_json(root / "model_index.json")
    unet = _load_json(root / "unet" / "config.json")
    vae = _load_json(root / "vae" / "config.json")
    scheduler = _load_json(root / "scheduler" / "scheduler_config.json")
    encoders = ["text_encoder"] + (["text_encoder_2"] if (root / "text_encoder_2").is_dir() else [])
    enc_cfgs = [_load_json(root / e / "config.json") for e in encoders]
    max_len = _tokenizer_max_length(tokenizer_dir(root, 0), 77)
    family = "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd15"
    return CheckpointArchitecture(
        family=family,
        num_text_encoders=len(encoders),
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        latent_channels=int(vae.get("latent_channels", 4)),
        tokenizer_max_length=max_len,
        scheduler_config=scheduler,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")),
        addition_time_embed_dim=unet.get("addition_time_embed_dim"),
        text_encoder_projection_dim=enc_cfgs[-1].get("projection_dim") if family == "sdxl" else None,
        vae_latents_mean=tuple(vae["latents_mean"]) if vae.get("latents_mean") else None,
        vae_latents_std=tuple(vae["latents_std"]) if vae.get("latents_std") else None,
        text_hidden_sizes=tuple(int(c["hidden_size"]) for c in enc_cfgs),
        unet_cross_attention_dim=int(unet["cross_attention_dim"]) if not isinstance(
            unet["cross_attention_dim"], list) else int(unet["cross_attention_dim"][0]),
        sample_size=int(unet.get("sample_size", 64)),
        omni_zero=read_omni_zero_config(root) if family == "sdxl" else None,
    )


def tokenizer_dir(checkpoint: str | Path, index: int) -> Path:
    """Folder of the tokenizer of text encoder ``index``: ``tokenizer/``, then ``tokenizer_2/``."""
    return Path(checkpoint) / ("tokenizer" if index == 0 else f"tokenizer_{index + 1}")


def load_tokenizer(checkpoint: str | Path, family: str, index: int) -> Any:
    """The tokenizer of text encoder ``index``: CLIP's, except FLUX's second, T5's SentencePiece (Unigram) one."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    cls = T5TokenizerFast if (family == "flux" and index == 1) else CLIPTokenizer
    return cls.from_pretrained(tokenizer_dir(checkpoint, index))


def weights_variant(component_dir: str | Path, dtype: Any) -> str | None:
    """``"fp16"`` when a component's published fp16 weights (``*.fp16.safetensors``) should be loaded.

    They are when the run is fp16/bf16 (half the bytes to read; bf16 runs cast them) or when a
    folder ships only the fp16 files; an fp32 run loads the full-precision files when both are there.
    """
    import torch

    d = Path(component_dir)
    has_fp16 = any(d.glob("*.fp16.safetensors")) or any(d.glob("*.fp16-*-of-*.safetensors"))
    if not has_fp16:
        return None
    has_plain = any(p for p in d.glob("*.safetensors") if ".fp16" not in p.name) or any(d.glob("*.bin"))
    return "fp16" if dtype in (torch.float16, torch.bfloat16) or not has_plain else None


def find_condition_lora(checkpoint: str | Path) -> Path | None:
    """The one ``.safetensors`` file under ``<checkpoint>/condition_lora/``, if any."""
    files = sorted((Path(checkpoint) / CONDITION_LORA_DIR).glob("*.safetensors"))
    if len(files) > 1:
        raise ValueError(f"{Path(checkpoint) / CONDITION_LORA_DIR} holds {len(files)} .safetensors files; "
                         "keep exactly one, or pass the LoRA path explicitly")
    return files[0] if files else None


def _load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tokenizer_max_length(path: Path, default: int) -> int:
    cfg = path / "tokenizer_config.json"
    max_len = int(_load_json(cfg).get("model_max_length", default)) if cfg.is_file() else default
    return default if max_len > 10_000 else max_len  # some tokenizer configs store "infinity"


def _read_flux_config(root: Path) -> CheckpointArchitecture:
    t = _load_json(root / "transformer" / "config.json")
    vae = _load_json(root / "vae" / "config.json")
    clip = _load_json(root / "text_encoder" / "config.json")
    t5 = _load_json(root / "text_encoder_2" / "config.json")
    transformer = TransformerConfig(
        in_channels=int(t.get("in_channels", 64)),
        num_layers=int(t.get("num_layers", 19)),
        num_single_layers=int(t.get("num_single_layers", 38)),
        num_attention_heads=int(t.get("num_attention_heads", 24)),
        attention_head_dim=int(t.get("attention_head_dim", 128)),
        joint_attention_dim=int(t.get("joint_attention_dim", 4096)),
        pooled_projection_dim=int(t.get("pooled_projection_dim", 768)),
        guidance_embeds=bool(t.get("guidance_embeds", False)),
    )
    latent_channels = int(vae.get("latent_channels", 16))
    if transformer.in_channels != 4 * latent_channels:
        raise ValueError(f"{root}: transformer in_channels {transformer.in_channels} is not 4 x the VAE's "
                         f"{latent_channels} latent channels (2x2 packing)")
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return CheckpointArchitecture(
        family="flux",
        num_text_encoders=2,
        vae_scale_factor=vae_scale_factor,
        vae_scaling_factor=float(vae.get("scaling_factor", 0.3611)),
        latent_channels=latent_channels,
        tokenizer_max_length=_tokenizer_max_length(tokenizer_dir(root, 0), 77),
        scheduler_config=_load_json(root / "scheduler" / "scheduler_config.json"),
        text_hidden_sizes=(int(clip["hidden_size"]), int(t5["d_model"])),
        sample_size=1024 // vae_scale_factor,
        vae_shift_factor=float(vae.get("shift_factor") or 0.0),
        transformer=transformer,
        max_sequence_length=min(FLUX_MAX_SEQUENCE_LENGTH,
                                _tokenizer_max_length(tokenizer_dir(root, 1), FLUX_MAX_SEQUENCE_LENGTH)),
    )
