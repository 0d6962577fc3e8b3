"""Text-to-image for the SD1.5 and SDXL families (slugs ``sd1.5-scifi`` and ``segmind-vega``).

One body for both: CFG with a negative prompt and several samples per batch. The family of the
checkpoint (``components.config.family``) chooses the two places where they differ — SD1.5
conditions on one CLIP encoder's last hidden state; SDXL on both encoders' penultimate states,
the second encoder's pooled embeds and the size micro-conditioning (``time_ids``). Reproduces
``diffusers.StableDiffusionPipeline`` (without the safety checker) and
``diffusers.StableDiffusionXLPipeline`` (no refiner, no watermark) step for step. Arguments left
out take the defaults of the family's catalog entry.
"""

from __future__ import annotations

from typing import Any

from diffserve.engine.catalog import CATALOG, ModelSpec, resolve_seed
from diffserve.engine.components import Components
from diffserve.engine.pipelines.common import (
    GenerationResult, RunControl, StageTimer, check_size, decode_latents, denoise, encode_prompt_sd15,
    encode_prompt_sdxl, make_generator, randn, sdxl_time_ids,
)
from diffserve.engine.schedulers import make_scheduler

FAMILIES = ("sd15", "sdxl")
STEP_BATCHED = True
"""The loop is a ``DenoiseLoop``: ``control.driver`` may batch it with other requests."""


def catalog_entry(family: str) -> ModelSpec:
    """The catalog entry this pipeline serves for checkpoints of ``family``."""
    for spec in CATALOG.values():
        if spec.pipeline == "txt2img" and spec.architecture == family:
            return spec
    raise ValueError(f"txt2img runs {' and '.join(FAMILIES)} checkpoints, not {family!r} ones")


def generate(
    components: Components,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    width: int | None = None,
    height: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    num_images: int = 1,
    seed: int = -1,
    scheduler: str | None = None,
    control: RunControl | None = None,
) -> GenerationResult:
    control = control or RunControl()
    cfg = components.config
    timer = StageTimer(components.device)

    # 1. Check inputs (and fill what the caller left out from the family's catalog entry)
    defaults: dict[str, Any] = {p.name: p.default for p in catalog_entry(cfg.family).params}
    width = defaults["img_width"] if width is None else width
    height = defaults["img_height"] if height is None else height
    num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    scheduler = defaults["scheduler"] if scheduler is None else scheduler
    check_size(width, height, cfg.vae_scale_factor)
    sdxl = cfg.family == "sdxl"
    seed = resolve_seed(seed)
    generator = make_generator(seed)
    guidance = guidance_scale > 1.0

    # 2. Encode the prompt (SDXL: with both encoders, plus pooled embeds)
    with timer.stage("encode_text"):
        encode_prompt = encode_prompt_sdxl if sdxl else encode_prompt_sd15
        embeds = encode_prompt(components, prompt, negative_prompt, num_images, guidance)

    # 3. Prepare timesteps
    sched = make_scheduler(scheduler, cfg.scheduler_config)
    sched.set_timesteps(num_inference_steps, device=components.device)
    timesteps = sched.timesteps

    # 4. Prepare latents: N(0, I) scaled to the scheduler's initial sigma (SDXL: and micro-conditioning)
    shape = (num_images, cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
    latents = randn(shape, generator).to(components.device) * sched.init_noise_sigma
    time_ids = sdxl_time_ids(components, width, height, embeds.hidden.shape[0]) if sdxl else None

    # 5. Denoising loop
    with timer.stage("denoise"):
        latents = denoise(components, sched, latents, timesteps, embeds, guidance_scale, generator, control,
                          time_ids=time_ids)

    # 6. Decode
    with timer.stage("decode"):
        images = decode_latents(components, latents)
    return GenerationResult(images=images, seed=seed, steps=len(timesteps), timings=timer.finish())
