"""The ``Components`` protocol: what a denoising pipeline may ask of the networks.

Pipelines in ``engine/pipelines/`` own the math (tokenisation, guidance, schedulers, noise) and
call the networks only through this small protocol, so the same loop runs with in-process
torch modules, ONNX Runtime sessions, TensorRT engines or Triton BLS calls. Every method takes
and returns float32 CPU-or-device torch tensors; an implementation casts to its own precision
inside. ``config`` is the checkpoint's ``diffserve.engine.checkpoint.CheckpointArchitecture``, read once from the local
diffusers directory by every runtime alike; ``NamedTensorComponents`` adapts any runtime that
maps (component, named tensors) -> named tensors to this protocol.

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

from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from diffserve.engine.checkpoint import CheckpointArchitecture, load_tokenizer, read_architecture


class TextEncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    """[B, T, D] after the final layer norm (SD1.5 conditioning)."""
    penultimate_hidden_state: torch.Tensor
    """[B, T, D] output of the second-to-last layer (SDXL conditioning)."""
    pooled: torch.Tensor
    """[B, P]: projected text embeds for a projection model, pooler output otherwise."""


@runtime_checkable
class Components(Protocol):
    config: CheckpointArchitecture
    device: torch.device
    condition_mode: str
    """OminiControl's condition mode (``diffserve.engine.options.OMINICONTROL_CONDITION_MODES``)."""

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
                        text_embeds: torch.Tensor, time_ids: torch.Tensor, identity_tokens: torch.Tensor,
                        style_tokens: torch.Tensor, composition_tokens: torch.Tensor, ip_scales: torch.Tensor,
                        identity_image: torch.Tensor, depth_image: torch.Tensor,
                        controlnet_scales: torch.Tensor) -> torch.Tensor:
        """Noise prediction with IdentityNet and depth ControlNet residuals and IP-Adapter attention.

        Every input holds one row per batch row (so a step batcher can concatenate requests): the
        adapters' tokens (``IPTokens``' fields, [B, tokens, cross_attention_dim]), ``ip_scales`` [B, 3]
        (identity, style, composition), ``controlnet_scales`` [B, 2] (identity, depth), control images
        [B, 3, H, W] in [0, 1].
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
    TensorRT, Triton BLS); tensor names are those of ``diffserve.engine.descriptors``. Tokenizers are
    loaded from the checkpoint directory, which every runtime keeps for its configs.
    """

    device_scheduler: bool = False
    """Pipelines run the scheduler as precomputed weights on the device (``diffserve.engine.planned_loop``)."""
    condition_mode: str = "joint"
    """OminiControl's condition mode (``EngineOptions.ominicontrol_condition``), set by whoever builds these."""

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu"):
        self.checkpoint = Path(checkpoint)
        self.config: CheckpointArchitecture = read_architecture(self.checkpoint)
        self.device = torch.device(device)
        self._tokenizers: dict[int, Any] = {}

    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokenizer(self, index: int) -> Any:
        if index not in self._tokenizers:
            self._tokenizers[index] = load_tokenizer(self.checkpoint, self.config.family, index)
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

    def controlnet_unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, identity_tokens,
                        style_tokens, composition_tokens, ip_scales, identity_image, depth_image, controlnet_scales):
        return self.run_component("controlnet_unet", {
            "sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
            "text_embeds": text_embeds, "time_ids": time_ids, "identity_tokens": identity_tokens,
            "style_tokens": style_tokens, "composition_tokens": composition_tokens, "ip_scales": ip_scales,
            "identity_image": identity_image, "depth_image": depth_image, "controlnet_scales": controlnet_scales,
        })["noise_pred"]

    def face_detector(self, image):
        out = self.run_component("face_detector", {"image": image})
        return [out[name] for name in self.FACE_DETECTOR_OUTPUTS]

    def face_recognizer(self, faces):
        return self.run_component("face_recognizer", {"faces": faces})["embedding"]

    def depth_estimator(self, pixel_values):
        return self.run_component("depth_estimator", {"pixel_values": pixel_values})["predicted_depth"]
