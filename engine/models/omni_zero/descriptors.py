"""The Omni-Zero family's components (``ModelFamily.component_descriptors`` / ``needed_components``):
the SDXL base set (``diffserve.engine.descriptors.sd_descriptors``) extended with the image encoder, adapter
projections, the fused ControlNet+UNet step, the face models and the depth estimator.
"""

from __future__ import annotations

from diffserve.engine.catalog import ModelSpec
from diffserve.engine.checkpoint import CheckpointArchitecture
from diffserve.engine.descriptors import ComponentDescriptor, TensorSpec, sd_descriptors, span, text_encoder_names, vae_names
from diffserve.engine.models import OMNI_ZERO
from diffserve.engine.models.omni_zero.checkpoint import (
    FACE_EMBEDDING_DIM, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, OMNI_ZERO_COMPONENTS, SIZE_MULTIPLE, depth_input_size,
    depth_padding,
)


def recognizes(architecture: CheckpointArchitecture) -> bool:
    """An SDXL checkpoint with Omni-Zero's additions (``diffserve.engine.models.omni_zero.checkpoint``)."""
    return architecture.omni_zero is not None


def component_descriptors(config: CheckpointArchitecture, specs: list[ModelSpec]) -> dict[str, ComponentDescriptor]:
    """The SDXL set for every slug served, with Omni-Zero's components (and VAE sizes) for its own."""
    out = sd_descriptors(config, specs)
    if any(s.family is OMNI_ZERO for s in specs):
        out.update(omni_zero_descriptors(config, specs))
    return out


def needed_components(config: CheckpointArchitecture, specs: list[ModelSpec], condition_mode: str = "joint") -> list[str]:
    """The text encoders; the plain UNet only for another family's slug served from this checkpoint
    (Omni-Zero's denoiser is ``controlnet_unet``); Omni-Zero's components; the VAE."""
    names = text_encoder_names(config)
    if any(s.family is not OMNI_ZERO for s in specs):
        names.append("unet")
    if any(s.family is OMNI_ZERO for s in specs):
        names.extend(OMNI_ZERO_COMPONENTS)
    return names + vae_names(specs)


def omni_zero_descriptors(config: CheckpointArchitecture, specs: list[ModelSpec]) -> dict[str, ComponentDescriptor]:
    """Omni-Zero's image encoder, adapter projections, fused ControlNet+UNet step, face and depth models.

    Images fit 1024 px on the long side at any aspect ratio (sides are multiples of 8 from 64 up),
    so the latent axes span 8..128 with 128 the common case. The face detector takes one
    letterboxed 640x640 image and, like insightface's SCRFD exports, returns per-anchor rows
    without a batch axis (a Triton model for it has ``max_batch_size: 0``).
    """
    from diffserve.engine.models.omni_zero.face_analysis import ANCHORS_PER_CELL, DET_SIZE, STRIDES  # cv2: on first use

    o = config.omni_zero
    f = config.vae_scale_factor
    images = max(s.max_batch() for s in specs if s.family is OMNI_ZERO)
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
    depth_axes = {"depth_height": span((h for h, _ in depth_sizes), square[0]),
                  "depth_width": span((w for _, w in depth_sizes), square[1])}
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
