"""SD1.5 image-to-image by SDEdit (slug ``sd1.5-img2img``; Meng et al. 2021).

The input image is VAE-encoded, noised to the timestep that ``strength`` selects, and denoised
from there: ``int(steps * strength)`` UNet steps run. Reproduces
``diffusers.StableDiffusionImg2ImgPipeline`` (without the safety checker) step for step.
``image`` is a decoded RGB uint8 array [H, W, 3], resized to (width, height) as diffusers does.
"""

from __future__ import annotations

import numpy as np

from diffserve.engine.catalog import InvalidRequest, resolve_seed
from diffserve.engine.components import Components
from diffserve.engine.pipelines.common import (
    GenerationResult, RunControl, StageTimer, check_size, decode_latents, denoise, encode_prompt_sd15,
    image_to_tensor, make_generator, randn, sample_latent_dist,
)
from diffserve.engine.schedulers import make_scheduler

STEP_BATCHED = True
"""The loop is a ``DenoiseLoop``: ``control.driver`` may batch it with other requests."""


def generate(
    components: Components,
    *,
    image: np.ndarray,
    prompt: str,
    negative_prompt: str | None = None,
    width: int = 512,
    height: int = 512,
    strength: float = 1.0,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    num_images: int = 1,
    seed: int = -1,
    scheduler: str = "DDIM",
    control: RunControl | None = None,
) -> GenerationResult:
    control = control or RunControl()
    cfg = components.config
    timer = StageTimer(components.device)

    # 1. Check inputs
    check_size(width, height, cfg.vae_scale_factor)
    if not 0.0 <= strength <= 1.0:
        raise InvalidRequest(f"strength must be in [0, 1], got {strength}")
    seed = resolve_seed(seed)
    generator = make_generator(seed)
    guidance = guidance_scale > 1.0

    # 2. Encode the prompt
    with timer.stage("encode_text"):
        embeds = encode_prompt_sd15(components, prompt, negative_prompt, num_images, guidance)

    # 3. Prepare timesteps: skip the first (1 - strength) of the schedule
    sched = make_scheduler(scheduler, cfg.scheduler_config)
    sched.set_timesteps(num_inference_steps, device=components.device)
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_steps, 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    if len(timesteps) == 0:
        raise InvalidRequest(f"strength {strength} with {num_inference_steps} steps leaves no denoising step")

    # 4. Encode the image and noise it to the first timestep (SDEdit)
    with timer.stage("encode_image"):
        pixels = image_to_tensor(image, width, height).to(components.device)
        moments = components.vae_encode(pixels)
    init = sample_latent_dist(moments, generator) * cfg.vae_scaling_factor
    init = init.repeat(num_images, 1, 1, 1)
    noise = randn(tuple(init.shape), generator).to(init.device)
    latents = sched.add_noise(init, noise, timesteps[:1].repeat(num_images))

    # 5. Denoising loop
    with timer.stage("denoise"):
        latents = denoise(components, sched, latents, timesteps, embeds, guidance_scale, generator, control)

    # 6. Decode
    with timer.stage("decode"):
        images = decode_latents(components, latents)
    return GenerationResult(images=images, seed=seed, steps=len(timesteps), timings=timer.finish())
