"""The ``Components`` protocol: what a denoising pipeline may ask of the networks.

Pipelines in ``engine/pipelines/`` own the math (tokenisation, guidance, schedulers, noise) and
call the networks only through this small protocol, so the same loop runs with in-process
torch modules, ONNX Runtime sessions, TensorRT engines or Triton BLS calls. Every method takes
and returns float32 CPU-or-device torch tensors; an implementation casts to its own precision
inside. ``ModelConfig`` holds the facts a pipeline needs from the checkpoint's config files
(read once from the local diffusers directory, by every runtime alike).

The FLUX family (``flux``) adds a T5 sequence encoder and a ``transformer`` on packed 2x2 latent
tokens, which for OminiControl also takes the condition tokens (joint attention, the default). The
opt-in cached mode instead runs ``condition_kv`` once (condition tokens into per-block keys/values)
and ``transformer_cached`` at every step. All stay plain tensors in and out, so the condition path
runs the same way in-process, in ONNX Runtime and over Triton BLS.

Omni-Zero (an SDXL checkpoint with ``config.omni_zero``) adds a CLIP ``image_encoder``, the
adapters' ``ip_projection`` (run once per request), ``controlnet_unet`` (IdentityNet, depth
ControlNet and the IP-Adapter UNet in one step, strengths as per-row tensors), the ONNX
``face_detector``/``face_recognizer`` of an insightface pack, and a ``depth_estimator``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from engine.omni_zero_checkpoint import OmniZeroConfig, read_omni_zero_config


class TextEncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    """[B, T, D] after the final layer norm (SD1.5 conditioning)."""
    penultimate_hidden_state: torch.Tensor
    """[B, T, D] output of the second-to-last layer (SDXL conditioning)."""
    pooled: torch.Tensor
    """[B, P]: projected text embeds for a projection model, pooler output otherwise."""


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
class ModelConfig:
    """Checkpoint facts the pipelines read; built by ``read_model_config``."""

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
    """Omni-Zero checkpoints only: image encoder, adapters, face and depth models (``engine.omni_zero_checkpoint``)."""


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

    # -- FLUX family --

    def t5_text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        """T5 last hidden state [B, T, joint_attention_dim] of int64 token ids [B, T]."""

    def transformer(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        condition: "ConditionTokens | ConditionKV | None" = None,
    ) -> torch.Tensor:
        """FLUX velocity for packed latents [B, N, C]; ``timestep`` is sigma (t / 1000) [B]; ids are [N, 3].

        OminiControl's condition comes as tokens (joint attention) or as cached keys/values.
        """

    def condition_kv(
        self,
        condition_latents: torch.Tensor,
        condition_ids: torch.Tensor,
        pooled_projections: torch.Tensor,
        lora_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, blocks, Nc, heads, head_dim] of packed condition tokens, per attention block."""

    # -- Omni-Zero (SDXL + IP-Adapters + ControlNets) --

    def image_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP vision penultimate hidden states [B, tokens, hidden] of normalised pixels [B, 3, S, S]."""

    def ip_projection(self, face_embedding: torch.Tensor, style_hidden_states: torch.Tensor,
                      composition_hidden_states: torch.Tensor) -> "IPTokens":
        """Adapter tokens: the face adapter's of [B, 1, 512] embeddings, the Plus adapter's of image hidden states."""

    def controlnet_unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        text_embeds: torch.Tensor, time_ids: torch.Tensor, tokens: "IPTokens", ip_scales: torch.Tensor,
                        identity_image: torch.Tensor, depth_image: torch.Tensor,
                        controlnet_scales: torch.Tensor) -> torch.Tensor:
        """Noise prediction with IdentityNet and depth ControlNet residuals and IP-Adapter attention.

        ``ip_scales`` [B, 3] (identity, style, composition) and ``controlnet_scales`` [B, 2] (identity,
        depth) hold one row per batch row; control images are [B, 3, H, W] in [0, 1].
        """

    def face_detector(self, image: torch.Tensor) -> list[torch.Tensor]:
        """SCRFD outputs (scores, boxes, keypoints at strides 8, 16, 32) of a letterboxed [1, 3, S, S] image."""

    def face_recognizer(self, faces: torch.Tensor) -> torch.Tensor:
        """Recognition embeddings [B, 512] of aligned faces [B, 3, 112, 112]."""

    def depth_estimator(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Depth [B, H, W] of normalised pixels [B, 3, H, W]."""


class ConditionTokens(NamedTuple):
    """OminiControl's condition for a joint-attention ``transformer`` call."""

    latents: torch.Tensor
    """[B, Nc, 4C] packed condition tokens."""
    ids: torch.Tensor
    """[Nc, 3] their RoPE ids (shifted by the position delta)."""
    lora_scale: torch.Tensor
    """[B, 1]: scale of the subject LoRA on the condition tokens."""
    bias: torch.Tensor
    """[B, 1]: added to the attention logits between condition and other tokens, log(condition strength)."""


class ConditionKV(NamedTuple):
    """What a cached-mode ``transformer_cached`` call needs from OminiControl's condition tokens."""

    key: torch.Tensor
    """[B, blocks, Nc, heads, head_dim], RoPE already applied."""
    value: torch.Tensor
    bias: torch.Tensor
    """[B, 1]: added to the attention logits of the condition keys, log(condition strength)."""


class IPTokens(NamedTuple):
    """Omni-Zero's image-prompt tokens, [B, tokens, cross_attention_dim] each."""

    identity: torch.Tensor
    style: torch.Tensor
    composition: torch.Tensor


class NamedTensorComponents:
    """``Components`` over any runtime that maps (component, named inputs) -> named outputs.

    Subclasses implement ``run_component`` for one runtime (torch modules, ONNX Runtime,
    TensorRT, Triton BLS); tensor names are those of ``engine.descriptors``. Tokenizers are
    loaded from the checkpoint directory, which every runtime keeps for its configs.
    """

    device_scheduler: bool = False
    """Pipelines run the scheduler as precomputed weights on the device (``engine.scheduler_plan``)."""

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu"):
        self.checkpoint = Path(checkpoint)
        self.config: ModelConfig = read_model_config(self.checkpoint)
        self.device = torch.device(device)
        self._tokenizers: dict[int, Any] = {}

    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokenizer(self, index: int) -> Any:
        if index not in self._tokenizers:
            from transformers import CLIPTokenizer, T5TokenizerFast

            sub = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
            # FLUX's second tokenizer is T5's SentencePiece (Unigram) one.
            cls = T5TokenizerFast if (self.config.family == "flux" and index == 1) else CLIPTokenizer
            self._tokenizers[index] = cls.from_pretrained(self.checkpoint / sub)
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

    def t5_text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.run_component("text_encoder_2", {"input_ids": input_ids})["last_hidden_state"]

    def transformer(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
                    condition=None):
        batch = hidden_states.shape[0]
        # Position ids carry a batch axis on the wire (Triton batches along axis 0); rows are identical.
        inputs = {
            "hidden_states": hidden_states,
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            "img_ids": img_ids.expand(batch, *img_ids.shape),
            "txt_ids": txt_ids.expand(batch, *txt_ids.shape),
        }
        if isinstance(condition, ConditionKV):
            inputs.update(condition_key=condition.key, condition_value=condition.value,
                          condition_bias=condition.bias)
            return self.run_component("transformer_cached", inputs)["noise_pred"]
        if condition is not None:
            inputs.update(condition_latents=condition.latents,
                          condition_ids=condition.ids.expand(batch, *condition.ids.shape),
                          lora_scale=condition.lora_scale, condition_bias=condition.bias)
        return self.run_component("transformer", inputs)["noise_pred"]

    def condition_kv(self, condition_latents, condition_ids, pooled_projections, lora_scale):
        batch = condition_latents.shape[0]
        out = self.run_component("condition_kv", {
            "condition_latents": condition_latents,
            "condition_ids": condition_ids.expand(batch, *condition_ids.shape),
            "pooled_projections": pooled_projections,
            "lora_scale": lora_scale,
        })
        return out["condition_key"], out["condition_value"]

    FACE_DETECTOR_OUTPUTS = tuple(f"{kind}_{stride}" for kind in ("scores", "boxes", "keypoints")
                                  for stride in (8, 16, 32))

    def image_encoder(self, pixel_values):
        return self.run_component("image_encoder", {"pixel_values": pixel_values})["hidden_states"]

    def ip_projection(self, face_embedding, style_hidden_states, composition_hidden_states):
        out = self.run_component("ip_projection", {
            "face_embedding": face_embedding,
            "style_hidden_states": style_hidden_states,
            "composition_hidden_states": composition_hidden_states,
        })
        return IPTokens(out["identity_tokens"], out["style_tokens"], out["composition_tokens"])

    def controlnet_unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, tokens, ip_scales,
                        identity_image, depth_image, controlnet_scales):
        return self.run_component("controlnet_unet", {
            "sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
            "text_embeds": text_embeds, "time_ids": time_ids, "identity_tokens": tokens.identity,
            "style_tokens": tokens.style, "composition_tokens": tokens.composition, "ip_scales": ip_scales,
            "identity_image": identity_image, "depth_image": depth_image, "controlnet_scales": controlnet_scales,
        })["noise_pred"]

    def face_detector(self, image):
        out = self.run_component("face_detector", {"image": image})
        return [out[name] for name in self.FACE_DETECTOR_OUTPUTS]

    def face_recognizer(self, faces):
        return self.run_component("face_recognizer", {"faces": faces})["embedding"]

    def depth_estimator(self, pixel_values):
        return self.run_component("depth_estimator", {"pixel_values": pixel_values})["predicted_depth"]


def _load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_model_config(checkpoint: str | Path) -> ModelConfig:
    """Read a local diffusers checkpoint directory's configs (no weights are touched)."""
    root = Path(checkpoint)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers checkpoint directory (no model_index.json)")
    if (root / "transformer" / "config.json").is_file() and not (root / "unet").is_dir():
        return _read_flux_config(root)
    index = _load_json(root / "model_index.json")
    unet = _load_json(root / "unet" / "config.json")
    vae = _load_json(root / "vae" / "config.json")
    scheduler = _load_json(root / "scheduler" / "scheduler_config.json")
    encoders = ["text_encoder"] + (["text_encoder_2"] if (root / "text_encoder_2").is_dir() else [])
    enc_cfgs = [_load_json(root / e / "config.json") for e in encoders]
    max_len = _tokenizer_max_length(root / "tokenizer", 77)
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
        omni_zero=read_omni_zero_config(root) if family == "sdxl" else None,
    )


def _tokenizer_max_length(path: Path, default: int) -> int:
    cfg = path / "tokenizer_config.json"
    max_len = int(_load_json(cfg).get("model_max_length", default)) if cfg.is_file() else default
    return default if max_len > 10_000 else max_len  # some tokenizer configs store "infinity"


# FluxPipeline's T5 default; FLUX.1-schnell's model card suggests 256, the OminiControl reference uses 512.
FLUX_MAX_SEQUENCE_LENGTH = 512


def _read_flux_config(root: Path) -> ModelConfig:
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
    return ModelConfig(
        family="flux",
        num_text_encoders=2,
        vae_scale_factor=vae_scale_factor,
        vae_scaling_factor=float(vae.get("scaling_factor", 0.3611)),
        latent_channels=latent_channels,
        tokenizer_max_length=_tokenizer_max_length(root / "tokenizer", 77),
        scheduler_config=_load_json(root / "scheduler" / "scheduler_config.json"),
        text_hidden_sizes=(int(clip["hidden_size"]), int(t5["d_model"])),
        sample_size=1024 // vae_scale_factor,
        vae_shift_factor=float(vae.get("shift_factor") or 0.0),
        transformer=transformer,
        max_sequence_length=min(FLUX_MAX_SEQUENCE_LENGTH,
                                _tokenizer_max_length(root / "tokenizer_2", FLUX_MAX_SEQUENCE_LENGTH)),
    )
