"""SDXL text-to-image (slug ``segmind-vega``): two text encoders, pooled embeds, time ids.

Reproduces ``diffusers.StableDiffusionXLPipeline`` (no refiner, no watermark) step for step.
"""

from __future__ import annotations

from typing import Any

from engine.catalog import resolve_seed
from engine.components import Components
from engine.pipelines.common import (
    GenerationResult, RunControl, StageTimer, check_size, decode_latents, denoise, encode_prompt_sdxl,
    make_generator, randn, sdxl_time_ids,
)
from engine.schedulers import make_scheduler


def generate(
    components: Components,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    width: int = 1024,
    height: int = 1024,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    num_images: int = 1,
    seed: int = -1,
    scheduler: str = "DPM2 Karras",
    control: RunControl | None = None,
) -> GenerationResult:
    control = control or RunControl()
    cfg = components.config
    timer = StageTimer(components.device)

    # 1. Check inputs
    check_size(width, height, cfg.vae_scale_factor)
    seed = resolve_seed(seed)
    generator = make_generator(seed)
    guidance = guidance_scale > 1.0

    # 2. Encode the prompt with both encoders
    with timer.stage("encode_text"):
        embeds = encode_prompt_sdxl(components, prompt, negative_prompt, num_images, guidance)

    # 3. Prepare timesteps
    sched = make_scheduler(scheduler, cfg.scheduler_config)
    sched.set_timesteps(num_inference_steps, device=components.device)
    timesteps = sched.timesteps

    # 4. Prepare latents and micro-conditioning
    shape = (num_images, cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
    latents = randn(shape, generator).to(components.device) * sched.init_noise_sigma
    time_ids = sdxl_time_ids(components, width, height, embeds.hidden.shape[0])

    # 5. Denoising loop
    with timer.stage("denoise"):
        latents = denoise(components, sched, latents, timesteps, embeds, guidance_scale, generator, control,
                          time_ids=time_ids)

    # 6. Decode
    with timer.stage("decode"):
        images = decode_latents(components, latents)
    return GenerationResult(images=images, seed=seed, steps=len(timesteps), timings=timer.finish())


def run(params: dict[str, Any], components: Components, control: RunControl | None = None) -> GenerationResult:
    """Run a request validated against the ``segmind-vega`` catalog entry."""
    return generate(
        components,
        prompt=params["prompt"],
        negative_prompt=params.get("negative_prompt"),
        width=params["img_width"],
        height=params["img_height"],
        num_inference_steps=params["num_inference_steps"],
        guidance_scale=params["guidance_scale"],
        num_images=params["samples"],
        seed=params["seed"],
        scheduler=params["scheduler"],
        control=control,
    )
