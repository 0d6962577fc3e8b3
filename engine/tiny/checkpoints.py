"""Tiny random-weight checkpoints for tests and the demo (no weights can be downloaded here).

Builds SD1.5-like and SDXL-like diffusers directories from small configs under a fixed seed —
diffusers' own test habit — with an offline CLIP tokenizer, and saves them with ``save_pretrained``
so they load through exactly the code path real checkpoints use. Shapes keep the real structure
where it matters to the serving stack: 4 latent channels, a VAE that downsamples by 8, 77-token
CLIP prompts, SDXL's two encoders, pooled embeds and time ids. The pieces here (VAE and CLIP
configs, the tokenizer, ``SEED``, the version marker) are shared by the families' tiny writers: the
SD family's single files and folders, Omni-Zero's SDXL base (``diffserve.engine.models.omni_zero.tiny``) and
FLUX.1-schnell with its subject LoRA (``diffserve.engine.models.ominicontrol.tiny``); ``diffserve.engine.tiny.demo``
writes one set of artifacts per family.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

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
