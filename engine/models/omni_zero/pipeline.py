"""Omni-Zero: zero-shot stylized portraits (slug ``omni-zero``; okaris/omni-zero, re-implemented).

SDXL ControlNet image-to-image from the base image, steered by
* three IP-Adapters: the InstantID face adapter on the identity face's 512-d ArcFace embedding
  (every cross-attention layer), and IP-Adapter Plus on CLIP ViT-H features twice — the style
  image in up block 0 only, the composition image in down block 2 only (InstantStyle);
* two ControlNets: IdentityNet on the face-keypoint drawing, with the face-adapter tokens as its
  cross-attention context, and a depth ControlNet on ``depth_image`` or a ZoeDepth map of the base
  image.
``identity_image_strength`` scales the face adapter and IdentityNet, ``style``/``composition``
the two Plus copies, ``depth_image_strength`` the depth ControlNet; the img2img strength is
``1 - base_image_strength``.

The reference's rules, reproduced: every image is resized to fit 1024x1024 keeping its aspect
ratio (sides rounded down to multiples of 8); no composition image means the base image, no base
image means the composition image; a user depth image and the base image are cropped to their
common size; the keypoints come from the base image's largest face when it has one, else from
the identity face. The scheduler is DPM-Solver++ SDE (``DPMSolverMultistepScheduler``,
``sde-dpmsolver++``, Karras sigmas, trailing spacing, zero final sigma) whose schedule the
reference replaces: NVIDIA's "Align Your Steps" SDXL sigmas, log-linearly interpolated to
``int(steps / strength) + 1`` points, of which the last ``steps + 1`` are used, so exactly
``number_of_steps`` UNet evaluations run at any strength. Its SDE noise comes from a Brownian tree
(torchsde) seeded by the request seed, like k-diffusion's DPM++ SDE samplers. Unconditional image
prompts are uniform noise seeded from the image's pixel sum, as in the reference.

Differences, on purpose: the reference draws that uniform noise with the device's global
generator and the img2img noise from a generator re-seeded with the seed; here all noise comes
from CPU generators, the img2img noise continuing the request's generator as diffusers does (so
results are the same on every device). The estimated depth map is produced at the base image's
size (the reference's annotator returns a larger map that ``align_images`` then crops from the
top-left, misaligning non-square images). The largest face is chosen by box area.
"""

from __future__ import annotations

import warnings
from typing import Any

import cv2
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffserve.engine.catalog import InvalidRequest, resolve_seed
from diffserve.engine.components import Components, IPTokens
from diffserve.engine.models.omni_zero.face_analysis import (
    DET_SIZE, Face, NoFaceDetected, align_face, decode_detections, draw_keypoints, largest_face, letterbox,
    recognition_input,
)
from diffserve.engine.models.omni_zero.checkpoint import (
    MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, depth_input_size, depth_padding, fit_size,
)
from diffserve.engine.pipelines.common import (
    GenerationResult, GuidedLoop, RunControl, StageTimer, decode_latents, device_plan, encode_prompt_sdxl,
    image_to_tensor, make_generator, randn, run_loop, sample_latent_dist, sdxl_time_ids,
)
from diffserve.engine.planned_loop import PlannedLoop

__all__ = ["NoFaceDetected", "OmniZeroLoop", "STEP_BATCHED", "generate"]

STEP_BATCHED = True
"""Requests run their loop as an ``OmniZeroLoop``, which a step batcher drives with others (``run_loop``)."""

# "Align Your Steps" (Sabour et al. 2024) 10-step noise levels for SDXL.
AYS_SDXL_SIGMAS = (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                   0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582)
UNCOND_SEED_MODULUS = 1_000_000_007
# CLIPImageProcessor's defaults (OpenAI CLIP normalisation), which IP-Adapter's encoder expects.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# controlnet_aux's ZoeDetector: normalise depth between these percentiles, near = bright.
DEPTH_PERCENTILES = (2, 85)

ImageInput = PIL.Image.Image | np.ndarray


# -- images ----------------------------------------------------------------------------------------

def as_pil(image: ImageInput) -> PIL.Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InvalidRequest(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        image = PIL.Image.fromarray(image)
    return image.convert("RGB")


def fit_image(image: ImageInput, max_side: int = MAX_IMAGE_SIDE, name: str = "image") -> PIL.Image.Image:
    """Resize to fit ``max_side`` x ``max_side`` keeping the aspect ratio, sides multiples of 8."""
    image = as_pil(image)
    width, height = fit_size(*image.size, max_side=max_side)
    shortest = max_side * MIN_IMAGE_SIDE // MAX_IMAGE_SIDE
    if min(width, height) < shortest:
        raise InvalidRequest(f"{name}: a {image.size[0]}x{image.size[1]} image fits {max_side}px as {width}x{height}; "
                         f"both sides must be at least {shortest}px (aspect ratio at most "
                         f"{MAX_IMAGE_SIDE // MIN_IMAGE_SIDE}:1)")
    return image.resize((width, height), PIL.Image.Resampling.BICUBIC)


def crop_to_common_size(a: PIL.Image.Image, b: PIL.Image.Image) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The reference's ``align_images``: crop both images from the top-left to their common size."""
    width, height = min(a.width, b.width), min(a.height, b.height)
    return a.crop((0, 0, width, height)), b.crop((0, 0, width, height))


def clip_pixels(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """CLIPImageProcessor: shortest side to ``size`` (bicubic), centre crop, OpenAI normalisation."""
    width, height = image.size
    if width <= height:
        resized = image.resize((size, int(size * height / width)), PIL.Image.Resampling.BICUBIC)
    else:
        resized = image.resize((int(size * width / height), size), PIL.Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def uncond_noise(pixels: torch.Tensor) -> torch.Tensor:
    """The reference's unconditional image prompt: uniform noise seeded by the input's value sum."""
    seed = int(pixels.float().mean(dim=0).sum().item()) % UNCOND_SEED_MODULUS
    return torch.rand(pixels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


# -- faces and depth ---------------------------------------------------------------------------------

def detect_faces(components: Components, image: PIL.Image.Image) -> list[Face]:
    array = np.asarray(image)
    blob, scale = letterbox(array, DET_SIZE)
    outputs = components.face_detector(torch.from_numpy(blob).to(components.device))
    return decode_detections([o.float().cpu().numpy() for o in outputs], DET_SIZE, scale)


def face_embedding(components: Components, image: PIL.Image.Image, face: Face) -> torch.Tensor:
    """ArcFace embedding [1, 512] (not normalised, as the face adapter was trained on)."""
    aligned = align_face(np.asarray(image), face.keypoints)
    faces = torch.from_numpy(recognition_input([aligned])).to(components.device)
    return components.face_recognizer(faces).float().cpu()


def zoe_detector_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """controlnet_aux's ``resize_image``: short side to ``resolution``, sides rounded to multiples of 64 (cv2)."""
    height, width = image.shape[:2]
    k = resolution / min(height, width)
    new_h, new_w = int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def estimate_depth(components: Components, image: PIL.Image.Image, resolution: int = MAX_IMAGE_SIDE) -> PIL.Image.Image:
    """A depth map of ``image`` at its size, near = bright: controlnet_aux's ``ZoeDetector`` operation for operation.

    ``resolution`` is the reference's ``detect_resolution`` (its 1024, the images' fit size). The
    image is resized by ``zoe_detector_resize``; ZoeDepth's ``infer``: reflection padding, its
    ``PrepForMidas`` bilinear resize with ``align_corners=True``, normalisation, flip averaging, the
    prediction upsampled bicubically (``align_corners=False``) to the padded size and cropped;
    then percentiles 2/85 normalisation, ``1 - d``, uint8, and ``cv2.resize`` (INTER_LINEAR) to
    the image's size (the reference resizes to its 64-multiple size and crops; see the module docstring).
    """
    cfg = components.config.omni_zero
    processor = cfg.depth_processor
    resized = zoe_detector_resize(np.asarray(image), resolution)
    pixels = torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    height, width = pixels.shape[-2:]
    pad_h, pad_w = depth_padding(height, width, processor)
    mean = torch.tensor(processor.get("image_mean", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.get("image_std", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)
    padded = (height + 2 * pad_h, width + 2 * pad_w)
    size = depth_input_size(padded[0], padded[1], processor)

    def model_input(x: torch.Tensor) -> torch.Tensor:
        if pad_h or pad_w:
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
        return (F.interpolate(x, size=size, mode="bilinear", align_corners=True) - mean) / std

    # The mirror pass is built from the mirrored image, as ZoeDepth's infer_with_flip_aug does;
    # one batch of two (the exported estimator's fixed batch) instead of its two passes.
    batch = torch.cat([model_input(pixels), model_input(pixels.flip(-1))])
    depth = components.depth_estimator(batch.to(components.device)).float().cpu()
    depth = F.interpolate(depth[:, None], size=padded, mode="bicubic", align_corners=False)[:, 0]
    depth = depth[:, pad_h:pad_h + height, pad_w:pad_w + width]
    depth = ((depth[0] + depth[1].flip(-1)) / 2).numpy()
    low, high = np.percentile(depth, DEPTH_PERCENTILES)
    # In float32, as ZoeDetector's in-place arithmetic on the float32 map.
    normalised = ((depth - np.float32(low)) / np.float32(high - low) if high > low
                  else np.zeros_like(depth)).astype(np.float32)
    if cfg.depth_model_type == "zoedepth":  # metric depth: far is large
        normalised = 1.0 - normalised
    gray = (normalised * 255.0).clip(0, 255).astype(np.uint8)
    gray = cv2.resize(np.repeat(gray[..., None], 3, axis=-1), image.size, interpolation=cv2.INTER_LINEAR)
    return PIL.Image.fromarray(gray)


def control_tensor(image: PIL.Image.Image | np.ndarray, rows: int) -> torch.Tensor:
    """A ControlNet condition: [rows, 3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].repeat(rows, 1, 1, 1)


# -- schedule ----------------------------------------------------------------------------------------

def make_scheduler(scheduler_config: dict[str, Any]):
    """DPM-Solver++ SDE with Karras sigmas and trailing spacing, from the checkpoint's scheduler config."""
    from diffusers import DPMSolverMultistepScheduler

    config = dict(scheduler_config, timestep_spacing="trailing")
    return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++",
                                                   final_sigmas_type="zero")


def loglinear_interpolate(sigmas: tuple[float, ...], count: int, last: int | None = None) -> np.ndarray:
    """The last ``last`` (default all) of ``count`` decreasing levels, linear in log sigma between ``sigmas``.

    Only the requested tail is evaluated: at a tiny img2img strength ``count`` is huge.
    """
    last = count if last is None else last
    xs = np.linspace(0, 1, len(sigmas))
    ys = np.log(np.asarray(sigmas, dtype=np.float64)[::-1])
    # Positions from the small end, as np.linspace(0, 1, count) places them.
    positions = np.arange(last - 1, -1, -1) * (1.0 / (count - 1)) if count > 1 else np.zeros(1)
    if last == count and count > 1:
        positions[0] = 1.0
    return np.exp(np.interp(positions, xs, ys))


def set_timesteps(scheduler, num_steps: int, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Install the reference's schedule on ``scheduler``: (timesteps [num_steps], sigmas [num_steps + 1]).

    The full schedule has ``int(num_steps / strength) + 1`` Align-Your-Steps levels ending at 0;
    img2img starts ``num_steps`` levels before the end, so ``num_steps`` UNet evaluations run.
    """
    total = int(num_steps / strength) if strength > 0 else num_steps
    scheduler.set_timesteps(num_steps + 1)  # resets the solver's history; the schedule is replaced below
    sigmas = loglinear_interpolate(AYS_SDXL_SIGMAS, total + 1, last=num_steps + 1)
    sigmas[-1] = 0.0
    alphas_cumprod = scheduler.alphas_cumprod
    log_sigmas = np.log(np.array((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    timesteps = np.round(scheduler._sigma_to_t(sigmas, log_sigmas))[:-1]
    scheduler.sigmas = torch.from_numpy(sigmas.copy())
    scheduler.timesteps = torch.from_numpy(timesteps.copy()).to(torch.int64)
    scheduler.num_inference_steps = num_steps
    # Start at the first level explicitly: rounding can repeat a timestep at large step counts.
    scheduler.set_begin_index(0)
    return scheduler.timesteps, scheduler.sigmas


TREE_DIGITS = 6
"""Decimals torchsde's Brownian tree resolves times to (its default tolerance, 1e-6)."""


class BrownianNoise:
    """The SDE solver's noise: increments of one Brownian path over sigma, seeded by the request seed.

    ``noise(sigma, sigma_next) = (W(sigma) - W(sigma_next)) / sqrt|sigma - sigma_next|``. Every image
    of a request follows the same path (the reference seeds each image's tree with the same seed).
    """

    def __init__(self, like: torch.Tensor, sigmas: torch.Tensor, seed: int):
        import torchsde

        positive = sigmas[sigmas > 0]
        self.sigma_min, self.sigma_max = positive.min().cpu(), sigmas.max().cpu()
        self.batch, self.shape = like.shape[0], tuple(like.shape[1:])
        self.tree = torchsde.BrownianTree(self.sigma_min, torch.zeros_like(like[0], device="cpu"), self.sigma_max,
                                          entropy=seed)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        # The tree resolves times to TREE_DIGITS decimals and clamps queries to its ends (the final
        # sigma 0 lies below them; the solver multiplies that step's noise by 0). An interval that
        # is empty at that resolution has no increment — and would send torchsde's search into
        # endless splitting, so it is answered here.
        low = float(torch.clamp(torch.minimum(sigma, sigma_next), self.sigma_min, self.sigma_max))
        high = float(torch.clamp(torch.maximum(sigma, sigma_next), self.sigma_min, self.sigma_max))
        if round(low, TREE_DIGITS) == round(high, TREE_DIGITS):
            w = torch.zeros(self.shape)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Should have t")  # float ends vs rounded ends
                w = self.tree(low, high)
        sign = 1.0 if sigma_next > sigma else -1.0
        noise = sign * w / (sigma_next - sigma).abs().sqrt()
        return noise.float().expand(self.batch, *noise.shape)


# -- the pipeline --------------------------------------------------------------------------------

def _check_strength(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InvalidRequest(f"{name} must be in [0, 1], got {value}")


def _expand(cond: torch.Tensor, uncond: torch.Tensor | None, num_images: int) -> torch.Tensor:
    """Rows as the UNet batch is laid out: [uncond x N, cond x N] under guidance, else [cond x N]."""
    rows = cond.repeat_interleave(num_images, dim=0)
    return rows if uncond is None else torch.cat([uncond.repeat_interleave(num_images, dim=0), rows])


def generate(
    components: Components,
    *,
    identity_image: ImageInput,
    style_image: ImageInput,
    base_image: ImageInput | None = None,
    composition_image: ImageInput | None = None,
    depth_image: ImageInput | None = None,
    prompt: str = "A person",
    negative_prompt: str | None = "blurry, out of focus",
    guidance_scale: float = 3.0,
    base_image_strength: float = 0.15,
    composition_image_strength: float = 1.0,
    style_image_strength: float = 1.0,
    identity_image_strength: float = 1.0,
    depth_image_strength: float = 0.5,
    num_images: int = 1,
    num_steps: int = 10,
    seed: int = 42,
    max_side: int = MAX_IMAGE_SIDE,
    control: RunControl | None = None,
) -> GenerationResult:
    control = control or RunControl()
    cfg = components.config
    if cfg.omni_zero is None:
        # A deployment error, not a bad request (ValueError would reach the client as a 400).
        raise RuntimeError("this checkpoint has no Omni-Zero parts (image encoder, adapters, ControlNets, face and "
                           "depth models); see diffserve.engine.models.omni_zero.checkpoint for the layout")
    timer = StageTimer(components.device)

    # 1. Check inputs
    for name, value in (("base_image_strength", base_image_strength),
                        ("composition_image_strength", composition_image_strength),
                        ("style_image_strength", style_image_strength),
                        ("identity_image_strength", identity_image_strength),
                        ("depth_image_strength", depth_image_strength)):
        _check_strength(name, value)
    if num_steps < 1:
        raise InvalidRequest(f"number_of_steps must be at least 1, got {num_steps}")
    if num_images < 1:
        raise InvalidRequest(f"number_of_images must be at least 1, got {num_images}")
    if identity_image is None or style_image is None:
        raise InvalidRequest("an identity image and a style image are required")
    if base_image is None and composition_image is None:
        raise InvalidRequest("a base image or a composition image is required")
    seed = resolve_seed(seed)
    generator = make_generator(seed)
    guidance = guidance_scale > 1.0
    strength = 1.0 - base_image_strength

    # 2. Fit the images: missing base -> composition image, missing composition -> base image
    with timer.stage("prepare_images"):
        base = fit_image(base_image if base_image is not None else composition_image, max_side, "base_image")
        composition = (fit_image(composition_image, max_side, "composition_image")
                       if composition_image is not None else base)
        style = fit_image(style_image, max_side, "style_image")
        identity = fit_image(identity_image, max_side, "identity_image")
        if depth_image is not None:
            base, depth = crop_to_common_size(base, fit_image(depth_image, max_side, "depth_image"))
        width, height = base.size

    # 3. Faces: the identity face's embedding; keypoints of the base face, else of the identity face
    with timer.stage("analyze_faces"):
        face = largest_face(detect_faces(components, identity))
        if face is None:
            raise NoFaceDetected("No face found in the identity image; the image might be cropped too tightly "
                                 "or the face is too small")
        embedding = face_embedding(components, identity, face)
        target = largest_face(detect_faces(components, base)) or face
        keypoints = draw_keypoints(width, height, target.keypoints)

    # 4. Depth condition: the given depth image, else the base image's estimated depth
    if depth_image is None:
        with timer.stage("estimate_depth"):
            depth = estimate_depth(components, base, max_side)

    # 5. Encode the prompt with both encoders
    with timer.stage("encode_text"):
        embeds = encode_prompt_sdxl(components, prompt, negative_prompt, num_images, guidance)

    # 6. Image prompts: CLIP features of style and composition, the face embedding; adapter tokens
    with timer.stage("encode_image_prompts"):
        size = cfg.omni_zero.image_size
        style_px, composition_px = clip_pixels(style, size), clip_pixels(composition, size)
        if guidance:
            batch = torch.cat([uncond_noise(style_px), style_px, uncond_noise(composition_px), composition_px])
            hidden = components.image_encoder(batch.to(components.device)).float()
            style_hidden, composition_hidden = hidden[:2], hidden[2:]
            faces = torch.cat([uncond_noise(embedding[0])[None], embedding])[:, None]
        else:
            hidden = components.image_encoder(torch.cat([style_px, composition_px]).to(components.device)).float()
            style_hidden, composition_hidden = hidden[:1], hidden[1:]
            faces = embedding[:, None]
        projected = components.ip_projection(faces.to(components.device), style_hidden, composition_hidden)
        tokens = IPTokens(*(_expand(t[-1:], t[:1] if guidance else None, num_images) for t in projected))
    rows = embeds.hidden.shape[0]
    ip_scales = torch.tensor([[identity_image_strength, style_image_strength, composition_image_strength]],
                             dtype=torch.float32).repeat(rows, 1)
    controlnet_scales = torch.tensor([[identity_image_strength, depth_image_strength]],
                                     dtype=torch.float32).repeat(rows, 1)
    identity_control, depth_control = control_tensor(keypoints, rows), control_tensor(depth, rows)
    time_ids = sdxl_time_ids(components, width, height, rows)

    # 7. Prepare timesteps: exactly num_steps levels at the end of the strength-scaled schedule
    sched = make_scheduler(cfg.scheduler_config)
    timesteps, sigmas = set_timesteps(sched, num_steps, strength)

    # 8. Encode the base image and noise it to the first level
    with timer.stage("encode_image"):
        moments = components.vae_encode(image_to_tensor(base, width, height).to(components.device))
    init = sample_latent_dist(moments, generator)
    if cfg.vae_latents_mean is not None and cfg.vae_latents_std is not None:
        c = cfg.latent_channels
        mean = torch.tensor(cfg.vae_latents_mean).view(1, c, 1, 1).to(init)
        std = torch.tensor(cfg.vae_latents_std).view(1, c, 1, 1).to(init)
        init = (init - mean) * cfg.vae_scaling_factor / std
    else:
        init = init * cfg.vae_scaling_factor
    init = init.repeat(num_images, 1, 1, 1)
    noise = randn(tuple(init.shape), generator).to(init.device)
    latents = sched.add_noise(init, noise, timesteps[:1].repeat(num_images))
    brownian = BrownianNoise(latents, sigmas, seed)

    # 9. Denoising loop: alone here, or by ``control.driver`` (a step batcher) with other requests
    device = components.device
    step_inputs = dict(
        encoder_hidden_states=embeds.hidden, text_embeds=embeds.pooled, time_ids=time_ids,
        identity_tokens=tokens.identity.to(device), style_tokens=tokens.style.to(device),
        composition_tokens=tokens.composition.to(device), ip_scales=ip_scales.to(device),
        identity_image=identity_control.to(device), depth_image=depth_control.to(device),
        controlnet_scales=controlnet_scales.to(device),
    )
    with timer.stage("denoise"):
        loop = OmniZeroLoop(components, sched, latents, timesteps, sigmas, brownian, step_inputs, guidance_scale)
        latents = run_loop(components, loop, control)

    # 10. Decode
    with timer.stage("decode"):
        images = decode_latents(components, latents)
    return GenerationResult(images=images, seed=seed, steps=len(timesteps), timings=timer.finish())


class OmniZeroLoop(GuidedLoop):
    """One Omni-Zero request's denoising loop as a step object (``diffserve.engine.batching.BatchedLoop``).

    Like the SD pipelines' ``DenoiseLoop`` (both are ``GuidedLoop``s), it holds everything that makes the
    request's image: its scheduler (or, with ``components.device_scheduler``, the scheduler's plan), its
    Brownian-tree SDE noise, its guidance scale and its ``controlnet_unet`` inputs. Every one of those inputs
    has one row per UNet row — text, pooled text and time ids, the three adapters' tokens, ``ip_scales``
    [rows, 3], the identity and depth control images, ``controlnet_scales`` [rows, 2] — so a batcher
    concatenates requests along dim 0 and each request's rows see exactly its own values. The
    strengths are therefore not part of ``shape_key``; the shapes are (one resolution per call).
    """

    denoiser = "controlnet_unet"

    def __init__(self, components: Components, scheduler, latents: torch.Tensor, timesteps: torch.Tensor,
                 sigmas: torch.Tensor, brownian: BrownianNoise, step_inputs: dict[str, torch.Tensor],
                 guidance_scale: float):
        planned = None
        plan = device_plan(components, scheduler, timesteps, noise=True)
        if plan is not None:
            # The solver as a plan: every step's Brownian noise goes to the device up front.
            noise = torch.stack([brownian(sigmas[i], sigmas[i + 1]) for i in range(plan.steps)]).to(latents)
            planned = PlannedLoop(plan, latents, noise)
        super().__init__(scheduler, timesteps, latents, guidance_scale, planned)
        self.sigmas = sigmas
        self.brownian = brownian
        self.step_inputs = step_inputs

    @property
    def shape_key(self) -> tuple:
        """Loops with equal keys can share one call: the same latent, conditioning and control-image shapes."""
        shapes = tuple((name, tuple(t.shape[1:])) for name, t in self.step_inputs.items())
        return (tuple(self.latents.shape[1:]), shapes, self.latents.dtype, self.latents.device)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """This step's ``controlnet_unet`` keyword arguments, ``rows`` rows each."""
        model_input, timestep = self.step_input()
        return dict(sample=model_input, timestep=timestep, **self.step_inputs)

    def step_kwargs(self, i: int) -> dict:
        """The SDE solver step's noise: the request's Brownian increment over (sigma_i, sigma_i+1)."""
        return dict(variance_noise=self.brownian(self.sigmas[i], self.sigmas[i + 1]).to(self.latents))
