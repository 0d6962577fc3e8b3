"""Engine benchmark: one slug in-process, per stage and end to end, against diffusers' own pipeline.

For a slug, the runtimes asked for (torch, onnxruntime, tensorrt where present), a precision
and a request (the seed page's example request, with overrides), it measures:

* **stages**, each timed alone over ``stage_repeats`` calls after a warm-up: ``encode_text``
  (the prompt encoding the pipeline does, CFG included), ``unet_step`` (one denoising network
  evaluation at the request's batch: 2 x samples under CFG), ``vae_encode``, ``vae_decode``
  (with the latent scaling and the copy to host) and ``image_encode`` (the API's jpeg/png
  encoding of the request's images);
* **end to end**: ``diffserve.engine.pipelines.run`` on the validated request, ``repeats`` times after
  ``warmup`` runs, with the pipeline's own stage split (encode_text, encode_image, denoise,
  decode) per run;
* **the baseline a user would pick instead**: diffusers' pipeline class for the slug built from
  the *same* module objects, the same scheduler (``diffserve.engine.schedulers.make_scheduler``), the same
  seed and parameters, ``output_type="np"``; and the ratio ours / diffusers (below 1: faster),
  plus the largest pixel difference between the two outputs (they compute the same image).

Every timing synchronises the device before and after (``torch.cuda.synchronize``), so GPU
work is attributed to the call that queued it. Statistics are median and p90 in ms.

``--full-size`` builds the slug's networks from ``benchmarks/configs`` with random weights
directly on the device (``diffserve.benchmarks.full_size``) instead of loading a checkpoint; slugs whose
pipeline needs networks with no full-size config here (omni-zero: the IP-Adapter image encoder
and face models; ominicontrol: the T5/CLIP text encoders and FLUX VAE) then get the network
stages that have one timed and an end-to-end estimate from them.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from diffserve.benchmarks import floors

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "tensorrt")
STAGES = ("encode_text", "unet_step", "controlnet_step", "transformer_step", "vae_encode", "vae_decode",
          "image_encode")


def diffusers_pipeline_name(slug: str) -> str | None:
    """diffusers' pipeline class a user would run for ``slug`` (its family's ``BenchmarkFigures``); None: none."""
    from diffserve.benchmarks.figures import figures

    fig = figures(slug)
    return None if fig is None else fig.diffusers_pipeline


@dataclass
class EngineBenchConfig:
    slug: str
    runtimes: tuple[str, ...] = ("torch",)
    device: str | None = None
    """cpu, cuda, cuda:1 (default: cuda when available)."""
    precision: str | None = None
    """fp32, fp16, bf16 (default: fp16 on GPU, fp32 on CPU)."""
    full_size: bool = False
    checkpoint: Path | None = None
    """Local diffusers checkpoint; default: the tiny demo checkpoint (ignored with ``full_size``)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Overrides of the reference request (the seed page's example)."""
    warmup: int = 1
    eager_warmup: int | None = None
    """Warm-up runs of the diffusers baseline and the torch entries without optimizations (default ``warmup``):
    only an optimised entry needs more than one (its first run compiles, the second records CUDA graphs)."""
    repeats: int = 5
    stage_repeats: int = 10
    baseline: bool = True
    work_dir: Path = Path("var/bench")
    """Exported ONNX/TensorRT artifacts and full-size skeleton checkpoints are cached here."""
    config_dir: Path | None = None
    """Full-size configs (default ``benchmarks/configs``)."""
    fp32_reference: bool = False
    """Also run the request once in eager fp32 on the same weights and report every entry's largest
    pixel difference from it (the numerical check of fp16/bf16 and of the optimisations)."""
    optimizations: tuple[str, ...] = ()
    """``diffserve.engine.torch_optimize`` specs; each adds a torch entry with those optimizations (``fast``, ...),
    compared with eager torch and diffusers in the same run."""
    threads: int | None = None
    """torch CPU threads (``torch.set_num_threads``); default: torch's own choice. On a shared CPU,
    1 avoids the OpenMP oversubscription that makes timings meaningless."""
    vae_precision: str | None = None
    """The VAE precision of every torch entry of ours (``fp32``, ``fp16``, ``bf16``; default: the engine's
    choice, fp32 where the VAE config forces upcast). Set it to what diffusers' pipeline runs for a like
    for like ratio: ``StableDiffusionPipeline`` decodes in the pipeline dtype whatever the config says."""

    def __post_init__(self) -> None:
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad or not self.runtimes:
            raise ValueError(f"runtimes must be among {', '.join(RUNTIMES)}, got {', '.join(self.runtimes) or 'none'}")
        from diffserve.engine.torch_optimize import TorchOptimizations

        if self.vae_precision is not None:
            TorchOptimizations.parse(f"vae={self.vae_precision}")  # refuses an unknown precision here
        self.optimizations = tuple(TorchOptimizations.parse(s + self._vae_token(s)).spec() for s in self.optimizations)
        if self.repeats < 1 or self.warmup < 0 or self.stage_repeats < 1 or (self.eager_warmup or 0) < 0:
            raise ValueError("repeats and stage_repeats must be >= 1 and warmup >= 0")

    def _vae_token(self, spec: str = "") -> str:
        """``,vae=P`` for a spec that does not name the VAE's precision itself."""
        if self.vae_precision is None or "vae=" in spec:
            return ""
        return f",vae={self.vae_precision}" if spec else f"vae={self.vae_precision}"


# -- timing ------------------------------------------------------------------------------------------

def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], repeats: int, device: torch.device | str | None, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn``, device-synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def stats_ms(seconds: list[float]) -> dict[str, Any]:
    """Median, p90, mean, min, max in ms, and every sample."""
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 3), "p90_ms": round(percentile(ms, 90), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3),
            "samples_ms": [round(v, 3) for v in ms]}


# -- the request ---------------------------------------------------------------------------------------

def demo_image(work_dir: Path):
    """The deterministic 512x512 demo picture (as a PIL image) used for image inputs."""
    import PIL.Image

    from diffserve.engine.tiny.demo import demo_input_image

    with PIL.Image.open(demo_input_image(Path(work_dir) / "inputs" / "sd-img2img-input.jpeg")) as im:
        return im.convert("RGB")


def reference_request(slug: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed page's example request (``diffserve.engine.tiny.demo.DEMO_PARAMS``) with overrides, catalog-validated.

    Image parameters keep a placeholder string; ``seed=-1`` is resolved once here so every run
    (ours and diffusers') computes the same image.
    """
    from diffserve.engine.tiny.demo import DEMO_PARAMS
    from diffserve.engine.catalog import get_model, resolve_seed

    spec = get_model(slug)
    payload = {k: v for k, v in DEMO_PARAMS.get(slug, {}).items() if k != "base64"}
    payload.update(overrides or {})
    for name in spec.image_params:  # the page's example request sends every image it shows an example of
        if spec.param(name).required or spec.param(name).example is not None or name in payload:
            payload[name] = "<demo image>"
    params = spec.validate(payload)
    if "seed" in params:
        params["seed"] = resolve_seed(int(params["seed"]))
    return params


def with_images(slug: str, params: dict[str, Any], image, *, as_array: bool = False) -> dict[str, Any]:
    """The request with its image placeholders replaced by the decoded picture, resized to the request size.

    A PIL image, as diffusers' pipelines take it, or (``as_array``) the uint8 [H, W, 3] array the
    serving path carries.
    """
    import numpy as np

    from diffserve.engine.catalog import get_model

    out = dict(params)
    size = (int(params["img_width"]), int(params["img_height"])) if "img_width" in params else None
    for name in get_model(slug).image_params:
        if out.get(name) == "<demo image>":
            picture = image.resize(size) if size and image.size != size else image
            out[name] = np.asarray(picture.convert("RGB")) if as_array else picture
    return out


def public_request(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else f"<{type(v).__name__}>")
            for k, v in params.items()}


# -- runtimes -----------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """What one runtime run needs; ``raw`` holds the torch modules when diffusers can share them."""

    runtime: str
    components: Any
    device: torch.device
    raw: dict[str, torch.nn.Module] | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class RuntimeUnavailable(RuntimeError):
    """This runtime cannot run here (missing package or GPU); reported as skipped."""


def _export_artifacts(slug: str, checkpoint: Path, modules: dict[str, torch.nn.Module], out_root: Path,
                      precision: str, tensorrt: bool) -> dict[str, Path]:
    """ONNX (and TensorRT plans) of the slug's components; cached by source fingerprint."""
    from diffserve.engine.catalog import get_model
    from diffserve.export.repository import export_components

    exported = export_components(checkpoint, [get_model(slug)], lambda _component: out_root, precision,
                                 modules=modules, tensorrt=tensorrt, verify=False, label=slug)
    return {name: e.artifact for name, e in exported.items()}


def _artifact_root(cfg: EngineBenchConfig, checkpoint: Path) -> Path:
    import hashlib

    key = hashlib.sha256(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]
    return Path(cfg.work_dir) / "artifacts" / f"{Path(checkpoint).name}-{key}"


def prepare_runtime(runtime: str, cfg: EngineBenchConfig, checkpoint: Path | None, torch_prepared: Prepared | None,
                    device: torch.device, precision: str) -> Prepared:
    """Components for ``runtime``; onnxruntime/tensorrt export from the checkpoint (or the full-size modules)."""
    if runtime == "torch":
        from diffserve.engine.runtime_torch import TorchComponents

        components = TorchComponents(checkpoint, device=str(device), precision=precision,
                                     optimizations=cfg._vae_token() or None)
        raw = None
        if diffusers_pipeline_name(cfg.slug):  # diffusers can share these modules
            raw = {"text_encoder": components.modules["text_encoder"].encoder,
                   "unet": components.modules["unet"].unet, "vae": components.modules["vae_decoder"].vae}
            if "text_encoder_2" in components.modules:
                raw["text_encoder_2"] = components.modules["text_encoder_2"].encoder
        return Prepared("torch", components, components.device, raw)

    if runtime == "tensorrt":
        from diffserve.export.onnx_export import tensorrt_toolkit

        if tensorrt_toolkit() is None:
            raise RuntimeUnavailable("the `tensorrt` package is not installed (pip install 'diffserve[tensorrt]')")
        if device.type != "cuda":
            raise RuntimeUnavailable("TensorRT needs a CUDA device")
    if precision == "bf16":
        raise RuntimeUnavailable(f"{runtime}: ONNX export supports fp32 and fp16, not bf16")
    if cfg.full_size:
        if torch_prepared is None:
            raise RuntimeUnavailable(f"{runtime} at full size exports the in-memory torch modules: "
                                     "include the torch runtime")
        modules = torch_prepared.components.modules  # exported after the torch runs are done
        source = torch_prepared.components.checkpoint
    else:
        from diffserve.engine.runtime_torch import load_component_modules

        modules = load_component_modules(checkpoint)
        source = checkpoint
    artifacts = _export_artifacts(cfg.slug, source, modules, _artifact_root(cfg, source), precision,
                                  tensorrt=runtime == "tensorrt")
    if runtime == "onnxruntime":
        import onnxruntime as ort

        from diffserve.engine.runtime_onnx import OnnxComponents

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        providers = [p for p in providers if p in ort.get_available_providers()]
        if device.type == "cuda" and "CUDAExecutionProvider" not in providers:
            raise RuntimeUnavailable("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
        from diffserve.engine.options import EngineOptions

        components = OnnxComponents(source, artifacts, providers=providers,
                                    options=EngineOptions(ort_threads=cfg.threads or 0))
        return Prepared("onnxruntime", components, device, notes=[f"providers: {', '.join(providers)}"])
    from diffserve.engine.runtime_trt import TrtComponents

    return Prepared("tensorrt", TrtComponents(source, artifacts, device=str(device)), device)


# -- stages ---------------------------------------------------------------------------------------------

def _stage_calls(slug: str, components, params: dict[str, Any], image, images_uint8: np.ndarray | None
                 ) -> dict[str, Callable[[], Any]]:
    """One callable per stage of the request, on the runtime's ``Components``."""
    from diffserve.engine.catalog import get_model
    from diffserve.engine.imageio import DEFAULT_QUALITY, encode_image
    from diffserve.engine.pipelines.common import (
        decode_latents, encode_prompt_sd15, encode_prompt_sdxl, image_to_tensor, sdxl_time_ids,
    )

    cfg = components.config
    device = components.device
    width, height = int(params["img_width"]), int(params["img_height"])
    samples = int(params.get("samples") or 1)
    guidance = float(params["guidance_scale"]) > 1.0
    encode = encode_prompt_sdxl if cfg.family == "sdxl" else encode_prompt_sd15

    def encode_text():
        return encode(components, params["prompt"], params.get("negative_prompt"), samples, guidance)

    embeds = encode_text()
    g = torch.Generator("cpu").manual_seed(0)
    shape = (samples, cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
    latents = torch.randn(shape, generator=g).to(device)
    model_input = torch.cat([latents] * 2) if guidance else latents
    timestep = torch.full((model_input.shape[0],), 999.0)
    time_ids = sdxl_time_ids(components, width, height, model_input.shape[0]) if cfg.family == "sdxl" else None
    pixels = image_to_tensor(image, width, height).to(device)
    fmt = params.get("image_format") or get_model(slug).output_format
    quality = int(params.get("image_quality") or DEFAULT_QUALITY)
    if images_uint8 is None:
        images_uint8 = (np.random.RandomState(0).rand(samples, height, width, 3) * 255).astype(np.uint8)
    calls = {
        "encode_text": encode_text,
        "unet_step": lambda: components.unet(model_input, timestep, embeds.hidden, embeds.pooled, time_ids),
        "vae_encode": lambda: components.vae_encode(pixels),
        "vae_decode": lambda: decode_latents(components, latents),
        "image_encode": lambda: [encode_image(im, fmt, quality) for im in images_uint8],
    }
    if not get_model(slug).image_params:
        del calls["vae_encode"]  # not on a text-to-image request's path (nor exported for it)
    return calls


def _raw_stage_calls(slug: str, raw: dict[str, torch.nn.Module], params: dict[str, Any], device: torch.device,
                     dtype: torch.dtype):
    """Network stages of slugs not run end to end at full size, on full-size modules; plus an end-to-end estimate.

    The slug's family times them (its ``BenchmarkFigures.network_stages`` module): (calls, estimate, note, module).
    """
    from diffserve.benchmarks.figures import figures
    from diffserve.engine.catalog import get_model

    spec = get_model(slug)
    fig = figures(slug)
    if fig is None or fig.network_stages is None:
        raise ValueError(f"{slug} runs end to end at full size; its stages run through Components")
    module = spec.family.module(fig.network_stages)
    fmt = params.get("image_format") or spec.output_format
    calls, estimate, note = module.network_stages(raw, params, device, dtype, fmt)
    return calls, estimate, note, module


DENOISERS = ("unet", "transformer", "controlnet_unet")
"""The ``Components`` methods of one denoising network evaluation."""
NETWORK_METHODS = ("text_encoder", "t5_text_encoder", "unet", "transformer", "condition_kv", "vae_encode",
                   "vae_decode", "image_encoder", "ip_projection", "controlnet_unet", "face_detector",
                   "face_recognizer", "depth_estimator")
"""The ``Components`` methods that run a network (engine/components.py)."""


class TimedComponents:
    """A ``Components`` proxy that times every network call, device-synchronised.

    Used for pipelines whose stages have no stand-alone call here: the pipeline itself makes
    the calls, with its real inputs, so every network it uses is timed as it is used.
    """

    def __init__(self, inner, device):
        self._inner = inner
        self._device = device
        self.calls: dict[str, list[float]] = {}

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name not in NETWORK_METHODS or not callable(attr):
            return attr

        def timed(*args, **kwargs):
            synchronize(self._device)
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            synchronize(self._device)
            self.calls.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return timed


def iteration_rates(entry: dict[str, Any]) -> dict[str, float]:
    """Denoising iterations per second (one step, both CFG halves): in the end-to-end runs, and of
    the denoiser call alone (the figure published benchmarks quote as it/s)."""
    out = {}
    per_step = entry["end_to_end"]["pipeline_stages"].get("denoise_per_step", {}).get("median_ms")
    if per_step:
        out["denoise_its"] = float(f"{1000.0 / per_step:.4g}")
    for name in ("unet_step", *DENOISERS):
        median = entry["stages"].get(name, {}).get("median_ms")
        if median:
            out["denoiser_its"] = float(f"{1000.0 / median:.4g}")
            break
    return out


def loop_overhead(slug: str, components, request: dict[str, Any], device) -> dict[str, Any]:
    """Time per step not spent in the denoiser, from one instrumented run of the request.

    The pipeline's ``denoise`` stage minus the denoiser calls made inside it (each synchronised),
    divided by the steps: scheduler math, guidance, copies and Python between the calls.
    """
    from diffserve.engine.pipelines import run

    timed = TimedComponents(components, device)
    with torch.inference_mode():
        result = run(slug, dict(request), timed)
    calls = [t for name in DENOISERS for t in timed.calls.get(name, [])]
    denoise = result.timings.get("denoise")
    if not calls or denoise is None or not result.steps:
        return {}
    overhead = max(0.0, denoise - sum(calls)) / result.steps
    return {"loop_overhead_per_step_ms": round(overhead * 1000, 3),
            "loop_overhead_run": {"denoise_ms": round(denoise * 1000, 3), "denoiser_calls": len(calls),
                                  "denoiser_ms": round(sum(calls) * 1000, 3), "steps": result.steps}}


def time_component_calls(slug: str, components, request: dict[str, Any], device, runs: int,
                         images_uint8: np.ndarray, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-network call statistics over ``runs`` instrumented pipeline runs, plus image encoding."""
    from diffserve.engine.catalog import get_model
    from diffserve.engine.imageio import DEFAULT_QUALITY, encode_image
    from diffserve.engine.pipelines import run

    timed = TimedComponents(components, device)
    with torch.inference_mode():
        for _ in range(max(1, min(runs, 3))):  # each run times every call; a few runs are plenty
            run(slug, dict(request), timed)
    out = {name: stats_ms(samples) for name, samples in timed.calls.items()}
    fmt = params.get("image_format") or get_model(slug).output_format
    quality = int(params.get("image_quality") or DEFAULT_QUALITY)
    out["image_encode"] = stats_ms(measure(lambda: [encode_image(im, fmt, quality) for im in images_uint8],
                                           runs, None))
    return out


def time_stages(calls: dict[str, Callable[[], Any]], repeats: int, device, progress=None) -> dict[str, dict[str, Any]]:
    out = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            out[name] = stats_ms(measure(fn, repeats, device, warmup=1))
            if progress is not None:
                progress.update(1)
    return out


# -- end to end -------------------------------------------------------------------------------------------

def time_pipeline(slug: str, components, params: dict[str, Any], warmup: int, repeats: int, device,
                  progress=None):
    """(wall seconds per run, pipeline stage seconds per run, the last GenerationResult)."""
    from diffserve.engine.pipelines import run

    for _ in range(warmup):
        run(slug, dict(params), components)
        if progress is not None:
            progress.update(1)
    walls: list[float] = []
    stages: dict[str, list[float]] = {}
    result = None
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        result = run(slug, dict(params), components)
        synchronize(device)
        walls.append(time.perf_counter() - t0)
        for k, v in result.timings.items():
            stages.setdefault(k, []).append(v)
        stages.setdefault("denoise_per_step", []).append(result.timings["denoise"] / max(result.steps, 1))
        if progress is not None:
            progress.update(1)
    return walls, stages, result


def diffusers_pipeline(slug: str, prepared: Prepared):
    """diffusers' own pipeline for ``slug`` over the same module objects as ``prepared``."""
    import diffusers

    comps, raw = prepared.components, prepared.raw
    cls = getattr(diffusers, diffusers_pipeline_name(slug))
    sched = _scheduler(slug, comps, "DDIM")
    if comps.config.family == "sdxl":
        pipe = cls(vae=raw["vae"], text_encoder=raw["text_encoder"], text_encoder_2=raw["text_encoder_2"],
                   tokenizer=comps.tokenizer(0), tokenizer_2=comps.tokenizer(1), unet=raw["unet"], scheduler=sched,
                   force_zeros_for_empty_prompt=comps.config.force_zeros_for_empty_prompt, add_watermarker=False)
    else:
        pipe = cls(vae=raw["vae"], text_encoder=raw["text_encoder"], tokenizer=comps.tokenizer(0), unet=raw["unet"],
                   scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(slug: str, components, name: str):
    from diffserve.engine.schedulers import make_scheduler

    return make_scheduler(name, components.config.scheduler_config)


def diffusers_call(slug: str, pipe, components, params: dict[str, Any]) -> np.ndarray:
    """Run the request through diffusers (fresh scheduler, same seed); float NHWC images."""
    from diffserve.benchmarks.figures import figures

    pipe.scheduler = _scheduler(slug, components, params["scheduler"])
    kwargs = dict(prompt=params["prompt"], negative_prompt=params.get("negative_prompt"),
                  num_inference_steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
                  num_images_per_prompt=params["samples"], output_type="np",
                  generator=torch.Generator("cpu").manual_seed(int(params["seed"])))
    if figures(slug).img2img:
        kwargs.update(image=params["image"], strength=params["strength"])
    else:
        kwargs.update(width=params["img_width"], height=params["img_height"])
    return pipe(**kwargs).images


def time_diffusers(slug: str, prepared: Prepared, params: dict[str, Any], warmup: int, repeats: int,
                   progress=None) -> tuple[list[float], np.ndarray, dict[str, Any]]:
    """diffusers' end-to-end seconds per run, its last images, and notes on how it ran."""
    comps, raw = prepared.components, prepared.raw
    pipe = diffusers_pipeline(slug, prepared)
    vae = raw["vae"]
    restore = next(vae.parameters()).dtype
    # A user's `pipe.to(device, dtype)` has the VAE in the pipeline dtype (SDXL's pipeline upcasts it
    # itself while decoding); ours may keep it in fp32 (force_upcast). Same modules, user's dtypes.
    vae.to(comps.dtype)
    walls: list[float] = []
    images = None
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                diffusers_call(slug, pipe, comps, params)
                if progress is not None:
                    progress.update(1)
            for _ in range(repeats):
                synchronize(prepared.device)
                t0 = time.perf_counter()
                images = diffusers_call(slug, pipe, comps, params)
                synchronize(prepared.device)
                walls.append(time.perf_counter() - t0)
                if progress is not None:
                    progress.update(1)
    finally:
        vae.to(restore)
    vae_dtype = str(comps.dtype).replace("torch.", "")
    if comps.config.family == "sdxl" and comps.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae_dtype = "float32"  # StableDiffusionXLPipeline upcasts a force_upcast VAE to decode (and back after)
    notes = {"pipeline": type(pipe).__name__, "vae_dtype": vae_dtype, "scheduler": params["scheduler"]}
    return walls, images, notes


# -- the benchmark -------------------------------------------------------------------------------------------

def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=None, leave=False)


def run_engine_bench(cfg: EngineBenchConfig, on_update: Callable[[dict[str, Any]], None] | None = None
                     ) -> dict[str, Any]:
    """Run the benchmark and return the report (see ``diffserve.benchmarks.report`` for its rendering).

    ``on_update(report)`` is called after every entry with the report so far (its entries still carry
    in-memory arrays under ``_`` keys: ``public_report`` drops them), so a run cut off keeps what it measured.
    """
    from diffserve.benchmarks.environment import environment
    from diffserve.benchmarks.record import new_report
    from diffserve.engine.catalog import get_model
    from diffserve.engine.runtime_torch import resolve_device_dtype

    spec = get_model(cfg.slug)
    sd_pipeline = diffusers_pipeline_name(cfg.slug) is not None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = resolve_device_dtype(cfg.device, cfg.precision, spec.architecture)
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    params = reference_request(cfg.slug, cfg.params)
    image = demo_image(cfg.work_dir)
    request = with_images(cfg.slug, params, image)
    floor = floors.request_floor(cfg.slug, params)
    report = new_report("engine", environment(device))
    report["settings"] = {
        "slug": cfg.slug, "runtimes": list(cfg.runtimes), "device": str(device), "precision": precision,
        "full_size": cfg.full_size, "checkpoint": None, "warmup": cfg.warmup,
        "eager_warmup": cfg.warmup if cfg.eager_warmup is None else cfg.eager_warmup, "repeats": cfg.repeats,
        "stage_repeats": cfg.stage_repeats, "baseline": "diffusers" if cfg.baseline else None,
        "optimizations": list(cfg.optimizations), "fp32_reference": cfg.fp32_reference,
        "torch_threads": torch.get_num_threads(),
        "resolution": f"{params['img_width']}x{params['img_height']}" if "img_width" in params else None,
    }
    report["request"] = public_request(params)
    report["steps"] = floors.steps_run(cfg.slug, params)
    report["floor"] = floor.as_dict()
    report["runtimes"] = []
    report["baseline"] = None
    report["full_size"] = None

    full = None
    checkpoint = cfg.checkpoint
    if cfg.full_size:
        from diffserve.benchmarks.full_size import full_size_setup

        full = full_size_setup(cfg.slug, device=str(device), precision=precision,
                               skeleton_root=Path(cfg.work_dir) / "full-size", config_dir=cfg.config_dir,
                               optimizations=cfg._vae_token() or None)
        report["full_size"] = {"parameters_m": full.parameters_m, "build_seconds": round(full.build_seconds, 2),
                               "configs": "benchmarks/configs" if cfg.config_dir is None else str(cfg.config_dir)}
        if full.components is None:  # no full-size pipeline: time the networks, estimate the request
            report["runtimes"].append(_bench_networks_only(cfg, full, params, device, floor))
            _notify(on_update, report)
            return report
        checkpoint = full.checkpoint
    else:
        if checkpoint is None:
            from diffserve.engine.tiny.demo import demo_checkpoints

            checkpoint = demo_checkpoints()[cfg.slug]
        report["settings"]["checkpoint"] = str(checkpoint)

    torch_prepared: Prepared | None = None
    # Eager runtimes (with the diffusers baseline on the same modules) first, then the fp32 reference, then the
    # optimised specs: the last of them takes the full-size modules over instead of copying them, so its peak
    # memory is its own (one copy of the weights, its activations and graphs), not the eager copy's as well.
    for runtime in cfg.runtimes:
        entry = _new_entry(report, runtime)
        try:
            if runtime == "torch" and full is not None:
                prepared = Prepared("torch", full.components, full.device, full.raw)
            else:
                prepared = prepare_runtime(runtime, cfg, checkpoint, torch_prepared, device, precision)
            if runtime == "torch":
                torch_prepared = prepared
            _bench_runtime(cfg, entry, prepared, request, image, params, floor, device, sd_pipeline)
        except RuntimeUnavailable as exc:
            entry.update(status="skipped", reason=str(exc))
            logger.warning("%s skipped: %s", runtime, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others' numbers
            logger.exception("%s failed", runtime)
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
            continue
        finally:
            _notify(on_update, report)
        if runtime == "torch" and cfg.baseline:
            if prepared.raw is None:
                report["baseline_note"] = f"diffusers has no pipeline for {cfg.slug}'s request; no baseline"
                continue
            _reset_peak(device)
            warmup = cfg.warmup if cfg.eager_warmup is None else cfg.eager_warmup
            with _progress(warmup + cfg.repeats, f"{cfg.slug} diffusers") as bar:
                d_walls, d_images, notes = time_diffusers(cfg.slug, prepared, request, warmup, cfg.repeats, bar)
            report["baseline"] = {"name": "diffusers", **notes, "end_to_end": stats_ms(d_walls), "_images": d_images,
                                  "image_check": image_check(d_images), **_peak(device)}
            _notify(on_update, report)

    reference = None
    if cfg.fp32_reference and (checkpoint is not None or full is not None):
        reference = fp32_reference_images(cfg.slug, request, checkpoint, full, device)
        report["fp32_reference"] = {"note": "eager torch, fp32 compute on the same weights, one run",
                                    "image_check": image_check(reference)}
        for entry in report["runtimes"]:
            _diff_vs_fp32(entry, entry.get("_images"), reference)
        if report["baseline"] is not None:
            _diff_vs_fp32(report["baseline"], report["baseline"].get("_images"), reference)
        _notify(on_update, report)

    for i, spec in enumerate(cfg.optimizations):
        entry = _new_entry(report, "torch", spec)
        take = full is not None and i == len(cfg.optimizations) - 1
        try:
            with CompileCounters() as counters:
                prepared = prepare_optimized(spec, checkpoint, full, device, precision, take_modules=take)
                entry["optimization"] = prepared.info
                _bench_runtime(cfg, entry, prepared, request, image, params, floor, device, sd_pipeline)
            entry["compile_counters"] = counters.result
            _diff_vs_fp32(entry, entry.get("_images"), reference)
        except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others' numbers
            logger.exception("torch [%s] failed", spec)
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            if take:
                full.components = torch_prepared = prepared = None  # the modules are the optimised entry's now
            _compare_with_eager_and_baseline(report)
            _notify(on_update, report)
            _release(device)

    _compare_with_eager_and_baseline(report)
    for entry in report["runtimes"]:
        for key in [k for k in entry if k.startswith("_")]:
            entry.pop(key)
    if report["baseline"] is not None:
        report["baseline"].pop("_images", None)
    return report


def _new_entry(report: dict[str, Any], runtime: str, spec: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"runtime": runtime, "status": "ok", "reason": None}
    if spec is not None:
        entry["optimizations"] = spec
    report["runtimes"].append(entry)
    return entry


def _notify(on_update: Callable[[dict[str, Any]], None] | None, report: dict[str, Any]) -> None:
    """Hand the report so far to ``on_update`` (the GPU plan writes it to disk after every entry)."""
    if on_update is not None:
        try:
            on_update(report)
        except Exception:  # noqa: BLE001 - a failed partial write never stops the benchmark
            logger.exception("on_update failed")


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` without the in-memory arrays its entries carry while the benchmark runs (JSON-safe)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(report)


def _compare_with_eager_and_baseline(report: dict[str, Any]) -> None:
    """Each entry's image differences from eager torch and from diffusers, and the one-step denoiser check
    of every optimised entry against eager at the same precision (idempotent: run after every entry)."""
    baseline = report["baseline"]
    eager = next((e for e in report["runtimes"]
                  if e["runtime"] == "torch" and "optimizations" not in e and e["status"] == "ok"), None)
    eager_images = eager.get("_images") if eager else None
    for entry in report["runtimes"]:
        images = entry.get("_images")
        if images is None or entry["status"] != "ok":
            continue
        if "optimizations" in entry and eager is not None:
            if eager_images is not None and images.shape == eager_images.shape:
                entry["max_abs_diff_vs_eager"] = float(np.abs(images - eager_images).max())
            if eager.get("_denoiser_outs") is not None and entry.get("_denoiser_outs") is not None:
                entry["denoiser_check"] = denoiser_check(entry["_denoiser_outs"], eager["_denoiser_outs"])
        if baseline is None:
            continue
        ours, theirs = entry["end_to_end"]["ours"], baseline["end_to_end"]
        entry["ratio_vs_diffusers"] = {"median": round(ours["median_ms"] / theirs["median_ms"], 4),
                                       "p90": round(ours["p90_ms"] / theirs["p90_ms"], 4)}
        if baseline.get("_images") is not None and images.shape == baseline["_images"].shape:
            entry["max_abs_diff_vs_diffusers"] = float(np.abs(images - baseline["_images"]).max())


# -- checks that mean something at fp16/bf16 -----------------------------------------------------------------

DENOISER_CHECK_REL_L2 = 1e-2
"""Largest relative L2 difference ‖fast − eager‖ / ‖eager‖ of one denoiser step at the same precision:
fp32 reorderings land far below 1e-3, fp16/bf16 operands between 1e-3 and 1e-2."""
UNIFORM_STD = 1e-3
"""An image whose pixel standard deviation (0..1 scale) is below this is uniform (black, grey): broken."""


def image_check(images: np.ndarray | None) -> dict[str, Any] | None:
    """Finite and not uniform: what a NaN VAE (black images) or a dead pipeline fails."""
    if images is None:
        return None
    images = np.asarray(images, dtype=np.float64)
    finite = bool(np.isfinite(images).all())
    std = float(np.nanstd(images)) if images.size else 0.0
    return {"finite": finite, "std": round(std, 5), "ok": finite and std > UNIFORM_STD}


def denoiser_probe(components, params: dict[str, Any]) -> list[np.ndarray]:
    """The denoiser's outputs on two different inputs (latents and timestep): compared across entries.

    Two calls in a row with different inputs catch a replay that returns a stale output (a broken
    CUDA graph passes a check made on one input it has already seen).
    """
    from diffserve.engine.pipelines.common import encode_prompt_sd15, encode_prompt_sdxl, sdxl_time_ids

    cfg = components.config
    width, height = int(params["img_width"]), int(params["img_height"])
    samples = int(params.get("samples") or 1)
    guidance = float(params["guidance_scale"]) > 1.0
    encode = encode_prompt_sdxl if cfg.family == "sdxl" else encode_prompt_sd15
    outs = []
    with torch.inference_mode():
        embeds = encode(components, params["prompt"], params.get("negative_prompt"), samples, guidance)
        for seed, t in ((11, 999.0), (12, 500.0)):
            g = torch.Generator("cpu").manual_seed(seed)
            shape = (samples, cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
            latents = torch.randn(shape, generator=g).to(components.device)
            x = torch.cat([latents] * 2) if guidance else latents
            time_ids = sdxl_time_ids(components, width, height, x.shape[0]) if cfg.family == "sdxl" else None
            out = components.unet(x, torch.full((x.shape[0],), t), embeds.hidden, embeds.pooled, time_ids)
            outs.append(out.float().cpu().numpy().copy())
    return outs


def denoiser_check(fast: list[np.ndarray], eager: list[np.ndarray]) -> dict[str, Any]:
    """One denoiser step of an optimised entry against eager at the same precision, on the same inputs."""
    diffs = [float(np.abs(f - e).max()) for f, e in zip(fast, eager)]
    rel = [float(np.linalg.norm((f - e).ravel()) / max(np.linalg.norm(e.ravel()), 1e-30)) for f, e in zip(fast, eager)]
    finite = all(bool(np.isfinite(f).all()) for f in fast)
    distinct = len(fast) < 2 or not np.array_equal(fast[0], fast[1])
    return {"max_abs_diff": max(diffs), "rel_l2": max(rel), "finite": finite, "inputs": len(fast),
            "outputs_follow_inputs": distinct, "rel_l2_limit": DENOISER_CHECK_REL_L2,
            "ok": finite and distinct and max(rel) <= DENOISER_CHECK_REL_L2}


class CompileCounters:
    """Dynamo/inductor counters over a block: graphs, graph breaks, recompiles, CUDA-graph skips.

    A silent recompile or a skipped CUDA graph otherwise shows only as a slower ``compile`` entry.
    """

    def __init__(self):
        self.result: dict[str, Any] = {}
        self._recompiles: list[str] = []

    def __enter__(self):
        try:
            from torch._dynamo.utils import counters

            self._before = {k: dict(v) for k, v in counters.items()}
        except Exception:  # noqa: BLE001 - counters are a report nicety
            self._before = None
        handler = logging.Handler()
        handler.emit = lambda record: self._recompiles.append(record.getMessage()[:300])
        self._handler = handler
        self._logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        try:
            torch._logging.set_logs(recompiles=True)
        except Exception:  # noqa: BLE001
            pass
        self._logger.addHandler(handler)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        if self._before is None:
            return False
        from torch._dynamo.utils import counters

        def delta(group: str, key: str | None = None) -> int:
            now, before = counters.get(group, {}), self._before.get(group, {})
            if key is not None:
                return int(now.get(key, 0) - before.get(key, 0))
            return int(sum(now.values()) - sum(before.values()))

        self.result = {"frames_compiled": delta("frames", "ok"), "unique_graphs": delta("stats", "unique_graphs"),
                       "graph_breaks": delta("graph_break"), "recompiles": len(self._recompiles),
                       "recompile_reasons": self._recompiles[:5],
                       "cudagraph_skips": delta("inductor", "cudagraph_skips")}
        return False


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bench_runtime(cfg: EngineBenchConfig, entry: dict[str, Any], prepared: Prepared, request: dict[str, Any],
                   image, params: dict[str, Any], floor: floors.Floor, device: torch.device, sd_pipeline: bool) -> None:
    """End-to-end runs and stages of one runtime, into ``entry``."""
    entry["notes"] = list(prepared.notes)
    if device.type == "cuda":
        entry["resident_at_start_gb"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    vae_dtype = getattr(prepared.components, "vae_dtype", None)
    if vae_dtype is not None:
        entry["vae_dtype"] = str(vae_dtype).replace("torch.", "")
    warmup = cfg.warmup if cfg.eager_warmup is None or entry.get("optimizations") else cfg.eager_warmup
    with _progress(warmup + cfg.repeats + 5, f"{cfg.slug} {prepared.runtime}") as bar:
        _reset_peak(device)
        warm = time_warmup_runs(cfg.slug, prepared.components, request, warmup, prepared.device, bar)
        walls, stage_runs, result = time_pipeline(cfg.slug, prepared.components, request, 0,
                                                  cfg.repeats, prepared.device, bar)
        if sd_pipeline:
            calls = _stage_calls(cfg.slug, prepared.components, request, image, result.to_uint8())
            entry["stages"] = time_stages(calls, cfg.stage_repeats, prepared.device, bar)
        else:
            entry["stages"] = time_component_calls(cfg.slug, prepared.components, request, prepared.device,
                                                   cfg.stage_repeats, result.to_uint8(), params)
            entry["notes"].append("stages: every network call of instrumented pipeline runs, timed as the "
                                  "pipeline makes it (one sample per call)")
    entry["end_to_end"] = {"ours": stats_ms(walls), "pipeline_stages": {k: stats_ms(v) for k, v in stage_runs.items()}}
    entry["warmup"] = warmup_summary(warm, walls)
    entry["steps"] = result.steps
    entry["images_per_request"] = int(result.images.shape[0])
    entry.update(_peak(device))
    entry["image_check"] = image_check(result.images)
    if sd_pipeline and prepared.runtime == "torch":
        entry["_denoiser_outs"] = denoiser_probe(prepared.components, request)
    median = entry["end_to_end"]["ours"]["median_ms"]
    entry["fraction_of_floor"] = _round(floors.fraction_of_floor(floor.floor_ms, median, str(device)))
    step_floor = floors.unet_step_floor_ms(cfg.slug, params)
    entry.update(iteration_rates(entry))
    entry.update(loop_overhead(cfg.slug, prepared.components, request, prepared.device))
    if "unet_step" in entry["stages"]:
        entry["unet_step_fraction_of_floor"] = _round(floors.fraction_of_floor(
            step_floor, entry["stages"]["unet_step"]["median_ms"], str(device)))
    entry["_images"] = result.images  # compared with diffusers' images, then dropped


def time_warmup_runs(slug: str, components, request: dict[str, Any], warmup: int, device,
                     progress=None) -> list[float]:
    """Wall seconds of each untimed warm-up run, so what the first runs pay (lazy ``torch.compile``,
    CUDA graph capture, autotuning, allocator growth) is reported apart from the timed runs."""
    from diffserve.engine.pipelines import run

    out = []
    for _ in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        run(slug, dict(request), components)
        synchronize(device)
        out.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return out


def warmup_summary(warm: list[float], timed: list[float]) -> dict[str, Any]:
    """The warm-up runs and the first one's excess over the timed median (the compile time of a lazy
    compiling spec; about zero for eager torch)."""
    out: dict[str, Any] = {"runs_s": [round(w, 3) for w in warm]}
    if warm and timed:
        out["first_run_excess_s"] = round(max(0.0, warm[0] - statistics.median(timed)), 3)
    return out


def _diff_vs_fp32(entry: dict[str, Any], images: np.ndarray | None, reference: np.ndarray | None) -> None:
    if images is not None and reference is not None and images.shape == reference.shape:
        entry["max_abs_diff_vs_fp32"] = float(np.abs(images - reference).max())


def fp32_reference_images(slug: str, request: dict[str, Any], checkpoint: Path | None, full,
                          device: torch.device) -> np.ndarray:
    """The request's images from eager torch in fp32 (full size: fp32 copies of the benchmarked weights)."""
    import copy

    from diffserve.engine.pipelines import run

    if full is not None:
        from diffserve.benchmarks.full_size import InMemoryTorchComponents

        raw = {k: copy.deepcopy(m).float() for k, m in full.raw.items()}
        components = InMemoryTorchComponents(full.checkpoint, raw, full.device, torch.float32)
    else:
        from diffserve.engine.runtime_torch import TorchComponents

        components = TorchComponents(checkpoint, device=str(device), precision="fp32")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a reference, not tf32
    try:
        with torch.inference_mode():
            images = run(slug, dict(request), components).images
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    del components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images


def prepare_optimized(spec: str, checkpoint: Path | None, full, device: torch.device, precision: str,
                      take_modules: bool = False) -> Prepared:
    """Torch components with ``spec``'s optimizations, on their own copy of the weights (never diffusers').

    ``take_modules``: use the full-size modules themselves instead of a copy (they are fused, re-laid-out
    and compiled in place, so nothing may run on them eagerly afterwards).
    """
    import copy

    if full is not None:
        from diffserve.benchmarks.full_size import InMemoryTorchComponents

        raw = dict(full.raw) if take_modules else {k: copy.deepcopy(m) for k, m in full.raw.items()}
        components = InMemoryTorchComponents(full.checkpoint, raw, full.device, full.dtype, optimizations=spec)
    else:
        from diffserve.engine.runtime_torch import TorchComponents

        components = TorchComponents(checkpoint, device=str(device), precision=precision, optimizations=spec)
    from diffserve.engine.torch_optimize import sdpa_backends

    report = components.optimization_report
    info = {"applied": report.applied, "fallbacks": report.fallbacks, "warmup_s": report.warmup_seconds,
            "sdpa_kernels": sdpa_backends(components.device)}
    return Prepared("torch", components, components.device, info=info)


def _bench_networks_only(cfg: EngineBenchConfig, full, params: dict[str, Any], device: torch.device,
                         floor: floors.Floor) -> dict[str, Any]:
    entry: dict[str, Any] = {"runtime": "torch", "status": "ok", "reason": None,
                             "notes": ["not every network of the pipeline has a full-size config: network "
                                       "stages only, end to end estimated from them"]}
    if cfg.runtimes != ("torch",):
        entry["notes"].append("only the torch runtime times networks outside a pipeline")
    calls, estimate, note, module = _raw_stage_calls(cfg.slug, full.raw, params, device, full.dtype)
    with _progress(len(calls), f"{cfg.slug} networks") as bar:
        entry["stages"] = time_stages(calls, cfg.stage_repeats, device, bar)
    est = estimate({k: v["median_ms"] for k, v in entry["stages"].items()})
    if hasattr(module, "extra_timings"):  # e.g. OminiControl's two condition modes
        entry.update(module.extra_timings(full.raw, params, device, full.dtype, cfg.stage_repeats, entry["stages"],
                                          time_stages))
    entry["end_to_end"] = {"estimated_ms": round(est, 3), "estimate": note}
    entry["fraction_of_floor"] = _round(floors.fraction_of_floor(floor.floor_ms, est, str(device)))
    if device.type == "cuda":
        entry["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return entry


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
