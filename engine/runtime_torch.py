"""In-process torch implementation of ``Components`` from a local diffusers checkpoint.

Loads each network with ``from_pretrained(<local dir>/<component>)`` — the same code path for
the tiny random-weight test checkpoints and for real deployments — and wraps it in a small
module whose positional inputs and tuple outputs follow ``engine.descriptors``; ONNX export
traces these same wrappers. fp32 on CPU; fp16 or bf16 on GPU. Attention uses PyTorch SDPA
(diffusers' default processor on torch 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from engine.components import NamedTensorComponents
from engine.descriptors import component_descriptors

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


class TextEncoderModule(nn.Module):
    """input_ids -> (last_hidden_state, penultimate_hidden_state, pooled)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class UNetModule(nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


class VaeEncoderModule(nn.Module):
    """image in [-1, 1] -> posterior moments (mean ‖ logvar)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        h = self.vae.encoder(image)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


class VaeDecoderModule(nn.Module):
    """unscaled latents -> image in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def load_component_modules(checkpoint: str | Path, dtype: torch.dtype = torch.float32,
                           components: list[str] | None = None) -> dict[str, nn.Module]:
    """The wrapper modules of a local diffusers checkpoint, in eval mode on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(checkpoint)
    kw = {"torch_dtype": dtype}
    wanted = set(components or ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"])
    mods: dict[str, nn.Module] = {}
    if "text_encoder" in wanted:
        mods["text_encoder"] = TextEncoderModule(CLIPTextModel.from_pretrained(root / "text_encoder", **kw))
    if "text_encoder_2" in wanted and (root / "text_encoder_2").is_dir():
        mods["text_encoder_2"] = TextEncoderModule(
            CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", **kw))
    if "unet" in wanted:
        mods["unet"] = UNetModule(UNet2DConditionModel.from_pretrained(root / "unet", **kw))
    if wanted & {"vae_encoder", "vae_decoder"}:
        vae = AutoencoderKL.from_pretrained(root / "vae", **kw)
        if "vae_encoder" in wanted:
            mods["vae_encoder"] = VaeEncoderModule(vae)
        if "vae_decoder" in wanted:
            mods["vae_decoder"] = VaeDecoderModule(vae)
    return {k: m.eval() for k, m in mods.items()}


class TorchComponents(NamedTensorComponents):
    """``Components`` backed by diffusers/transformers torch modules."""

    def __init__(self, checkpoint: str | Path, *, device: str | None = None, precision: str | None = None):
        dev, self.dtype = resolve_device_dtype(device, precision)
        super().__init__(checkpoint, dev)
        self.descriptors = component_descriptors(self.config)
        self.modules = {k: m.to(self.device) for k, m in load_component_modules(self.checkpoint, self.dtype).items()}
        # The SD/SDXL VAEs overflow in fp16 (config.force_upcast): keep the VAE in fp32 then.
        vae = self.modules["vae_decoder"].vae
        self.vae_dtype = self.dtype
        if self.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)
            self.vae_dtype = torch.float32
        logger.info("loaded %s (%s) on %s in %s", self.checkpoint, self.config.family, self.device, self.dtype)

    @torch.inference_mode()
    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        desc = self.descriptors[component]
        dtype = self.vae_dtype if component.startswith("vae") else self.dtype
        args = []
        for spec in desc.inputs:
            t = inputs.get(spec.name)
            if t is not None:
                t = t.to(self.device, dtype if t.is_floating_point() and spec.name != "timestep" else t.dtype)
            args.append(t)
        outs = self.modules[component](*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {name: o.float() for name, o in zip(desc.output_names, outs)}
