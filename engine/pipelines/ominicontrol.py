"""OminiControl subject-driven generation on FLUX.1-schnell (slug ``ominicontrol``; Tan et al. 2024).

The input image is center-cropped to a square, resized to 512², VAE-encoded and packed into
1024 condition tokens whose RoPE ids are shifted by ``POSITION_DELTA`` = (0, 32) columns, so the
subject sits beside the generated image rather than on it. The condition tokens run through
every block at timestep 0 with the subject LoRA on (``condition_kv`` component), and text and
image tokens attend to their keys/values in every joint attention (``transformer`` component).
Schnell's flow-matching Euler loop is ``engine.pipelines.flux``'s; only image tokens are decoded.

The condition tokens attend only to themselves, so their keys/values do not change with the
timestep: with ``cache_condition`` (the default) they are computed once per request instead of
once per step — same images, one condition pass instead of ``steps``.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch

from engine.catalog import InvalidRequest, get_model, resolve_seed
from engine.components import Components, ConditionKV
from engine.pipelines import flux
from engine.pipelines.common import (
    GenerationResult, RunControl, StageTimer, image_to_tensor, make_generator, sample_latent_dist,
)

OUTPUT_SIZE = get_model("ominicontrol").output_size
"""(width, height) of the generated image: 512x512, the subject model's training and demo size."""
CONDITION_SIZE = 512
"""Side of the square condition image (1024 packed tokens at FLUX's 8x VAE)."""
POSITION_DELTA = (0, 32)
"""(row, column) shift of the condition tokens' RoPE ids: one 512 px image width to the right."""


def center_crop_square(image: PIL.Image.Image | np.ndarray, size: int) -> PIL.Image.Image:
    """The largest centered square of ``image``, resized to ``size``² (bicubic, as the reference demo)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InvalidRequest(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        image = PIL.Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.Resampling.BICUBIC)


class SubjectCondition:
    """The condition tokens of one request, and their per-block keys/values for each step.

    With ``cache`` the keys/values are computed on the first call and reused; without it they are
    recomputed at every step (what the reference does), giving the same numbers.
    """

    def __init__(self, components: Components, tokens: torch.Tensor, ids: torch.Tensor, pooled: torch.Tensor,
                 lora_scale: float, strength: float, cache: bool):
        self.components = components
        self.tokens, self.ids, self.pooled = tokens, ids, pooled
        batch = tokens.shape[0]
        self.lora_scale = torch.full((batch, 1), float(lora_scale), device=tokens.device)
        # Attention logits of condition keys get log(strength): 1 = as trained, 0 = condition off exactly.
        self.bias = torch.full((batch, 1), math.log(strength) if strength > 0 else -math.inf, device=tokens.device)
        self.cache = cache
        self._kv: ConditionKV | None = None

    def compute(self) -> ConditionKV:
        key, value = self.components.condition_kv(self.tokens, self.ids, self.pooled, self.lora_scale)
        return ConditionKV(key, value, self.bias)

    def __call__(self, step: int) -> ConditionKV:
        if not self.cache:
            return self.compute()
        if self._kv is None:
            self._kv = self.compute()
        return self._kv


def encode_condition(components: Components, image: PIL.Image.Image | np.ndarray, num_images: int,
                     generator: torch.Generator, size: int = CONDITION_SIZE,
                     position_delta: tuple[int, int] = POSITION_DELTA) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed condition tokens [B, Nc, 4C] and their shifted ids [Nc, 3]; the latent is a posterior sample."""
    cfg = components.config
    pixels = image_to_tensor(center_crop_square(image, size), size, size).to(components.device)
    latents = sample_latent_dist(components.vae_encode(pixels), generator)
    latents = (latents - (cfg.vae_shift_factor or 0.0)) * cfg.vae_scaling_factor
    tokens = flux.pack_latents(latents).repeat(num_images, 1, 1)
    rows, cols = latents.shape[2] // 2, latents.shape[3] // 2
    return tokens, flux.latent_ids(rows, cols, position_delta).to(components.device)


def generate(
    components: Components,
    *,
    image: PIL.Image.Image | np.ndarray,
    prompt: str,
    width: int = OUTPUT_SIZE[0],
    height: int = OUTPUT_SIZE[1],
    num_inference_steps: int = 8,
    num_images: int = 1,
    seed: int = -1,
    condition_strength: float = 1.0,
    lora_scale: float = 1.0,
    cache_condition: bool = True,
    max_sequence_length: int | None = None,
    control: RunControl | None = None,
) -> GenerationResult:
    control = control or RunControl()
    timer = StageTimer(components.device)

    # 1. Check inputs
    flux.check_inputs(components, width, height)
    if num_inference_steps < 1:
        raise InvalidRequest(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if condition_strength < 0:
        raise InvalidRequest(f"condition_strength must be >= 0, got {condition_strength}")
    seed = resolve_seed(seed)
    generator = make_generator(seed)

    # 2. Encode the prompt
    with timer.stage("encode_text"):
        embeds = flux.encode_prompt(components, prompt, num_images, max_sequence_length)

    # 3. Prepare latents (noise is drawn before the condition's posterior sample, as in the reference)
    latents, img_ids = flux.prepare_latents(components, num_images, width, height, generator)

    # 4. Encode the condition image into tokens; with the cache, its keys/values once
    with timer.stage("encode_image"):
        tokens, ids = encode_condition(components, image, num_images, generator)
    condition = SubjectCondition(components, tokens, ids, embeds.pooled, lora_scale, condition_strength,
                                 cache_condition)
    if cache_condition:
        with timer.stage("condition_kv"):
            condition(0)

    # 5. Prepare timesteps
    scheduler = flux.flow_match_scheduler(components, num_inference_steps, latents.shape[1])

    # 6. Denoising loop
    with timer.stage("denoise"):
        latents = flux.denoise(components, scheduler, latents, embeds, img_ids, control, condition)

    # 7. Decode the image tokens
    with timer.stage("decode"):
        images = flux.decode(components, latents, width, height)
    return GenerationResult(images=images, seed=seed, steps=num_inference_steps, timings=timer.finish())
