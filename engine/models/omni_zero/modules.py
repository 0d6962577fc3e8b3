"""Omni-Zero's networks as torch modules with descriptor-ordered tensor inputs and outputs.

The denoiser of one step is a single component, ``controlnet_unet``: IdentityNet (whose
cross-attention reads the face-adapter tokens) and the depth ControlNet produce residuals, each
scaled per batch row, and the SDXL UNet runs with those residuals and with IP-Adapter attention.
Keeping the three networks in one graph avoids moving every ControlNet residual tensor between
processes at every step, and lets Triton batch whole steps of
concurrent requests.

IP-Adapter attention (Ye et al. 2023, "decoupled cross-attention", eq. 5): every cross-attention
layer adds ``scale * softmax(Q K_ip^T / sqrt(d)) V_ip`` for each adapter's image tokens to the
text attention before the output projection. The adapter strengths are tensor inputs (one row
per batch row), never constants, so one exported graph serves every request. Three adapters
run: the InstantID face adapter in every cross-attention layer, and the IP-Adapter Plus weights
twice — as *style* only in ``up_blocks.0.attentions.1`` and as *composition* only in
``down_blocks.2.attentions.1`` (InstantStyle's blocks, as in the reference's
``set_ip_adapter_scale``). The reference loads the Plus file twice and zeroes the scales of the
other layers; we keep the Plus key/value projections only where they act.

Weights are read by diffusers' own IP-Adapter converters (the released files' key layout), so
real and tiny checkpoints load through the same code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.engine.models.omni_zero.checkpoint import (
    CONTROLNET_DEPTH_DIR, CONTROLNET_IDENTITY_DIR, DEPTH_ESTIMATOR_DIR, FACE_ANALYSIS_DIR, IMAGE_ENCODER_DIR,
    OMNI_ZERO_COMPONENTS, find_ip_adapters, read_ip_adapter,
)

logger = logging.getLogger(__name__)

ADAPTERS = ("identity", "style", "composition")
"""Order of the adapter token inputs and of the columns of ``ip_scales``."""
STYLE_BLOCK = "up_blocks.0.attentions.1"
COMPOSITION_BLOCK = "down_blocks.2.attentions.1"

__all__ = ["ADAPTERS", "COMPOSITION_BLOCK", "OMNI_ZERO_COMPONENTS", "STYLE_BLOCK", "ControlNetUNetModule",
           "DepthEstimatorModule", "IPAdapterAttnProcessor", "IPAdapterInputs", "IPProjectionModule",
           "ImageEncoderModule", "OnnxModelModule", "install_ip_adapters", "load_modules", "load_omni_zero_modules"]


class IPAdapterInputs:
    """Image tokens and strengths of the current UNet call, read by every IP-Adapter attention layer."""

    def __init__(self) -> None:
        self.tokens: tuple[torch.Tensor, ...] | None = None
        self.scales: torch.Tensor | None = None


class IPAdapterAttnProcessor(nn.Module):
    """Cross-attention over the text plus, per active adapter, a scaled attention over its image tokens."""

    def __init__(self, adapters: list[tuple[int, nn.Linear, nn.Linear]], inputs: IPAdapterInputs):
        super().__init__()
        self.adapter_index = tuple(index for index, _, _ in adapters)
        self.to_k_ip = nn.ModuleList(k for _, k, _ in adapters)
        self.to_v_ip = nn.ModuleList(v for _, _, v in adapters)
        self._inputs = inputs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        inputs = self._inputs
        if inputs.tokens is None or inputs.scales is None:
            raise RuntimeError("IP-Adapter attention called without image tokens; run it through ControlNetUNetModule")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        for index, to_k, to_v in zip(self.adapter_index, self.to_k_ip, self.to_v_ip):
            tokens = inputs.tokens[index]
            ip_key = to_k(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = to_v(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_states = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0,
                                                       is_causal=False)
            ip_states = ip_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            scale = inputs.scales[:, index].view(batch_size, 1, 1).to(ip_states.dtype)
            hidden_states = hidden_states + scale * ip_states

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def adapters_of_layer(name: str) -> tuple[int, ...]:
    """Indices into ``ADAPTERS`` active in the cross-attention processor ``name``."""
    active = [0]
    if name.startswith(STYLE_BLOCK + "."):
        active.append(1)
    if name.startswith(COMPOSITION_BLOCK + "."):
        active.append(2)
    return tuple(active)


def install_ip_adapters(unet, identity_state: dict, image_prompt_state: dict,
                        inputs: IPAdapterInputs) -> tuple[nn.Module, nn.Module]:
    """Give ``unet`` IP-Adapter attention; return the (face, image-prompt) resampler projections."""
    names = list(unet.attn_processors)
    for block in (STYLE_BLOCK, COMPOSITION_BLOCK):
        if not any(n.startswith(block + ".") and n.endswith("attn2.processor") for n in names):
            raise ValueError(f"the UNet has no cross-attention in {block}, where Omni-Zero applies an adapter")
    # diffusers' converter numbers the released files' cross-attention layers (1, 3, 5, ...) in
    # attn_processors order and returns IPAdapterAttnProcessor2_0 modules holding to_k_ip/to_v_ip.
    converted = unet._convert_ip_adapter_attn_to_diffusers([identity_state, image_prompt_state])
    processors = {}
    for name, current in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            processors[name] = current
            continue
        source = converted[name]
        weights = {0: 0, 1: 1, 2: 1}  # adapter -> file: style and composition share the Plus weights
        processors[name] = IPAdapterAttnProcessor(
            [(a, source.to_k_ip[weights[a]], source.to_v_ip[weights[a]]) for a in adapters_of_layer(name)], inputs)
    unet.set_attn_processor(processors)
    identity = unet._convert_ip_adapter_image_proj_to_diffusers(identity_state["image_proj"])
    image_prompt = unet._convert_ip_adapter_image_proj_to_diffusers(image_prompt_state["image_proj"])
    return identity, image_prompt


# -- component modules -----------------------------------------------------------------------------

class ImageEncoderModule(nn.Module):
    """pixel_values (CLIP-normalised) -> penultimate hidden states [B, tokens, hidden] (IP-Adapter Plus input)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        return self.encoder(pixel_values, output_hidden_states=True).hidden_states[-2]


class IPProjectionModule(nn.Module):
    """(face_embedding, style_hidden_states, composition_hidden_states) -> the three adapters' tokens."""

    def __init__(self, identity: nn.Module, image_prompt: nn.Module):
        super().__init__()
        self.identity = identity
        self.image_prompt = image_prompt

    def forward(self, face_embedding, style_hidden_states, composition_hidden_states):
        return (self.identity(face_embedding), self.image_prompt(style_hidden_states),
                self.image_prompt(composition_hidden_states))


class ControlNetUNetModule(nn.Module):
    """One denoising evaluation: IdentityNet + depth ControlNet residuals into the IP-Adapter UNet.

    Inputs: sample, timestep, encoder_hidden_states, text_embeds, time_ids, identity_tokens,
    style_tokens, composition_tokens, ip_scales [B, 3], identity_image, depth_image (both [B, 3, H, W]
    in [0, 1]), controlnet_scales [B, 2] (identity, depth). Output: noise_pred.
    """

    def __init__(self, unet: nn.Module, controlnet_identity: nn.Module, controlnet_depth: nn.Module,
                 inputs: IPAdapterInputs):
        super().__init__()
        # Omni-Zero keeps the input's aspect ratio, so latent sides need not be multiples of 4.
        # diffusers' UNet passes explicit upsample sizes only for such sides — a Python-level test
        # that a traced (ONNX) graph would freeze at the trace shape. Making the test always true
        # keeps every export shape-general; nearest upsampling to twice the size equals scale 2.
        unet.num_upsamplers = 30  # 2**30 exceeds any latent side
        self.unet = unet
        self.controlnet_identity = controlnet_identity
        self.controlnet_depth = controlnet_depth
        self.ip_inputs = inputs

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, identity_tokens, style_tokens,
                composition_tokens, ip_scales, identity_image, depth_image, controlnet_scales):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        rows = (-1, 1, 1, 1)
        down, mid = None, None
        for net, context, image, scale in (
            # IdentityNet was trained with the face-adapter tokens as its cross-attention context.
            (self.controlnet_identity, identity_tokens, identity_image, controlnet_scales[:, 0].view(rows)),
            (self.controlnet_depth, encoder_hidden_states, depth_image, controlnet_scales[:, 1].view(rows)),
        ):
            d, m = net(sample, timestep, encoder_hidden_states=context, controlnet_cond=image, conditioning_scale=1.0,
                       added_cond_kwargs=added, return_dict=False)
            d = [r * scale.to(r.dtype) for r in d]
            m = m * scale.to(m.dtype)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        self.ip_inputs.tokens = (identity_tokens, style_tokens, composition_tokens)
        self.ip_inputs.scales = ip_scales
        try:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=False)[0]
        finally:
            self.ip_inputs.tokens = self.ip_inputs.scales = None


class DepthEstimatorModule(nn.Module):
    """pixel_values (the estimator's normalisation) -> predicted_depth [B, H, W]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).predicted_depth


class OnnxModelModule(nn.Module):
    """An ONNX model file run by ONNX Runtime behind the module interface (face models ship as ONNX).

    Inputs and outputs are positional, in the file's order; float32 in and out whatever the
    caller's precision. Not traceable: exporting such a component copies the file instead.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        from diffserve.engine.ort_session import OrtSession

        self.path = Path(path)
        self.onnx_source = self.path  # export copies this file instead of tracing
        self.session = OrtSession(path)
        self.input_names = list(self.session.input_types)

    def forward(self, *inputs):
        feed = {name: t.detach().float().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        outs = self.session.run(feed)
        device = inputs[0].device
        return tuple(torch.from_numpy(outs[name]).to(device) for name in self.session.output_names)


def load_modules(root: Path, dtype: torch.dtype, components: list[str] | None = None,
                 **_options) -> dict[str, nn.Module]:
    """``components`` of an Omni-Zero checkpoint (``ModelFamily.load_modules``; default: the SDXL text
    encoders and VAE and every Omni-Zero component). Its denoiser is ``controlnet_unet``: the plain UNet
    loads only when asked for."""
    from diffserve.engine.runtime_torch import load_base_modules

    root = Path(root)
    wanted = set(components or ["text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder",
                                *OMNI_ZERO_COMPONENTS])
    mods = load_omni_zero_modules(root, dtype, wanted & set(OMNI_ZERO_COMPONENTS))
    mods.update(load_base_modules(root, dtype, wanted - set(OMNI_ZERO_COMPONENTS)))
    return mods


def load_omni_zero_modules(root: str | Path, dtype: torch.dtype, wanted: set[str]) -> dict[str, nn.Module]:
    """The Omni-Zero component modules of a checkpoint (see ``diffserve.engine.models.omni_zero.checkpoint``)."""
    from diffserve.engine.models.omni_zero.face_analysis import find_face_models

    root = Path(root)
    kw = {"torch_dtype": dtype}
    mods: dict[str, nn.Module] = {}
    if "image_encoder" in wanted:
        from transformers import CLIPVisionModelWithProjection

        mods["image_encoder"] = ImageEncoderModule(
            CLIPVisionModelWithProjection.from_pretrained(root / IMAGE_ENCODER_DIR, **kw))
    if wanted & {"ip_projection", "controlnet_unet"}:
        from diffusers import ControlNetModel, UNet2DConditionModel

        files = find_ip_adapters(root)
        identity_state, image_prompt_state = read_ip_adapter(files.identity), read_ip_adapter(files.image_prompt)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", **kw)
        inputs = IPAdapterInputs()
        identity_proj, image_prompt_proj = install_ip_adapters(unet, identity_state, image_prompt_state, inputs)
        if "ip_projection" in wanted:
            mods["ip_projection"] = IPProjectionModule(identity_proj, image_prompt_proj).to(dtype)
        if "controlnet_unet" in wanted:
            for processor in unet.attn_processors.values():  # the UNet itself loaded in ``dtype``
                if isinstance(processor, IPAdapterAttnProcessor):
                    processor.to(dtype)
            mods["controlnet_unet"] = ControlNetUNetModule(
                unet, ControlNetModel.from_pretrained(root / CONTROLNET_IDENTITY_DIR, **kw),
                ControlNetModel.from_pretrained(root / CONTROLNET_DEPTH_DIR, **kw), inputs)
        logger.info("IP-Adapters %s and %s installed", files.identity.name, files.image_prompt.name)
    if wanted & {"face_detector", "face_recognizer"}:
        faces = find_face_models(root / FACE_ANALYSIS_DIR)
        if "face_detector" in wanted:
            mods["face_detector"] = OnnxModelModule(faces.detector)
        if "face_recognizer" in wanted:
            mods["face_recognizer"] = OnnxModelModule(faces.recognizer)
    if "depth_estimator" in wanted:
        from transformers import AutoModelForDepthEstimation

        mods["depth_estimator"] = DepthEstimatorModule(
            AutoModelForDepthEstimation.from_pretrained(root / DEPTH_ESTIMATOR_DIR, **kw))
    return mods
