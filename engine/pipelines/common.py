"""Pieces shared by the denoising pipelines: prompt encoding, noise, the loop, decoding.

Each helper reproduces the corresponding step of diffusers' reference pipelines operation for
operation (same tokenisation, same order of random draws from one CPU generator, same guidance
formula), which is what lets the pipelines match diffusers to float precision.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import PIL.Image
import torch

from diffserve.engine.catalog import InvalidRequest
from diffserve.engine.components import Components
from diffserve.engine.planned_loop import PlannedLoop, SchedulerPlan, try_plan


class Cancelled(RuntimeError):
    """The caller asked to stop; raised between denoising steps."""


@dataclass
class RunControl:
    """Hooks a caller passes into a pipeline run."""

    on_step: Callable[[int, int], None] | None = None
    """Called with (steps done, total steps) after every UNet step."""
    is_cancelled: Callable[[], bool] | None = None
    """Polled before every UNet step; True stops the run with ``Cancelled``."""
    driver: Callable[["DenoiseLoop", "RunControl"], torch.Tensor] | None = None
    """Runs a ``DenoiseLoop`` to its final latents (``diffserve.engine.batching.StepBatcher.run``: batched with
    other requests); None runs it in the calling thread, alone. Omni-Zero's ``OmniZeroLoop`` and FLUX's
    ``FluxLoop`` are driven the same way."""

    def step_done(self, done: int, total: int) -> None:
        if self.on_step is not None:
            self.on_step(done, total)

    def check(self) -> None:
        if self.is_cancelled is not None and self.is_cancelled():
            raise Cancelled("cancelled")


@dataclass
class GenerationResult:
    images: np.ndarray
    """float32 [N, H, W, 3] in [0, 1] (diffusers' ``output_type="np"``)."""
    seed: int
    steps: int
    """UNet evaluations run (one per scheduler timestep; a CFG pair counts once)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: encode_text, encode_image, denoise, decode, total."""
    batch: dict[str, int] = field(default_factory=dict)
    """Step batching of this run (``diffserve.engine.batching.PipelineRunner``): ``requests`` and ``rows``, the most of
    each in one UNet call it took part in; empty when it ran alone."""

    def to_uint8(self) -> np.ndarray:
        return to_uint8(self.images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    # Same rounding as diffusers' numpy_to_pil: (x * 255).round()
    return (images * 255).round().astype(np.uint8)


class StageTimer:
    """Wall-clock per stage, synchronising the device so GPU work is attributed correctly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                timer._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer._sync()
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()

    def finish(self) -> dict[str, float]:
        self._sync()
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings


def make_generator(seed: int) -> torch.Generator:
    """One CPU generator per request: the noise is the same on every device and runtime."""
    return torch.Generator("cpu").manual_seed(seed)


def randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def check_size(width: int, height: int, multiple: int) -> None:
    if width % multiple or height % multiple:
        raise InvalidRequest(f"width and height must be multiples of {multiple}, got {width}x{height}")


# -- text -----------------------------------------------------------------------------------------

def tokenize(components: Components, index: int, texts: list[str], max_length: int | None = None) -> torch.Tensor:
    tok = components.tokenizer(index)
    return tok(
        texts,
        padding="max_length",
        max_length=max_length or tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@dataclass
class PromptEmbeds:
    """Conditioning for the UNet, already arranged as [uncond × N, cond × N] under CFG."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def encode_prompt_sd15(components: Components, prompt: str, negative_prompt: str | None,
                       num_images: int, guidance: bool) -> PromptEmbeds:
    """CLIP last hidden state of the prompt (and of the negative prompt or "" under CFG)."""
    cond = components.text_encoder(0, tokenize(components, 0, [prompt])).last_hidden_state
    embeds = cond.repeat_interleave(num_images, dim=0)
    if guidance:
        ids = tokenize(components, 0, [negative_prompt or ""], max_length=cond.shape[1])
        uncond = components.text_encoder(0, ids).last_hidden_state
        embeds = torch.cat([uncond.repeat_interleave(num_images, dim=0), embeds])
    return PromptEmbeds(hidden=embeds)


def encode_prompt_sdxl(components: Components, prompt: str, negative_prompt: str | None,
                       num_images: int, guidance: bool) -> PromptEmbeds:
    """Both encoders' penultimate hidden states concatenated, plus the second encoder's pooled embeds.

    With no negative prompt and ``force_zeros_for_empty_prompt`` (SDXL's default), the
    unconditional embeddings are zeros rather than the encoding of "".
    """

    def encode(text: str, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for i in range(components.config.num_text_encoders):
            out = components.text_encoder(i, tokenize(components, i, [text], max_length))
            hidden.append(out.penultimate_hidden_state)
            pooled = out.pooled  # the last encoder's projection is the pooled conditioning
        return torch.cat(hidden, dim=-1), pooled

    hidden, pooled = encode(prompt)
    hidden, pooled = hidden.repeat_interleave(num_images, 0), pooled.repeat_interleave(num_images, 0)
    if guidance:
        if negative_prompt is None and components.config.force_zeros_for_empty_prompt:
            neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        else:
            neg_hidden, neg_pooled = encode(negative_prompt or "", max_length=hidden.shape[1])
            neg_hidden = neg_hidden.repeat_interleave(num_images, 0)
            neg_pooled = neg_pooled.repeat_interleave(num_images, 0)
        hidden, pooled = torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled])
    return PromptEmbeds(hidden=hidden, pooled=pooled)


def sdxl_time_ids(components: Components, width: int, height: int, batch: int) -> torch.Tensor:
    """SDXL micro-conditioning: (original size, crop top-left, target size), no crop."""
    ids = [height, width, 0, 0, height, width]
    cfg = components.config
    if cfg.addition_time_embed_dim is None:
        raise ValueError("checkpoint UNet has no addition_time_embed_dim; not an SDXL checkpoint")
    return torch.tensor([ids], dtype=torch.float32).repeat(batch, 1)


# -- images ----------------------------------------------------------------------------------------

def image_to_tensor(image: np.ndarray | PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB uint8 image [H, W, 3] -> [1, 3, H, W] float in [-1, 1], resized to (width, height) if needed.

    Images reach the pipelines as uint8 arrays (an alpha channel is dropped). The resize is PIL's
    Lanczos, as in diffusers' ``VaeImageProcessor``, so results stay equal to diffusers'; a PIL image
    is accepted too, for pipelines that crop with PIL before encoding (OminiControl).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InvalidRequest(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        image = PIL.Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), PIL.Image.Resampling.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def sample_latent_dist(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw from the VAE posterior N(mean, exp(logvar)) as diffusers' DiagonalGaussianDistribution does."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * randn(tuple(mean.shape), generator).to(mean.device)


def decode_latents(components: Components, latents: torch.Tensor) -> np.ndarray:
    cfg = components.config
    if cfg.vae_latents_mean is not None and cfg.vae_latents_std is not None:
        c = cfg.latent_channels
        mean = torch.tensor(cfg.vae_latents_mean).view(1, c, 1, 1).to(latents)
        std = torch.tensor(cfg.vae_latents_std).view(1, c, 1, 1).to(latents)
        latents = latents * std / cfg.vae_scaling_factor + mean
    else:
        latents = latents / cfg.vae_scaling_factor
    image = components.vae_decode(latents)
    image = (image * 0.5 + 0.5).clamp(0, 1)
    return image.cpu().permute(0, 2, 3, 1).float().numpy()


# -- denoising -------------------------------------------------------------------------------------

def step_kwargs(scheduler, generator: torch.Generator, eta: float = 0.0) -> dict:
    """``eta`` and ``generator`` only for schedulers whose ``step`` accepts them (as diffusers does)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


class GuidedLoop:
    """A request's classifier-free-guided loop over a diffusers scheduler, as a step object.

    Holds what every such loop has: the scheduler (or, with ``components.device_scheduler``, its
    precomputed ``PlannedLoop``), the timesteps, the latents, the guidance scale and the progress
    (``done`` of ``total``). ``step_input()`` gives the current step's (model input, timestep) —
    twice the rows under guidance — and ``advance(noise_pred)`` guides the denoiser's output for
    those rows and takes the scheduler step, with ``step_kwargs(i)`` passed to ``scheduler.step``.
    A subclass adds its own denoiser inputs (``model_inputs``), ``shape_key`` and the kwargs.
    ``run_loop`` drives one alone; ``diffserve.engine.batching.StepBatcher`` drives many at once.
    """

    denoiser = "unet"
    """The component the loop's ``model_inputs`` are for."""

    def __init__(self, scheduler, timesteps: torch.Tensor, latents: torch.Tensor, guidance_scale: float,
                 planned: PlannedLoop | None = None):
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.latents = latents
        self.guidance_scale = guidance_scale
        self.guidance = guidance_scale > 1.0
        self.total = len(timesteps)
        self.done = 0
        self._planned = planned

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def rows(self) -> int:
        """Rows this loop adds to a denoiser call."""
        return self.latents.shape[0] * (2 if self.guidance else 1)

    def step_kwargs(self, i: int) -> dict:
        """Extra keyword arguments of step ``i``'s ``scheduler.step`` (not used by a planned loop)."""
        return {}

    def step_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, timestep [rows]) of the current step."""
        i = self.done
        if self._planned is not None:
            model_input = planned_input(self._planned, i, self.guidance)
            timestep = self._planned.timestep(i, model_input.shape[0])
        else:
            t = self.timesteps[i]
            model_input = torch.cat([self.latents] * 2) if self.guidance else self.latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = t.to(torch.float32).expand(model_input.shape[0])
        return model_input, timestep

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guide the denoiser's output for this loop's rows and take the scheduler step."""
        i = self.done
        if self._planned is not None:
            self.latents = planned_advance(self._planned, i, noise_pred, self.guidance_scale)
        else:
            if self.guidance:
                # Classifier-free guidance, eq. (6) of Ho & Salimans 2022.
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + self.guidance_scale * (cond - uncond)
            self.latents = self.scheduler.step(noise_pred, self.timesteps[i], self.latents, **self.step_kwargs(i),
                                               return_dict=False)[0]
        self.done = i + 1


class DenoiseLoop(GuidedLoop):
    """One SD request's denoising loop as a step object: scale input, UNet, classifier-free guidance, step.

    ``model_inputs()`` gives this step's UNet arguments (twice the rows under CFG) and
    ``advance(noise_pred)`` applies the request's guidance and scheduler step to the UNet's output
    for those rows. ``denoise`` drives it alone; ``diffserve.engine.batching.StepBatcher`` drives many at once,
    concatenating the inputs of the loops whose ``shape_key`` agree into one UNet call. Everything
    that makes a request's image — scheduler, generator, guidance — stays inside the loop, so its
    output is the same alone or batched (up to the UNet's rounding at another batch size).

    With ``components.device_scheduler`` the scheduler runs as a precomputed plan (the same
    arithmetic up to rounding, nothing read back to the host between steps) where it can.
    """

    def __init__(self, components: Components, scheduler, latents: torch.Tensor, timesteps: torch.Tensor,
                 embeds: PromptEmbeds, guidance_scale: float, generator: torch.Generator,
                 time_ids: torch.Tensor | None = None):
        planned = None
        plan = device_plan(components, scheduler, timesteps, noise=None)
        if plan is not None:
            noise = None
            if plan.noise:
                # The step would draw one latents-shaped N(0, I) per step from the request's generator
                # (SDE-DPM++): the same draws, in the same order, before the loop.
                noise = torch.stack([randn(tuple(latents.shape), generator)
                                     for _ in range(len(timesteps))]).to(latents.device)
            planned = PlannedLoop(plan, latents, noise)
        super().__init__(scheduler, timesteps, latents, guidance_scale, planned)
        self.embeds = embeds
        self.time_ids = time_ids
        self._extra = step_kwargs(scheduler, generator)

    def step_kwargs(self, i: int) -> dict:
        return self._extra

    @property
    def shape_key(self) -> tuple:
        """Loops with equal keys can share one UNet call (same latent and conditioning shapes)."""
        pooled = None if self.embeds.pooled is None else tuple(self.embeds.pooled.shape[1:])
        time_ids = None if self.time_ids is None else tuple(self.time_ids.shape[1:])
        return (tuple(self.latents.shape[1:]), tuple(self.embeds.hidden.shape[1:]), pooled, time_ids,
                self.latents.dtype, self.latents.device)

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                    torch.Tensor | None]:
        """(sample, timestep [rows], encoder_hidden_states, text_embeds, time_ids) of the current step."""
        model_input, timestep = self.step_input()
        return model_input, timestep, self.embeds.hidden, self.embeds.pooled, self.time_ids


def run_loop(components: Components, loop, control: RunControl) -> torch.Tensor:
    """Run a step-object loop (``diffserve.engine.batching.BatchedLoop``) to its final latents: by
    ``control.driver`` (a step batcher) with other requests, or alone here.

    Alone, the loop's ``denoiser`` component (default ``unet``) takes its ``inputs()`` where it has
    one (the call's arguments without the batcher's ``Shared`` wrappers), else its ``model_inputs()``;
    positional or keyword.
    """
    if control.driver is not None:
        return control.driver(loop, control)
    denoiser = getattr(components, getattr(loop, "denoiser", "unet"))
    inputs = getattr(loop, "inputs", loop.model_inputs)
    while not loop.finished:
        control.check()
        args = inputs()
        loop.advance(denoiser(**args) if isinstance(args, Mapping) else denoiser(*args))
        control.step_done(loop.done, loop.total)
    return loop.latents


def denoise(
    components: Components,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: PromptEmbeds,
    guidance_scale: float,
    generator: torch.Generator,
    control: RunControl,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the SD denoising loop: alone here, or by ``control.driver`` (a step batcher) with other requests."""
    loop = DenoiseLoop(components, scheduler, latents, timesteps, embeds, guidance_scale, generator, time_ids)
    return run_loop(components, loop, control)


def device_plan(components: Components, scheduler, timesteps: torch.Tensor, **kwargs) -> SchedulerPlan | None:
    """The scheduler plan when the components ask for one and the scheduler is linear, else None."""
    if not getattr(components, "device_scheduler", False):
        return None
    kwargs.setdefault("init_sigma", float(getattr(scheduler, "init_noise_sigma", 1.0)))
    return try_plan(scheduler, timesteps, **kwargs)


def planned_input(loop: PlannedLoop, i: int, guidance: bool) -> torch.Tensor:
    """Step ``i``'s model input (twice under classifier-free guidance)."""
    x = loop.model_input(i)
    return torch.cat([x, x]) if guidance else x


def planned_advance(loop: PlannedLoop, i: int, noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Guide ``noise_pred`` straight into the plan's source row of step ``i``, then step: x_{i+1}.

    Guidance does the operations of ``uncond + scale * (cond - uncond)``, so the same bits.
    """
    if guidance_scale <= 1.0:
        return loop.advance(i, noise_pred)
    uncond, cond = noise_pred.chunk(2)
    out = loop.output_row(i)
    torch.sub(cond, uncond, out=out)
    out.mul_(guidance_scale).add_(uncond)
    return loop.advance(i)
