"""State-dict key names of the original (CompVis/Stability "LDM") single-file checkpoints.

Fine-tuned Stable Diffusion models are shared as one ``.safetensors``/``.ckpt`` file whose keys
follow the original training code: ``model.diffusion_model.*`` (UNet: ``input_blocks``,
``middle_block``, ``output_blocks``), ``first_stage_model.*`` (VAE: ``encoder.down.N.block.M``,
``mid.attn_1`` with 1x1-conv attention weights) and ``cond_stage_model.transformer.*`` (SD1.5's
CLIP text model, keys as in transformers). SDXL files (Stability's SGM layout) keep the UNet and
VAE keys (the add embedding as ``label_emb.0.*``) and hold their two text encoders under
``conditioner.embedders.0.transformer.*`` (CLIP-L, transformers keys) and
``conditioner.embedders.1.model.*`` (OpenCLIP bigG: ``transformer.resblocks.N`` with fused
``attn.in_proj_*``, ``text_projection`` stored as ``[width, dim]``, ``ln_final``). This module maps a diffusers module's parameter
names to those keys, from the module's own config. It serves two purposes: predicting the LDM
tensor shapes an architecture has (the architecture check of a single file, before anything is
loaded) and writing tiny test checkpoints in the publisher's layout. Loading a real single file
goes through diffusers' own conversion (``from_single_file``), never through this map, so the
tests compare two independent implementations of the same layout.
"""

from __future__ import annotations

from typing import Any, Iterable

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_key(name: str, config: dict[str, Any]) -> str:
    """The LDM key (without ``model.diffusion_model.``) of a diffusers ``UNet2DConditionModel`` parameter."""
    n = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    parts = name.split(".")
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in fixed.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.k.0.op.*
            return f"input_blocks.{(i + 1) * (n + 1)}.0.op." + ".".join(parts[5:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        block = 1 + i * (n + 1) + j
        if kind == "resnets":
            return f"input_blocks.{block}.0." + _rename_resnet(rest, _RESNET_UNET)
        return f"input_blocks.{block}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}." + _rename_resnet(rest, _RESNET_UNET)
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        has_attention = "CrossAttn" in config["up_block_types"][i]
        if kind == "upsamplers":  # the last layer of the level carries the upsampler after its resnet/attention
            return f"output_blocks.{i * (n + 1) + n}.{2 if has_attention else 1}." + ".".join(parts[4:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        block = i * (n + 1) + j
        if kind == "resnets":
            return f"output_blocks.{block}.0." + _rename_resnet(rest, _RESNET_UNET)
        return f"output_blocks.{block}.1.{rest}"
    raise KeyError(f"no LDM key for UNet parameter {name!r} ({levels} levels)")


def vae_key(name: str, config: dict[str, Any]) -> str:
    """The LDM key (without ``first_stage_model.``) of a diffusers ``AutoencoderKL`` parameter."""
    levels = len(config["block_out_channels"])
    parts = name.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return name
    coder, rest = parts[0], parts[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return name
    if rest[0] == "conv_norm_out":
        return f"{coder}.norm_out." + ".".join(rest[1:])
    if rest[0] == "mid_block":
        kind, j, tail = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "resnets":
            return f"{coder}.mid.block_{j + 1}." + _rename_resnet(tail, _RESNET_VAE)
        head = next(h for h in _VAE_ATTENTION if tail.startswith(h + "."))
        return f"{coder}.mid.attn_1.{_VAE_ATTENTION[head]}" + tail[len(head):]
    if rest[0] in ("down_blocks", "up_blocks"):
        i, kind = int(rest[1]), rest[2]
        level = i if rest[0] == "down_blocks" else levels - 1 - i  # the LDM decoder counts levels upwards
        stage = "down" if rest[0] == "down_blocks" else "up"
        if kind in ("downsamplers", "upsamplers"):
            return f"{coder}.{stage}.{level}.{'downsample' if stage == 'down' else 'upsample'}." + ".".join(rest[4:])
        return f"{coder}.{stage}.{level}.block.{int(rest[3])}." + _rename_resnet(".".join(rest[4:]), _RESNET_VAE)
    raise KeyError(f"no LDM key for VAE parameter {name!r}")


def is_vae_attention_matrix(ldm_key: str) -> bool:
    """LDM stores the VAE's mid-block attention projections as 1x1 convolutions (``[C, C, 1, 1]``)."""
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and not ldm_key.endswith("norm.weight")


def ldm_shapes(unet: Iterable[tuple[str, tuple[int, ...]]], unet_config: dict[str, Any],
               vae: Iterable[tuple[str, tuple[int, ...]]], vae_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The LDM single-file keys and shapes of a UNet and a VAE given as (diffusers name, shape) pairs."""
    shapes = {UNET_PREFIX + unet_key(k, unet_config): tuple(s) for k, s in unet}
    for k, s in vae:
        key = VAE_PREFIX + vae_key(k, vae_config)
        shapes[key] = tuple(s) + ((1, 1) if is_vae_attention_matrix(key) and len(s) == 2 else ())
    return shapes


def _unet_vae_ldm(unet, vae) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, t in unet.state_dict().items():
        out[UNET_PREFIX + unet_key(k, unet.config)] = t.contiguous()
    for k, t in vae.state_dict().items():
        key = VAE_PREFIX + vae_key(k, vae.config)
        out[key] = (t[:, :, None, None] if is_vae_attention_matrix(key) and t.ndim == 2 else t).contiguous()
    return out


def _with_text_model(k: str) -> str:
    # transformers 5 names CLIPTextModel's parameters without the ``text_model.`` level the file has.
    return k if k.startswith("text_model.") or k.startswith("text_projection.") else "text_model." + k


def to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, Any]:
    """An SD1.5 pipeline's modules as one LDM single-file state dict (for tiny test checkpoints)."""
    out = _unet_vae_ldm(unet, vae)
    for k, t in text_encoder.state_dict().items():
        out[SD15_TEXT_PREFIX + _with_text_model(k)] = t.contiguous()
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias"}


def open_clip_state_dict(text_encoder_2) -> dict[str, Any]:
    """A ``CLIPTextModelWithProjection``'s weights in OpenCLIP's layout (keys without the embedder prefix)."""
    import torch

    sd = {_with_text_model(k): t for k, t in text_encoder_2.state_dict().items()}
    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for k, t in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[k]] = t
        elif k == "text_projection.weight":
            out["text_projection"] = t.T  # OpenCLIP multiplies x @ text_projection: [width, dim]
        elif k.startswith("text_model.encoder.layers."):
            n, rest = k[len("text_model.encoder.layers."):].split(".", 1)
            block = f"transformer.resblocks.{n}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                fused.setdefault(block + ("attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias"),
                                 {})[proj] = t
                continue
            head = next(h for h in _OPEN_CLIP_LAYER if rest.startswith(h + "."))
            out[block + _OPEN_CLIP_LAYER[head] + rest[len(head):]] = t
        else:
            raise KeyError(f"no OpenCLIP key for text encoder parameter {k!r}")
    for key, parts in fused.items():  # q, k, v stacked along the output dimension, as nn.MultiheadAttention has them
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return {k: t.contiguous() for k, t in out.items()}


def to_sdxl_ldm_state_dict(unet, vae, text_encoder, text_encoder_2) -> dict[str, Any]:
    """An SDXL pipeline's modules as one SGM-layout single-file state dict (for tiny test checkpoints)."""
    out = _unet_vae_ldm(unet, vae)
    for k, t in text_encoder.state_dict().items():
        out[SDXL_TEXT_PREFIX + _with_text_model(k)] = t.contiguous()
    for k, t in open_clip_state_dict(text_encoder_2).items():
        out[SDXL_TEXT_2_PREFIX + k] = t
    return out
