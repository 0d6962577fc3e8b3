"""In-process torch implementation of ``Components`` from a local diffusers checkpoint.

Loads each network with ``from_pretrained(<local dir>/<component>)`` — the same code path for
the tiny random-weight test checkpoints and for real deployments. fp32 on CPU; fp16 or bf16 on
GPU. Attention uses PyTorch SDPA (diffusers' default processor on torch 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.components import ModelConfig, TextEncoderOutput, read_model_config

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device_dtype(device: str | None, precision: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision is None:
        precision = "fp16" if dev.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    if dev.type == "cpu" and dtype is torch.float16:
        logger.warning("fp16 is slow and inexact on CPU; using fp32")
        dtype = torch.float32
    return dev, dtype


class TorchComponents:
    """``Components`` backed by diffusers/transformers torch modules."""

    def __init__(self, checkpoint: str | Path, *, device: str | None = None, precision: str | None = None,
                 load_vae_encoder: bool = True):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.checkpoint = Path(checkpoint)
        self.config: ModelConfig = read_model_config(self.checkpoint)
        self.device, self.dtype = resolve_device_dtype(device, precision)
        root = self.checkpoint
        kw = {"torch_dtype": self.dtype}
        self._tokenizers = [CLIPTokenizer.from_pretrained(root / "tokenizer")]
        encoder_classes = [CLIPTextModel]
        if self.config.num_text_encoders == 2:
            self._tokenizers.append(CLIPTokenizer.from_pretrained(root / "tokenizer_2"))
            encoder_classes.append(CLIPTextModelWithProjection)
        dirs = ["text_encoder", "text_encoder_2"]
        self._text_encoders = [
            cls.from_pretrained(root / d, **kw).to(self.device).eval() for cls, d in zip(encoder_classes, dirs)
        ]
        self._unet = UNet2DConditionModel.from_pretrained(root / "unet", **kw).to(self.device).eval()
        # The SD/SDXL VAEs overflow in fp16 (config.force_upcast): keep the VAE in fp32 then.
        vae_dtype = self.dtype
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32)
        if self.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae_dtype = torch.float32
        self._vae = vae.to(self.device, vae_dtype).eval()
        self.vae_dtype = vae_dtype
        self._has_vae_encoder = load_vae_encoder
        logger.info("loaded %s (%s) on %s in %s", root, self.config.family, self.device, self.dtype)

    # -- Components protocol -------------------------------------------------------------------

    def tokenizer(self, index: int):
        return self._tokenizers[index]

    @torch.inference_mode()
    def text_encoder(self, index: int, input_ids: torch.Tensor) -> TextEncoderOutput:
        out = self._text_encoders[index](input_ids.to(self.device), output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return TextEncoderOutput(
            last_hidden_state=out.last_hidden_state.float(),
            penultimate_hidden_state=out.hidden_states[-2].float(),
            pooled=pooled.float(),
        )

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds.to(self.device, self.dtype),
                     "time_ids": time_ids.to(self.device, self.dtype)}
        out = self._unet(
            sample.to(self.device, self.dtype),
            timestep.to(self.device),
            encoder_hidden_states=encoder_hidden_states.to(self.device, self.dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return out.float()

    @torch.inference_mode()
    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        vae = self._vae
        h = vae.encoder(image.to(self.device, self.vae_dtype))
        if vae.quant_conv is not None:
            h = vae.quant_conv(h)
        return h.float()

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(latents.to(self.device, self.vae_dtype), return_dict=False)[0].float()

    # -- access for exporters and reference comparisons ------------------------------------------

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"text_encoder": self._text_encoders[0], "unet": self._unet, "vae": self._vae}
        if len(self._text_encoders) == 2:
            mods["text_encoder_2"] = self._text_encoders[1]
        return mods
