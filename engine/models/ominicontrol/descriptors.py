"""The OminiControl family's components (``ModelFamily.component_descriptors`` / ``needed_components``):
FLUX.1's CLIP and T5 text encoders, the transformer on packed latent tokens with OminiControl's
condition tokens (joint mode) or cached condition keys/values (cached mode), and the VAE.
"""

from __future__ import annotations

from diffserve.engine.catalog import ModelSpec
from diffserve.engine.checkpoint import CheckpointArchitecture
from diffserve.engine.descriptors import ComponentDescriptor, TensorSpec, span, text_encoder_names, vae_names

CACHED_CONDITION_COMPONENTS = ("condition_kv", "transformer_cached")
"""The cached condition mode's components (``EngineOptions.ominicontrol_condition="cached"``)."""


def recognizes(architecture: CheckpointArchitecture) -> bool:
    """A FLUX checkpoint (a ``transformer/``, no ``unet/``)."""
    return architecture.family == "flux"


def needed_components(config: CheckpointArchitecture, specs: list[ModelSpec], condition_mode: str = "joint") -> list[str]:
    """CLIP and T5, the transformer (plus the cached condition components in the ``cached`` mode), the VAE."""
    names = text_encoder_names(config) + ["transformer"]
    if condition_mode == "cached":
        names += list(CACHED_CONDITION_COMPONENTS)
    return names + vae_names(specs)


def component_descriptors(config: CheckpointArchitecture, specs: list[ModelSpec]) -> dict[str, ComponentDescriptor]:
    """CLIP (pooled), T5 (sequence), the transformer on packed tokens, the condition K/V, the VAE.

    Packed tokens are 2x2 latent patches, so a W x H image has (W/16)(H/16) tokens at scale factor 8.
    OminiControl's condition image is encoded at the output size, so condition tokens span the same
    range as image tokens.
    """
    t = config.transformer
    f = config.vae_scale_factor
    resolutions = [r for s in specs for r in s.resolutions()] or [(config.sample_size * f,) * 2]
    heights = span(h // f for _, h in resolutions)
    widths = span(w // f for w, _ in resolutions)
    tokens = span((w // (2 * f)) * (h // (2 * f)) for w, h in resolutions)
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
