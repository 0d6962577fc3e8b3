"""Tiny random-weight checkpoints for tests and the demo (no weights can be downloaded here).

Builds SD1.5-like, SDXL-like and FLUX.1-schnell-like diffusers directories from small configs
under a fixed seed — diffusers' own test habit — with offline CLIP and T5 tokenizers, and saves
them with ``save_pretrained`` so they load through exactly the code path real checkpoints use.
Shapes keep the real structure where it matters to the serving stack: 4 latent channels (16 for
FLUX, with its shift factor), a VAE that downsamples by 8, 77-token CLIP and 512-token T5
prompts, SDXL's two encoders, pooled embeds and time ids, FLUX's double and single blocks, and
an OminiControl-format subject LoRA.
The Omni-Zero checkpoint (SDXL plus image encoder, adapters, ControlNets, face and depth models)
is built by ``engine.models.omni_zero.tiny``; ``engine.tiny.demo`` builds one checkpoint per slug.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from engine.checkpoint import CONDITION_LORA_DIR

logger = logging.getLogger(__name__)

TINY_VERSION = 1
"""Bump when a config below changes, so cached directories are rebuilt."""

SEED = 0

_SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
                  "set_alpha_to_one": False, "trained_betas": None}

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **_SCALED_LINEAR}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                  "prediction_type": "epsilon", "timestep_spacing": "leading", "use_karras_sigmas": False,
                  "sample_max_value": 1.0, "skip_prk_steps": True, **_SCALED_LINEAR}

VAE_CONFIG = dict(
    block_out_channels=(8, 16, 16, 16),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)

# Three levels with attention only at the coarsest one keep a 512x512 (SD1.5) or 1024x1024
# (SDXL) request to a fraction of a second per step on two CPU cores.
SD15_UNET_CONFIG = dict(
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=8,
)

SDXL_UNET_CONFIG = dict(
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=(2, 2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 1, 2),
    projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled
    cross_attention_dim=64,  # 32 + 32 from the two encoders
)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=32,
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# A few merges so common words become one or two tokens, like a real BPE vocabulary would.
_MERGE_WORDS = ("the", "of", "and", "in", "a", "photo", "city", "sky", "light", "blue", "person", "portrait")


def build_clip_tokenizer(out_dir: Path):
    """A byte-level BPE CLIP tokenizer built offline: every byte, word-final forms, a few merges."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _MERGE_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if f"{pair[0]} {pair[1]}" not in merges:
                merges.append(f"{pair[0]} {pair[1]}")
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    # Written as the classic vocab.json + merges.txt pair, which every transformers version reads.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def clip_text_encoder(tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _is_current(path: Path, kind: str) -> bool:
    marker = path / "diffserve_tiny.json"
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    return info.get("version") == TINY_VERSION and info.get("kind") == kind


def _mark(path: Path, kind: str) -> None:
    (path / "diffserve_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "kind": kind, "seed": SEED}))


def build_tiny_sd15(path: str | Path, *, force: bool = False) -> Path:
    """SD1.5-like checkpoint: CLIP text encoder, 2-level UNet, 8x VAE, PNDM scheduler config."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    if not force and _is_current(path, "sd15"):
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    tokenizer = build_clip_tokenizer(path / "tokenizer")
    torch.manual_seed(SEED)
    text_encoder = clip_text_encoder(tokenizer, with_projection=False)
    scheduler = PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _mark(path, "sd15")
    logger.info("built tiny SD1.5 checkpoint in %s", path)
    return path


def build_tiny_sdxl(path: str | Path, *, force: bool = False) -> Path:
    """SDXL-like checkpoint: two CLIP encoders (second with projection), text_time UNet, 8x VAE."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    path = Path(path)
    if not force and _is_current(path, "sdxl"):
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE_CONFIG, force_upcast=True)
    tokenizer = build_clip_tokenizer(path / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(path / "tokenizer_2")
    torch.manual_seed(SEED)
    text_encoder = clip_text_encoder(tokenizer, with_projection=False)
    torch.manual_seed(SEED + 1)
    text_encoder_2 = clip_text_encoder(tokenizer_2, with_projection=True)
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"})
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _mark(path, "sdxl")
    logger.info("built tiny SDXL checkpoint in %s", path)
    return path


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
