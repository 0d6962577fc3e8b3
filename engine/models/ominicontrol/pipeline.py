"""OminiControl subject-driven generation on FLUX.1-schnell (slug ``ominicontrol``; Tan et al. 2024).

The input image is center-cropped to a square, resized to 512², VAE-encoded and packed into
1024 condition tokens whose RoPE ids are shifted by ``POSITION_DELTA`` = (0, 32) columns, so the
subject sits beside the generated image rather than on it. The condition tokens run through
every block at timestep 0 with the subject LoRA on them alone. Schnell's flow-matching Euler loop
is ``diffserve.engine.models.ominicontrol.flux``'s; only image tokens are decoded.

Two condition modes (``condition_mode``; the default from ``components.condition_mode``, which the
serving stubs set from ``EngineOptions.ominicontrol_condition``):

* ``joint`` (default) reproduces the reference generation code as shipped
  (Yuanshi9815/OminiControl ``generate`` with ``kv_cache=False``) and the subject LoRA's training
  (``union_cond_attn``, no independent condition): in every block text, image and condition
  tokens all attend to one another, so the condition tokens go through the ``transformer`` at
  every step.
* ``cached`` is the reference's optional independent condition (``kv_cache=True``): condition
  tokens attend only to themselves, so their per-block keys/values (``condition_kv``) are computed
  once per request and ``transformer_cached`` attends to them. Faster, but the images differ from
  the reference default (the LoRA was not trained so); see the README for the measured gap.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch

from diffserve.engine.catalog import InvalidRequest, get_model, resolve_seed
from diffserve.engine.components import Components, ConditionKV, ConditionTokens
from diffserve.engine.descriptors import OMINICONTROL_CONDITION_MODES
from diffserve.engine.models.ominicontrol import flux
from diffserve.engine.pipelines.common import (
    GenerationResult, RunControl, StageTimer, image_to_tensor, make_generator, sample_latent_dist,
)

STEP_BATCHED = True
"""Concurrent requests share the transformer's calls (``flux.FluxLoop`` through a ``StepBatcher``), in both
condition modes."""

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
    """The condition of one request, as each step's ``transformer`` call takes it.

    ``joint``: the condition tokens themselves, every step. ``cached``: their per-block
    keys/values, computed on the first call and reused with ``cache`` (else recomputed at every
    step, giving the same numbers: in this mode they do not depend on the step).
    """

    def __init__(self, components: Components, tokens: torch.Tensor, ids: torch.Tensor, pooled: torch.Tensor,
                 lora_scale: float, strength: float, cache: bool, mode: str = "joint"):
        self.components = components
        self.tokens, self.ids, self.pooled = tokens, ids, pooled
        batch = tokens.shape[0]
        self.lora_scale = torch.full((batch, 1), float(lora_scale), device=tokens.device)
        # Logits between condition and other tokens get log(strength): 1 = as trained, 0 = condition off exactly.
        self.bias = torch.full((batch, 1), math.log(strength) if strength > 0 else -math.inf, device=tokens.device)
        self.cache = cache
        self.mode = mode
        self._kv: ConditionKV | None = None

    @property
    def shape_key(self) -> tuple:
        """Conditions with equal keys can share one transformer call (``flux.FluxLoop.shape_key``): the same
        mode and token count, and in the joint mode the same condition position ids (passed once per call).
        Everything else — tokens, cached keys/values, lora scale, bias — is per row."""
        ids = flux.ids_key(self.ids) if self.mode == "joint" else None
        return self.mode, tuple(self.tokens.shape[1:]), ids, self.tokens.dtype

    def compute(self) -> ConditionKV:
        key, value = self.components.condition_kv(self.tokens, self.ids, self.pooled, self.lora_scale)
        return ConditionKV(key, value, self.bias)

    def __call__(self, step: int) -> ConditionTokens | ConditionKV:
        if self.mode == "joint":
            return ConditionTokens(self.tokens, self.ids, self.lora_scale, self.bias)
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
    condition_mode: str | None = None,
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
    mode = condition_mode or components.condition_mode
    if mode not in OMINICONTROL_CONDITION_MODES:
        raise ValueError(f"condition_mode must be one of {', '.join(OMINICONTROL_CONDITION_MODES)}, got {mode!r}")
    seed = resolve_seed(seed)
    generator = make_generator(seed)

    # 2. Encode the prompt
    with timer.stage("encode_text"):
        embeds = flux.encode_prompt(components, prompt, num_images, max_sequence_length)

    # 3. Prepare latents (noise is drawn before the condition's posterior sample, as in the reference)
    latents, img_ids = flux.prepare_latents(components, num_images, width, height, generator)

    # 4. Encode the condition image into tokens; in the cached mode, its keys/values once
    with timer.stage("encode_image"):
        tokens, ids = encode_condition(components, image, num_images, generator)
    condition = SubjectCondition(components, tokens, ids, embeds.pooled, lora_scale, condition_strength,
                                 cache_condition, mode)
    if mode == "cached" and cache_condition:
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
