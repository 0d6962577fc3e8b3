"""Tiny random-weight FLUX.1-schnell directories and OminiControl subject LoRAs (no weights can be
downloaded here).

FLUX's structure at toy width under the shared seed (``diffserve.engine.tiny.checkpoints``): 16 latent channels
with FLUX's shift factor, double and single transformer blocks, an offline 512-token T5 tokenizer and
CLIP, saved with ``save_pretrained``; and a LoRA in OminiControl's released key format.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffserve.engine.checkpoint import CONDITION_LORA_DIR
from diffserve.engine.tiny.checkpoints import (
    SEED, VAE_CONFIG, _is_current, _mark, build_clip_tokenizer, clip_text_encoder,
)

logger = logging.getLogger(__name__)


# FLUX.1-schnell's structure at toy width: 64-channel packed tokens (16 latent channels x 2x2),
# double then single blocks, RoPE over (index, row, column) axes summing to the head dim.
FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # T5 d_model
    pooled_projection_dim=32,  # CLIP hidden size
    guidance_embeds=False,  # schnell is guidance-distilled without a guidance embedding
    axes_dims_rope=(4, 6, 6),
)

FLUX_VAE_CONFIG = dict(VAE_CONFIG, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                       use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)

# FLUX.1-schnell's scheduler_config.json: no resolution-dependent shift.
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

T5_ENCODER_CONFIG = dict(
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's t5-v1_1-xxl
    layer_norm_epsilon=1e-6,
)

T5_MAX_LENGTH = 512

# The OminiControl subject LoRA's target modules (its training config), rank 4, alpha = rank.
LORA_RANK = 4
_LORA_DOUBLE = ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")
_LORA_SINGLE = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")

_T5_WORDS = ("the", "of", "and", "in", "a", "an", "this", "photo", "orange", "sofa", "modern", "living", "room",
             "city", "sky", "light", "blue", "person", "portrait", "on", "with", "at", "red", "cat", "dog")


def build_t5_tokenizer(out_dir: Path, max_length: int = T5_MAX_LENGTH):
    """A SentencePiece-style Unigram T5 tokenizer built offline: specials, every printable char, a few words."""
    from transformers import T5TokenizerFast

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {piece for piece, _ in vocab}
    chars = [chr(c) for c in range(33, 127)]
    for piece, score in ([("\u2581" + w, -2.0) for w in _T5_WORDS] + [("\u2581" + c, -4.0) for c in chars]
                         + [(c, -5.0) for c in chars]):
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return T5TokenizerFast.from_pretrained(out_dir)


def build_condition_lora(path: Path, transformer, rank: int = LORA_RANK, seed: int = SEED) -> Path:
    """A random subject LoRA in the OminiControl release format (diffusers/PEFT keys, no alpha: scale 1)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    names = ["x_embedder"]
    names += [f"transformer_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks)) for m in _LORA_DOUBLE]
    names += [f"single_transformer_blocks.{i}.{m}" for i in range(len(transformer.single_transformer_blocks))
              for m in _LORA_SINGLE]
    weights = {}
    for name in names:
        linear = modules[name]
        # Non-zero B (a trained LoRA, unlike a fresh one) so the condition branch visibly changes.
        weights[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.2
        weights[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.2
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"format": "pt"})
    return path


def build_tiny_flux(path: str | Path, *, force: bool = False) -> Path:
    """FLUX.1-schnell-like checkpoint: CLIP (pooled) + T5 (sequence), 16-channel VAE, tiny transformer,
    schnell's flow-matching scheduler config, and a subject LoRA in ``condition_lora/``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    if not force and _is_current(path, "flux"):
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER_CONFIG)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    tokenizer = build_clip_tokenizer(path / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(path / "tokenizer_2")
    torch.manual_seed(SEED)
    text_encoder = clip_text_encoder(tokenizer, with_projection=False)
    torch.manual_seed(SEED + 1)
    # Like t5-v1_1 (32100 tokens, 32128 embeddings) the embedding table is padded to a multiple of 128.
    vocab_size = -(-len(tokenizer_2) // 128) * 128
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=vocab_size, pad_token_id=tokenizer_2.pad_token_id,
                                             eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0,
                                             **T5_ENCODER_CONFIG)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    build_condition_lora(path / CONDITION_LORA_DIR / "pytorch_lora_weights.safetensors", transformer)
    _mark(path, "flux")
    logger.info("built tiny FLUX checkpoint in %s", path)
    return path
