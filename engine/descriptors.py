"""One descriptor per network component: tensor names, dtypes, dynamic axes, shape profiles.

Everything that moves a tensor across a boundary reads these descriptors — the torch wrapper
modules (argument order), ONNX export (names and dynamic axes), TensorRT engine build
(min/opt/max profiles), the Triton ``config.pbtxt`` files (inputs, outputs, batching) and the
runtimes that bind buffers — so a tensor name is written exactly once. Shape profiles come
from the model catalog: every resolution and ``samples`` value a served slug allows (the
UNet batch doubles under classifier-free guidance).

Tensors are batch-major everywhere (Triton's dynamic batcher concatenates along axis 0): FLUX's
position ids therefore carry a batch axis whose rows are identical, and per-request scalars
(LoRA scale, condition bias) are ``[batch, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from engine.catalog import CATALOG, ModelSpec
from engine.checkpoint import CheckpointArchitecture

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """numpy-style dtype name: ``float32``, ``int64``."""
    dims: tuple[Dim, ...]


@dataclass(frozen=True)
class ComponentDescriptor:
    component: str
    """``text_encoder``, ``text_encoder_2``, ``unet``, ``transformer``, ``condition_kv``, ``vae_encoder``,
    ``vae_decoder``."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[int, int, int]]
    """Dynamic axis name -> (min, opt, max)."""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def max_batch(self) -> int:
        return self.profile["batch"][2]

    @property
    def batched(self) -> bool:
        """Whether every tensor leads with the batch axis (else it is served unbatched, like SCRFD)."""
        return all(t.dims and t.dims[0] == "batch" for t in (*self.inputs, *self.outputs))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}

    def shape(self, tensor: TensorSpec, which: str = "opt", axes: dict[str, int] | None = None) -> tuple[int, ...]:
        """The profile's ``which`` shape of ``tensor``; ``axes`` sets named dynamic axes (``resolution_axes``)."""
        index = {"min": 0, "opt": 1, "max": 2}[which]
        axes = axes or {}
        return tuple(d if isinstance(d, int) else axes.get(d, self.profile[d][index]) for d in tensor.dims)

    def input_shapes(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape(t, which) for t in self.inputs}


def resolution_axes(config: CheckpointArchitecture, width: int, height: int) -> dict[str, int]:
    """The size of every resolution-dependent axis for a ``width`` x ``height`` image."""
    f = config.vae_scale_factor
    if width % (2 * f) or height % (2 * f):
        raise ValueError(f"{width}x{height} is not a multiple of {2 * f} (twice the VAE scale factor)")
    tokens = (width // (2 * f)) * (height // (2 * f))  # FLUX: packed 2x2 latent patches
    return {"latent_height": height // f, "latent_width": width // f, "image_height": height, "image_width": width,
            "image_tokens": tokens, "condition_tokens": tokens}


def _span(values: Iterable[int], opt: int | None = None) -> tuple[int, int, int]:
    values = sorted(set(values))
    return values[0], opt if opt is not None else values[0], values[-1]


def family_specs(config: CheckpointArchitecture) -> list[ModelSpec]:
    return [s for s in CATALOG.values() if s.architecture == config.family]


def component_descriptors(config: CheckpointArchitecture,
                          specs: list[ModelSpec] | None = None) -> dict[str, ComponentDescriptor]:
    """Descriptors for the components a checkpoint needs to serve ``specs`` (default: its family's slugs)."""
    specs = specs or family_specs(config)
    if config.family == "flux":
        return _flux_descriptors(config, specs)
    f = config.vae_scale_factor
    resolutions = [r for s in specs for r in s.resolutions()] or [(config.sample_size * f,) * 2]
    heights = _span(h // f for _, h in resolutions)
    widths = _span(w // f for w, _ in resolutions)
    images = max(s.max_batch() for s in specs)
    seq = config.tokenizer_max_length
    c = config.latent_channels

    def image_axes(prefix: str, scale: int) -> dict[str, tuple[int, int, int]]:
        return {f"{prefix}height": tuple(v * scale for v in heights),
                f"{prefix}width": tuple(v * scale for v in widths)}

    out: dict[str, ComponentDescriptor] = {}
    for i, hidden in enumerate(config.text_hidden_sizes):
        name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        pooled = config.text_encoder_projection_dim if (config.family == "sdxl" and i == len(config.text_hidden_sizes) - 1) else hidden
        out[name] = ComponentDescriptor(
            component=name,
            inputs=(TensorSpec("input_ids", "int64", ("batch", seq)),),
            outputs=(
                TensorSpec("last_hidden_state", "float32", ("batch", seq, hidden)),
                TensorSpec("penultimate_hidden_state", "float32", ("batch", seq, hidden)),
                TensorSpec("pooled", "float32", ("batch", int(pooled))),
            ),
            profile={"batch": (1, 1, 2)},
        )
    unet_inputs = [
        TensorSpec("sample", "float32", ("batch", c, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", seq, config.unet_cross_attention_dim)),
    ]
    if config.family == "sdxl":
        unet_inputs += [
            TensorSpec("text_embeds", "float32", ("batch", int(config.text_encoder_projection_dim))),
            TensorSpec("time_ids", "float32", ("batch", 6)),
        ]
    latent_axes = image_axes("latent_", 1)
    out["unet"] = ComponentDescriptor(
        component="unet",
        inputs=tuple(unet_inputs),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", c, "latent_height", "latent_width")),),
        profile={"batch": (1, 2, 2 * images), **latent_axes},
    )
    out["vae_encoder"] = ComponentDescriptor(
        component="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        outputs=(TensorSpec("moments", "float32", ("batch", 2 * c, "latent_height", "latent_width")),),
        profile={"batch": (1, 1, images), **image_axes("image_", f), **latent_axes},
    )
    out["vae_decoder"] = ComponentDescriptor(
        component="vae_decoder",
        inputs=(TensorSpec("latents", "float32", ("batch", c, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        profile={"batch": (1, 1, images), **image_axes("image_", f), **latent_axes},
    )
    if config.omni_zero is not None and any(s.pipeline == "omni_zero" for s in specs):
        out.update(_omni_zero_descriptors(config, specs))
    return out


def _flux_descriptors(config: CheckpointArchitecture, specs: list[ModelSpec]) -> dict[str, ComponentDescriptor]:
    """CLIP (pooled), T5 (sequence), the transformer on packed tokens, the condition K/V, the VAE.

    Packed tokens are 2x2 latent patches, so a W x H image has (W/16)(H/16) tokens at scale factor 8.
    OminiControl's condition image is encoded at the output size, so condition tokens span the same
    range as image tokens.
    """
    t = config.transformer
    f = config.vae_scale_factor
    resolutions = [r for s in specs for r in s.resolutions()] or [(config.sample_size * f,) * 2]
    heights = _span(h // f for _, h in resolutions)
    widths = _span(w // f for w, _ in resolutions)
    tokens = _span((w // (2 * f)) * (h // (2 * f)) for w, h in resolutions)
    images = max(s.max_batch() for s in specs)
    clip_seq, t5_seq = config.tokenizer_max_length, config.max_sequence_length
    c = config.latent_channels
    clip_hidden, t5_hidden = config.text_hidden_sizes
    kv_dims = ("batch", t.num_blocks, "condition_tokens", t.num_attention_heads, t.attention_head_dim)
    # Two requests' steps can share one transformer call under Triton's dynamic batcher.
    step_batch = (1, 1, 2 * images)
    latent_axes = {"latent_height": heights, "latent_width": widths}
    image_axes = {"image_height": tuple(v * f for v in heights), "image_width": tuple(v * f for v in widths)}
    transformer_inputs = (
        TensorSpec("hidden_states", "float32", ("batch", "image_tokens", t.in_channels)),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", t5_seq, t.joint_attention_dim)),
        TensorSpec("pooled_projections", "float32", ("batch", t.pooled_projection_dim)),
        TensorSpec("img_ids", "float32", ("batch", "image_tokens", 3)),
        TensorSpec("txt_ids", "float32", ("batch", t5_seq, 3)),
    )
    return {
        "text_encoder": ComponentDescriptor(
            component="text_encoder",
            inputs=(TensorSpec("input_ids", "int64", ("batch", clip_seq)),),
            outputs=(
                TensorSpec("last_hidden_state", "float32", ("batch", clip_seq, clip_hidden)),
                TensorSpec("penultimate_hidden_state", "float32", ("batch", clip_seq, clip_hidden)),
                TensorSpec("pooled", "float32", ("batch", clip_hidden)),
            ),
            profile={"batch": (1, 1, images)},
        ),
        "text_encoder_2": ComponentDescriptor(
            component="text_encoder_2",
            inputs=(TensorSpec("input_ids", "int64", ("batch", t5_seq)),),
            outputs=(TensorSpec("last_hidden_state", "float32", ("batch", t5_seq, t5_hidden)),),
            profile={"batch": (1, 1, images)},
        ),
        # Joint attention (the default): the condition tokens run through the transformer with the image.
        "transformer": ComponentDescriptor(
            component="transformer",
            inputs=(
                *transformer_inputs,
                TensorSpec("condition_latents", "float32", ("batch", "condition_tokens", t.in_channels)),
                TensorSpec("condition_ids", "float32", ("batch", "condition_tokens", 3)),
                TensorSpec("lora_scale", "float32", ("batch", 1)),
                TensorSpec("condition_bias", "float32", ("batch", 1)),
            ),
            outputs=(TensorSpec("noise_pred", "float32", ("batch", "image_tokens", t.in_channels)),),
            profile={"batch": step_batch, "image_tokens": tokens, "condition_tokens": tokens},
        ),
        # The cached mode (EngineOptions.ominicontrol_condition="cached"): condition keys/values from condition_kv.
        "transformer_cached": ComponentDescriptor(
            component="transformer_cached",
            inputs=(
                *transformer_inputs,
                TensorSpec("condition_key", "float32", kv_dims),
                TensorSpec("condition_value", "float32", kv_dims),
                TensorSpec("condition_bias", "float32", ("batch", 1)),
            ),
            outputs=(TensorSpec("noise_pred", "float32", ("batch", "image_tokens", t.in_channels)),),
            profile={"batch": step_batch, "image_tokens": tokens, "condition_tokens": tokens},
        ),
        "condition_kv": ComponentDescriptor(
            component="condition_kv",
            inputs=(
                TensorSpec("condition_latents", "float32", ("batch", "condition_tokens", t.in_channels)),
                TensorSpec("condition_ids", "float32", ("batch", "condition_tokens", 3)),
                TensorSpec("pooled_projections", "float32", ("batch", t.pooled_projection_dim)),
                TensorSpec("lora_scale", "float32", ("batch", 1)),
            ),
            outputs=(
                TensorSpec("condition_key", "float32", kv_dims),
                TensorSpec("condition_value", "float32", kv_dims),
            ),
            profile={"batch": (1, 1, images), "condition_tokens": tokens},
        ),
        "vae_encoder": ComponentDescriptor(
            component="vae_encoder",
            inputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
            outputs=(TensorSpec("moments", "float32", ("batch", 2 * c, "latent_height", "latent_width")),),
            profile={"batch": (1, 1, images), **image_axes, **latent_axes},
        ),
        "vae_decoder": ComponentDescriptor(
            component="vae_decoder",
            inputs=(TensorSpec("latents", "float32", ("batch", c, "latent_height", "latent_width")),),
            outputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
            profile={"batch": (1, 1, images), **image_axes, **latent_axes},
        ),
    }


def _omni_zero_descriptors(config: CheckpointArchitecture, specs: list[ModelSpec]) -> dict[str, ComponentDescriptor]:
    """Omni-Zero's image encoder, adapter projections, fused ControlNet+UNet step, face and depth models.

    Images fit 1024 px on the long side at any aspect ratio (sides are multiples of 8 from 64 up),
    so the latent axes span 8..128 with 128 the common case. The face detector takes one
    letterboxed 640x640 image and, like insightface's SCRFD exports, returns per-anchor rows
    without a batch axis (a Triton model for it has ``max_batch_size: 0``).
    """
    from engine.models.omni_zero.face_analysis import ANCHORS_PER_CELL, DET_SIZE, STRIDES
    from engine.models.omni_zero.checkpoint import (
        FACE_EMBEDDING_DIM, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, SIZE_MULTIPLE, depth_input_size, depth_padding,
    )

    o = config.omni_zero
    f = config.vae_scale_factor
    images = max(s.max_batch() for s in specs if s.pipeline == "omni_zero")
    seq, cross, c = config.tokenizer_max_length, config.unet_cross_attention_dim, config.latent_channels
    latent = (MIN_IMAGE_SIDE // f, MAX_IMAGE_SIDE // f, MAX_IMAGE_SIDE // f)
    pixels = tuple(v * f for v in latent)
    sides = range(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE + 1, SIZE_MULTIPLE)
    depth_sizes = []
    for w, h in [(MAX_IMAGE_SIDE, s) for s in sides] + [(s, MAX_IMAGE_SIDE) for s in sides]:
        ph, pw = depth_padding(h, w, o.depth_processor)
        depth_sizes.append(depth_input_size(h + 2 * ph, w + 2 * pw, o.depth_processor))
    square_pad = depth_padding(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE, o.depth_processor)
    square = depth_input_size(MAX_IMAGE_SIDE + 2 * square_pad[0], MAX_IMAGE_SIDE + 2 * square_pad[1],
                              o.depth_processor)
    depth_axes = {"depth_height": _span((h for h, _ in depth_sizes), square[0]),
                  "depth_width": _span((w for _, w in depth_sizes), square[1])}
    anchors = {s: (DET_SIZE // s) ** 2 * ANCHORS_PER_CELL for s in STRIDES}
    det_outputs = [TensorSpec(f"{kind}_{s}", "float32", (anchors[s], width))
                   for kind, width in (("scores", 1), ("boxes", 4), ("keypoints", 10)) for s in STRIDES]
    # The CFG pair of every image prompt: style and composition, unconditional and conditional rows.
    image_rows = (1, 4, 4)
    step_batch = (1, 2, 2 * images)
    latent_axes = {"latent_height": latent, "latent_width": latent}
    image_axes = {"image_height": pixels, "image_width": pixels}
    vae_rows = (1, 1, images)
    return {
        # The VAE sees every Omni-Zero size (and SDXL's 1024x1024 among them).
        "vae_encoder": ComponentDescriptor(
            component="vae_encoder",
            inputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
            outputs=(TensorSpec("moments", "float32", ("batch", 2 * c, "latent_height", "latent_width")),),
            profile={"batch": vae_rows, **image_axes, **latent_axes},
        ),
        "vae_decoder": ComponentDescriptor(
            component="vae_decoder",
            inputs=(TensorSpec("latents", "float32", ("batch", c, "latent_height", "latent_width")),),
            outputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
            profile={"batch": vae_rows, **image_axes, **latent_axes},
        ),
        "image_encoder": ComponentDescriptor(
            component="image_encoder",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, o.image_size, o.image_size)),),
            outputs=(TensorSpec("hidden_states", "float32", ("batch", o.image_tokens, o.image_hidden_size)),),
            profile={"batch": image_rows},
        ),
        "ip_projection": ComponentDescriptor(
            component="ip_projection",
            inputs=(
                TensorSpec("face_embedding", "float32", ("batch", 1, o.face_embedding_dim)),
                TensorSpec("style_hidden_states", "float32", ("batch", o.image_tokens, o.image_hidden_size)),
                TensorSpec("composition_hidden_states", "float32", ("batch", o.image_tokens, o.image_hidden_size)),
            ),
            outputs=(
                TensorSpec("identity_tokens", "float32", ("batch", o.identity_tokens, cross)),
                TensorSpec("style_tokens", "float32", ("batch", o.image_prompt_tokens, cross)),
                TensorSpec("composition_tokens", "float32", ("batch", o.image_prompt_tokens, cross)),
            ),
            profile={"batch": (1, 2, 2)},
        ),
        "controlnet_unet": ComponentDescriptor(
            component="controlnet_unet",
            inputs=(
                TensorSpec("sample", "float32", ("batch", c, "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", seq, cross)),
                TensorSpec("text_embeds", "float32", ("batch", int(config.text_encoder_projection_dim))),
                TensorSpec("time_ids", "float32", ("batch", 6)),
                TensorSpec("identity_tokens", "float32", ("batch", o.identity_tokens, cross)),
                TensorSpec("style_tokens", "float32", ("batch", o.image_prompt_tokens, cross)),
                TensorSpec("composition_tokens", "float32", ("batch", o.image_prompt_tokens, cross)),
                TensorSpec("ip_scales", "float32", ("batch", 3)),
                TensorSpec("identity_image", "float32", ("batch", 3, "image_height", "image_width")),
                TensorSpec("depth_image", "float32", ("batch", 3, "image_height", "image_width")),
                TensorSpec("controlnet_scales", "float32", ("batch", 2)),
            ),
            outputs=(TensorSpec("noise_pred", "float32", ("batch", c, "latent_height", "latent_width")),),
            profile={"batch": step_batch, **latent_axes, **image_axes},
        ),
        "face_detector": ComponentDescriptor(
            component="face_detector",
            inputs=(TensorSpec("image", "float32", (1, 3, DET_SIZE, DET_SIZE)),),
            outputs=tuple(det_outputs),
            profile={"batch": (1, 1, 1)},
        ),
        "face_recognizer": ComponentDescriptor(
            component="face_recognizer",
            inputs=(TensorSpec("faces", "float32", ("batch", 3, 112, 112)),),
            outputs=(TensorSpec("embedding", "float32", ("batch", FACE_EMBEDDING_DIM)),),
            profile={"batch": (1, 1, 2)},
        ),
        "depth_estimator": ComponentDescriptor(
            component="depth_estimator",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, "depth_height", "depth_width")),),
            outputs=(TensorSpec("predicted_depth", "float32", ("batch", "depth_height", "depth_width")),),
            # Always the image and its mirror image (ZoeDepth's flip augmentation); ZoeDepth's
            # traced graph does not generalise over the batch size.
            profile={"batch": (2, 2, 2), **depth_axes},
        ),
    }


from engine.options import OMINICONTROL_CONDITION_MODES  # noqa: E402  (re-exported)


def needed_components(config: CheckpointArchitecture, specs: list[ModelSpec], condition_mode: str = "joint") -> list[str]:
    """Component names the slugs in ``specs`` call (the VAE encoder only for image inputs; the cached
    OminiControl components only in the ``cached`` condition mode, ``EngineOptions.ominicontrol_condition``)."""
    if condition_mode not in OMINICONTROL_CONDITION_MODES:
        raise ValueError(f"condition_mode must be one of {', '.join(OMINICONTROL_CONDITION_MODES)}, "
                         f"got {condition_mode!r}")
    names = ["text_encoder"] + [f"text_encoder_{i + 1}" for i in range(1, config.num_text_encoders)]
    if config.family == "flux":
        names.append("transformer")
        if any(s.pipeline == "ominicontrol" for s in specs) and condition_mode == "cached":
            names += ["condition_kv", "transformer_cached"]
    else:
        if any(s.pipeline != "omni_zero" for s in specs):
            names.append("unet")
        if config.omni_zero is not None and any(s.pipeline == "omni_zero" for s in specs):
            from engine.models.omni_zero.checkpoint import OMNI_ZERO_COMPONENTS

            names.extend(OMNI_ZERO_COMPONENTS)
    if any(s.image_params for s in specs):
        names.append("vae_encoder")
    names.append("vae_decoder")
    return names
