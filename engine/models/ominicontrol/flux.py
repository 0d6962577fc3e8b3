"""FLUX.1-schnell text-to-image: CLIP pooled + T5 sequence embeddings, packed latents, flow matching.

Reproduces ``diffusers.FluxPipeline`` without true CFG (schnell is guidance-distilled): the 16-channel
latents are packed into 2x2 patches (64-wide tokens) with (0, row, column) position ids, and
``FlowMatchEulerDiscreteScheduler`` integrates the predicted velocity over the sigmas
``linspace(1, 1/n, n)`` (schnell's config: no shift). The pieces are public so OminiControl
(``diffserve.engine.models.ominicontrol.pipeline``) runs this same loop with condition tokens; ``generate`` is the
plain loop, not served under a slug of its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from diffserve.engine.batching import Shared
from diffserve.engine.catalog import InvalidRequest, resolve_seed
from diffserve.engine.components import Components, ConditionKV, ConditionTokens
from diffserve.engine.pipelines.common import (
    GenerationResult, RunControl, StageTimer, device_plan, make_generator, randn, run_loop, tokenize,
)
from diffserve.engine.planned_loop import PlannedLoop


@dataclass
class FluxPromptEmbeds:
    sequence: torch.Tensor
    """[B, T, joint_attention_dim]: T5 last hidden state."""
    pooled: torch.Tensor
    """[B, pooled_projection_dim]: CLIP pooler output."""
    text_ids: torch.Tensor
    """[T, 3] zeros: text tokens sit at the RoPE origin."""


def check_inputs(components: Components, width: int, height: int) -> None:
    cfg = components.config
    if cfg.family != "flux" or cfg.transformer is None:
        raise ValueError(f"checkpoint family is {cfg.family!r}; this pipeline needs a FLUX checkpoint")
    if cfg.transformer.guidance_embeds:
        raise ValueError("this checkpoint's transformer has a guidance embedding (FLUX.1-dev); "
                         "the pipeline serves guidance-free FLUX.1-schnell")
    multiple = 2 * cfg.vae_scale_factor  # 2x2 packing of latents
    if width % multiple or height % multiple:
        raise InvalidRequest(f"width and height must be multiples of {multiple}, got {width}x{height}")


def encode_prompt(components: Components, prompt: str, num_images: int,
                  max_sequence_length: int | None = None) -> FluxPromptEmbeds:
    """CLIP's pooled output and T5's hidden states, as ``FluxPipeline.encode_prompt``."""
    max_len = max_sequence_length or components.config.max_sequence_length
    pooled = components.text_encoder(0, tokenize(components, 0, [prompt])).pooled
    sequence = components.t5_text_encoder(tokenize(components, 1, [prompt], max_length=max_len))
    return FluxPromptEmbeds(
        sequence=sequence.repeat_interleave(num_images, dim=0),
        pooled=pooled.repeat_interleave(num_images, dim=0),
        text_ids=torch.zeros(sequence.shape[1], 3, device=sequence.device),
    )


# -- packed latents ---------------------------------------------------------------------------------

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, N, 4C] -> [B, C, H, W] for latent height and width (image size / vae_scale_factor)."""
    b, _, channels = latents.shape
    latents = latents.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_ids(rows: int, cols: int, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """[rows * cols, 3] RoPE ids (0, row, column) of packed tokens, shifted by ``offset`` (row, column)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None] + offset[0]
    ids[..., 2] = torch.arange(cols)[None, :] + offset[1]
    return ids.reshape(rows * cols, 3)


def prepare_latents(components: Components, num_images: int, width: int, height: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed noise [B, N, 4C] and its ids [N, 3], drawn as ``FluxPipeline.prepare_latents`` draws it."""
    cfg = components.config
    h, w = height // cfg.vae_scale_factor, width // cfg.vae_scale_factor
    noise = randn((num_images, cfg.latent_channels, h, w), generator).to(components.device)
    return pack_latents(noise), latent_ids(h // 2, w // 2).to(components.device)


# -- schedule and loop --------------------------------------------------------------------------------

def calculate_shift(image_seq_len: int, config: dict) -> float:
    """mu of the resolution-dependent shift (FLUX.1-dev); schnell's config disables it (shift 1, static)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flow_match_scheduler(components: Components, num_inference_steps: int, image_seq_len: int):
    """A fresh flow-matching Euler scheduler over sigmas linspace(1, 1/n, n), as FluxPipeline sets it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = components.config.scheduler_config
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=sigmas, device=components.device, mu=calculate_shift(image_seq_len, config))
    scheduler.set_begin_index(0)
    return scheduler


def ids_key(ids: torch.Tensor) -> tuple:
    """A key equal for equal position ids (their shape and a digest of their values): what lets requests share
    one ``Shared`` id tensor in a batched call."""
    return tuple(ids.shape), hashlib.sha1(ids.detach().float().cpu().numpy().tobytes()).hexdigest()


class FluxLoop:
    """One request's FLUX loop as a step object: the transformer's velocity, then the request's own
    flow-matching Euler step (or its device-scheduler plan).

    ``model_inputs()`` gives one step's ``transformer`` arguments and ``advance(velocity)`` takes the
    step, as ``diffserve.engine.pipelines.common.DenoiseLoop`` does for the UNet; ``denoise`` drives it
    alone, a ``diffserve.engine.batching.StepBatcher`` over the ``transformer`` with other requests. The
    scheduler (its sigmas and mu), the plan, the embeddings and the condition stay the request's own; what
    is shared in a batched call are the position ids (image, text, condition), the same for every request
    of one ``shape_key``.

    ``condition(step)`` supplies OminiControl's condition (tokens, or cached keys/values; per row, lora
    scale and bias included), and its ``shape_key`` says which conditions can share a call; a condition
    without one runs alone (its key is unique to this loop).
    """

    denoiser = "transformer"

    def __init__(self, components: Components, scheduler, latents: torch.Tensor, embeds: FluxPromptEmbeds,
                 img_ids: torch.Tensor, condition: Callable[[int], ConditionTokens | ConditionKV | None] | None = None):
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps
        self.embeds = embeds
        self.img_ids = img_ids
        self.condition = condition
        self.total = len(self.timesteps)
        self.done = 0
        self.latents = latents
        plan = device_plan(components, scheduler, self.timesteps, scale_input=False)
        self._planned = PlannedLoop(plan, latents) if plan is not None else None
        self._key: tuple | None = None

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    @property
    def shape_key(self) -> tuple:
        """Loops with equal keys can share one transformer call: same token and embedding shapes, the same
        position ids, the same kind of condition."""
        if self._key is None:
            if self.condition is None:
                cond = None
            else:
                cond = getattr(self.condition, "shape_key", None)
                if cond is None:
                    cond = ("alone", id(self))
            self._key = (tuple(self.latents.shape[1:]), tuple(self.embeds.sequence.shape[1:]),
                         tuple(self.embeds.pooled.shape[1:]), ids_key(self.img_ids), ids_key(self.embeds.text_ids),
                         cond, self.latents.dtype, self.latents.device)
        return self._key

    def inputs(self) -> tuple:
        """(hidden_states, sigma [rows], sequence, pooled, img_ids, text_ids, condition) of the current step: the
        call's arguments when the loop runs alone (``run_loop``)."""
        i = self.done
        if self._planned is not None:
            hidden = self._planned.model_input(i)
            sigma = self._planned.timestep(i, self.rows) / 1000
        else:
            hidden = self.latents
            # the transformer scales it back by 1000
            sigma = self.timesteps[i].expand(self.rows).to(self.latents.dtype) / 1000
        cond = self.condition(i) if self.condition is not None else None
        return hidden, sigma, self.embeds.sequence, self.embeds.pooled, self.img_ids, self.embeds.text_ids, cond

    def model_inputs(self) -> tuple:
        """``inputs()`` for a batched call: the position ids passed once (``Shared``), per-row tensors concatenated."""
        hidden, sigma, sequence, pooled, img_ids, text_ids, cond = self.inputs()
        if isinstance(cond, ConditionTokens):
            cond = cond._replace(ids=Shared(cond.ids))
        return hidden, sigma, sequence, pooled, Shared(img_ids), Shared(text_ids), cond

    def advance(self, velocity: torch.Tensor) -> None:
        """x <- x + (sigma_next - sigma) v for this loop's rows."""
        i = self.done
        if self._planned is not None:
            self.latents = self._planned.advance(i, velocity)
        else:
            self.latents = self.scheduler.step(velocity, self.timesteps[i], self.latents, return_dict=False)[0]
        self.done = i + 1


def denoise(
    components: Components,
    scheduler,
    latents: torch.Tensor,
    embeds: FluxPromptEmbeds,
    img_ids: torch.Tensor,
    control: RunControl,
    condition: Callable[[int], ConditionTokens | ConditionKV | None] | None = None,
) -> torch.Tensor:
    """Flow-matching Euler: velocity from the transformer, then x <- x + (sigma_next - sigma) v; alone here, or
    by ``control.driver`` (a step batcher over the transformer) with other requests.

    ``condition(step)`` supplies OminiControl's condition for a step (its tokens, or cached
    keys/values); ``None`` runs plain FLUX.
    """
    return run_loop(components, FluxLoop(components, scheduler, latents, embeds, img_ids, condition), control)


def decode(components: Components, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Unpack, undo the VAE's scaling and shift, decode; float32 NHWC in [0, 1]."""
    cfg = components.config
    latents = unpack_latents(latents, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
    latents = latents / cfg.vae_scaling_factor + (cfg.vae_shift_factor or 0.0)
    image = components.vae_decode(latents)
    return (image * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


def generate(
    components: Components,
    *,
    prompt: str,
    width: int = 1024,
    height: int = 1024,
    num_inference_steps: int = 4,
    num_images: int = 1,
    seed: int = -1,
    max_sequence_length: int | None = None,
    control: RunControl | None = None,
) -> GenerationResult:
    control = control or RunControl()
    timer = StageTimer(components.device)

    # 1. Check inputs
    check_inputs(components, width, height)
    if num_inference_steps < 1:
        raise InvalidRequest(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    seed = resolve_seed(seed)
    generator = make_generator(seed)

    # 2. Encode the prompt
    with timer.stage("encode_text"):
        embeds = encode_prompt(components, prompt, num_images, max_sequence_length)

    # 3. Prepare latents, then timesteps (mu depends on the token count)
    latents, img_ids = prepare_latents(components, num_images, width, height, generator)
    scheduler = flow_match_scheduler(components, num_inference_steps, latents.shape[1])

    # 4. Denoising loop
    with timer.stage("denoise"):
        latents = denoise(components, scheduler, latents, embeds, img_ids, control)

    # 5. Decode
    with timer.stage("decode"):
        images = decode(components, latents, width, height)
    return GenerationResult(images=images, seed=seed, steps=num_inference_steps, timings=timer.finish())
