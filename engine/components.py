"""The ``Components`` protocol: what a denoising pipeline may ask of the networks.

Pipelines in ``engine/pipelines/`` own the math (tokenisation, guidance, schedulers, noise) and
call the networks only through this small protocol, so the same loop runs with in-process
torch modules, ONNX Runtime sessions, TensorRT engines or Triton BLS calls. Every method takes
and returns float32 CPU-or-device torch tensors; an implementation casts to its own precision
inside. ``ModelConfig`` holds the facts a pipeline needs from the checkpoint's config files
(read once from the local diffusers directory, by every runtime alike).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch


class TextEncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    """[B, T, D] after the final layer norm (SD1.5 conditioning)."""
    penultimate_hidden_state: torch.Tensor
    """[B, T, D] output of the second-to-last layer (SDXL conditioning)."""
    pooled: torch.Tensor
    """[B, P]: projected text embeds for a projection model, pooler output otherwise."""


@dataclass(frozen=True)
class ModelConfig:
    """Checkpoint facts the pipelines read; built by ``read_model_config``."""

    family: str
    """``sd15`` or ``sdxl``."""
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


@runtime_checkable
class Components(Protocol):
    config: ModelConfig
    device: torch.device

    def tokenizer(self, index: int) -> Any:
        """The CLIP tokenizer of text encoder ``index`` (0, or 1 for SDXL's second encoder)."""

    def text_encoder(self, index: int, input_ids: torch.Tensor) -> TextEncoderOutput:
        """Encode int64 token ids [B, T]."""

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise prediction. ``timestep`` is float32 [B]; SDXL passes pooled ``text_embeds`` and ``time_ids``."""

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        """Moments (mean ‖ logvar along channels) of the latent distribution for images in [-1, 1]."""

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from unscaled latents."""


class NamedTensorComponents:
    """``Components`` over any runtime that maps (component, named inputs) -> named outputs.

    Subclasses implement ``run_component`` for one runtime (torch modules, ONNX Runtime,
    TensorRT, Triton BLS); tensor names are those of ``engine.descriptors``. Tokenizers are
    loaded from the checkpoint directory, which every runtime keeps for its configs.
    """

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu"):
        self.checkpoint = Path(checkpoint)
        self.config: ModelConfig = read_model_config(self.checkpoint)
        self.device = torch.device(device)
        self._tokenizers: dict[int, Any] = {}

    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokenizer(self, index: int) -> Any:
        if index not in self._tokenizers:
            from transformers import CLIPTokenizer

            sub = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
            self._tokenizers[index] = CLIPTokenizer.from_pretrained(self.checkpoint / sub)
        return self._tokenizers[index]

    def text_encoder(self, index: int, input_ids: torch.Tensor) -> TextEncoderOutput:
        name = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        out = self.run_component(name, {"input_ids": input_ids})
        return TextEncoderOutput(out["last_hidden_state"], out["penultimate_hidden_state"], out["pooled"])

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if text_embeds is not None:
            inputs.update(text_embeds=text_embeds, time_ids=time_ids)
        return self.run_component("unet", inputs)["noise_pred"]

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.run_component("vae_encoder", {"image": image})["moments"]

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.run_component("vae_decoder", {"latents": latents})["image"]


def _load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_model_config(checkpoint: str | Path) -> ModelConfig:
    """Read a local diffusers checkpoint directory's configs (no weights are touched)."""
    root = Path(checkpoint)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers checkpoint directory (no model_index.json)")
    index = _load_json(root / "model_index.json")
    unet = _load_json(root / "unet" / "config.json")
    vae = _load_json(root / "vae" / "config.json")
    scheduler = _load_json(root / "scheduler" / "scheduler_config.json")
    encoders = ["text_encoder"] + (["text_encoder_2"] if (root / "text_encoder_2").is_dir() else [])
    enc_cfgs = [_load_json(root / e / "config.json") for e in encoders]
    tok_cfg_path = root / "tokenizer" / "tokenizer_config.json"
    max_len = int(_load_json(tok_cfg_path).get("model_max_length", 77)) if tok_cfg_path.is_file() else 77
    if max_len > 10_000:  # some tokenizer configs store "infinity"
        max_len = 77
    family = "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd15"
    return ModelConfig(
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
    )
