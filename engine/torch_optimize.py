"""Optimised torch execution of the ``Components`` networks: one spec string, applied per component.

A ``TorchOptimizations`` spec is a comma-separated list, e.g. ``fuse_qkv,channels_last,compile,cuda_graphs``:

``fuse_qkv``
    One matmul for q/k/v (k/v in cross-attention) in every attention whose processor knows the fused
    layout: diffusers' ``FusedAttnProcessor2_0`` replaces the stock SDPA processor in the UNets and the
    VAE; FLUX attention (ours, via diffusers' ``_get_qkv_projections``) reads the fused weights itself.
    Omni-Zero's IP-Adapter cross-attention keeps separate projections (its self-attention is fused).
``channels_last``
    NHWC weights for the convolutional networks (UNets, ControlNets, VAE).
``compile`` / ``compile=MODE``
    ``torch.compile`` with inductor, ``MODE`` one of ``COMPILE_MODES`` (default ``default``), on the
    components named by ``components=a+b`` (default: the denoiser and the VAE decoder). Shapes are
    static: every resolution and batch gets its own graph; the opt shapes of the component
    descriptors (the slug defaults) are compiled at load time (``warmup``), never on a request.
``cuda_graphs``
    Replay the compiled step as a CUDA graph (inductor's cudagraph trees: ``reduce-overhead``, or
    ``max-autotune`` over ``max-autotune-no-cudagraphs``); implies ``compile``.
``device_scheduler``
    The denoising loop runs the scheduler as precomputed weights on the device
    (``diffserve.engine.planned_loop``): no host synchronisation between steps. Schedulers that draw their
    own noise (``Euler a``, ``DDPM``, ...) keep the stock step with a log line.
``vae=fp32|fp16|bf16``
    The VAE's own precision (default: the model precision, fp32 where the VAE config forces upcast).
``sizes=WxH+WxH``
    Resolutions warmed up at load besides the slug defaults (e.g. ``sizes=512x768+768x512``), so
    requests at those sizes compile nothing either.
``nowarmup``
    Compile lazily, on the first call of each shape.

Presets: ``none`` (eager), ``fast`` (``fuse_qkv,channels_last,compile,cuda_graphs,device_scheduler``), ``max``
(``fast`` with ``compile=max-autotune``). What a device lacks is dropped with a log line saying so
(CUDA graphs off CUDA, inductor without a C++ compiler or Triton) and the component runs eagerly.

Inductor's compiled kernels and FX graphs are cached on disk under ``compile_cache_dir()``
(``DIFFSERVE_COMPILE_CACHE``, default ``$DIFFSERVE_HOME/torch-compile-cache``), so a restarted
server skips most of the compile.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from diffserve.engine import home_dir

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DENOISERS = ("unet", "transformer", "controlnet_unet")
CONV_COMPONENTS = ("unet", "controlnet_unet", "vae_encoder", "vae_decoder")
DEFAULT_COMPILED = (*DENOISERS, "vae_decoder")
PRESETS = {
    "none": "",
    "fast": "fuse_qkv,channels_last,compile,cuda_graphs,device_scheduler",
    "max": "fuse_qkv,channels_last,compile=max-autotune,cuda_graphs,device_scheduler",
}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (mode without CUDA graphs, mode with them)
_GRAPH_VARIANTS = {"default": ("default", "reduce-overhead"), "reduce-overhead": ("default", "reduce-overhead"),
                   "max-autotune": ("max-autotune-no-cudagraphs", "max-autotune"),
                   "max-autotune-no-cudagraphs": ("max-autotune-no-cudagraphs", "max-autotune")}


@dataclass(frozen=True)
class TorchOptimizations:
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: str | None = None
    """inductor mode, or None for eager."""
    cuda_graphs: bool = False
    components: tuple[str, ...] = DEFAULT_COMPILED
    """Components that are compiled (fusion and channels-last apply to every component)."""
    vae_precision: str | None = None
    warmup: bool = True
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    """(width, height) compiled at load besides the descriptors' opt shapes."""
    device_scheduler: bool = False
    """Pipelines run the scheduler as a planned loop (``diffserve.engine.planned_loop``: one matrix-vector product per step)."""

    @classmethod
    def parse(cls, spec: str | None) -> "TorchOptimizations":
        opts = cls()
        for token in (t.strip() for t in (spec or "").replace(" ", "").split(",")):
            if not token:
                continue
            key, _, value = token.partition("=")
            key = key.lower().replace("-", "_")
            if key in PRESETS and not value:
                opts = _merge(opts, cls.parse(PRESETS[key]))
            elif key in ("fuse_qkv", "channels_last", "cuda_graphs", "device_scheduler") and not value:
                opts = replace(opts, **{key: True}, compile=opts.compile or ("default" if key == "cuda_graphs" else None))
            elif key == "compile":
                mode = value or "default"
                if mode not in COMPILE_MODES:
                    raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
                opts = replace(opts, compile=mode)
            elif key == "components" and value:
                opts = replace(opts, components=tuple(value.split("+")))
            elif key == "vae" and value in PRECISIONS:
                opts = replace(opts, vae_precision=value)
            elif key == "sizes" and value:
                opts = replace(opts, warmup_sizes=tuple(_parse_size(v) for v in value.split("+")))
            elif key == "nowarmup" and not value:
                opts = replace(opts, warmup=False)
            else:
                raise ValueError(f"unknown torch optimization {token!r}; use {', '.join(PRESETS)} or a list of "
                                 "fuse_qkv, channels_last, compile[=MODE], cuda_graphs, device_scheduler, components=A+B, "
                                 "vae=PREC, sizes=WxH+WxH, nowarmup")
        return opts

    @property
    def enabled(self) -> bool:
        return bool(self.fuse_qkv or self.channels_last or self.compile or self.cuda_graphs or self.vae_precision
                    or self.device_scheduler)

    def spec(self) -> str:
        """Canonical spec string (``parse(spec())`` is the same options)."""
        parts = [name for name in ("fuse_qkv", "channels_last") if getattr(self, name)]
        if self.compile:
            parts.append("compile" if self.compile == "default" else f"compile={self.compile}")
        if self.cuda_graphs:
            parts.append("cuda_graphs")
        if self.device_scheduler:
            parts.append("device_scheduler")
        if self.compile and self.components != DEFAULT_COMPILED:
            parts.append("components=" + "+".join(self.components))
        if self.vae_precision:
            parts.append(f"vae={self.vae_precision}")
        if self.warmup_sizes:
            parts.append("sizes=" + "+".join(f"{w}x{h}" for w, h in self.warmup_sizes))
        if not self.warmup:
            parts.append("nowarmup")
        return ",".join(parts) or "none"


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ValueError(f"unknown torch optimization size {text!r}; write WIDTHxHEIGHT, e.g. 512x768")
    return int(width), int(height)


def _merge(a: TorchOptimizations, b: TorchOptimizations) -> TorchOptimizations:
    return replace(a, fuse_qkv=a.fuse_qkv or b.fuse_qkv, channels_last=a.channels_last or b.channels_last,
                   compile=b.compile or a.compile, cuda_graphs=a.cuda_graphs or b.cuda_graphs,
                   device_scheduler=a.device_scheduler or b.device_scheduler)


def compile_cache_dir() -> Path:
    """Where inductor caches compiled graphs: ``DIFFSERVE_COMPILE_CACHE``, else ``$DIFFSERVE_HOME/torch-compile-cache``."""
    return Path(os.environ.get("DIFFSERVE_COMPILE_CACHE") or home_dir() / "torch-compile-cache").resolve()


def compiler_unavailable(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "inductor needs the `triton` package for CUDA kernels"
        return None
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None and shutil.which("c++") is None:
            return f"inductor needs a C++ compiler on CPU ({compiler} not found)"
        return None
    return f"inductor does not target {device.type}"


@dataclass
class OptimizationReport:
    """What was applied and what fell back, per component (logged, and kept for benchmark reports)."""

    applied: dict[str, list[str]] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    warmup_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds per compiled component of the load-time warm-up (the compile, or a cache hit)."""

    def add(self, component: str, what: str) -> None:
        self.applied.setdefault(component, []).append(what)

    def fallback(self, message: str) -> None:
        self.fallbacks.append(message)
        logger.warning("torch optimizations: %s", message)


# -- the individual optimisations --------------------------------------------------------------------

def fuse_qkv_projections(module: nn.Module) -> tuple[int, int]:
    """Fuse the projections of every attention whose processor reads fused weights; (fused, kept)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    fused = kept = 0
    for attn in module.modules():
        if isinstance(attn, Attention) and type(attn.processor) is AttnProcessor2_0:
            attn.fuse_projections(fuse=True)
            if not hasattr(attn, "to_kv"):
                # A "self"-attention may still be called with separate context (IP-Adapter's resampler
                # attends to [x, latents]); the fused processor then projects k/v together.
                _add_fused_kv(attn)
            attn.set_processor(FusedAttnProcessor2_0())
            fused += 1
        elif isinstance(attn, AttentionModuleMixin) and getattr(attn.processor, "reads_fused_projections", False) \
                and attn._supports_qkv_fusion:
            # A family's processor that reads fused weights when the module has them (OminiControl's
            # ConditionedFluxAttnProcessor) says so with this attribute.
            attn.fuse_projections()  # the processor picks the fused weights up through _get_qkv_projections
            fused += 1
        elif isinstance(attn, (Attention, AttentionModuleMixin)):
            kept += 1
    return fused, kept


@torch.no_grad()
def _add_fused_kv(attn: nn.Module) -> None:
    weight = torch.cat([attn.to_k.weight, attn.to_v.weight])
    attn.to_kv = nn.Linear(weight.shape[1], weight.shape[0], bias=attn.to_k.bias is not None,
                           device=weight.device, dtype=weight.dtype)
    attn.to_kv.weight.copy_(weight)
    if attn.to_k.bias is not None:
        attn.to_kv.bias.copy_(torch.cat([attn.to_k.bias, attn.to_v.bias]))


class CompiledRunner:
    """A compiled component: marks a new CUDA-graph step per call and copies outputs out of graph memory."""

    def __init__(self, module: nn.Module, mode: str, cuda_graphs: bool):
        self.module = module
        self.mode = mode
        self.cuda_graphs = cuda_graphs
        self.compiled = torch.compile(module, mode=mode, dynamic=False)

    def __call__(self, *args):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(*args)
        if self.cuda_graphs:  # the next replay overwrites the graph's output buffers
            out = tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return out


def apply_optimizations(modules: dict[str, nn.Module], opts: TorchOptimizations, device: torch.device,
                        ) -> tuple[dict[str, Callable[..., Any]], OptimizationReport]:
    """Optimise ``modules`` (wrappers of ``diffserve.engine.runtime_torch``) in place; the callables to run them with.

    Fusion and channels-last change the modules themselves; compilation returns a runner per
    compiled component (the module stays reachable for its configs and weights).
    """
    report = OptimizationReport()
    runners: dict[str, Callable[..., Any]] = dict(modules)
    for name, module in modules.items():
        if opts.fuse_qkv:
            fused, kept = fuse_qkv_projections(module)
            if fused:
                report.add(name, f"fuse_qkv ({fused} attentions" + (f", {kept} kept separate)" if kept else ")"))
        if opts.channels_last and name in CONV_COMPONENTS:
            module.to(memory_format=torch.channels_last)
            report.add(name, "channels_last")

    compile_mode = opts.compile
    if compile_mode:
        reason = compiler_unavailable(device)
        if reason:
            report.fallback(f"compile: {reason}; running eager on {device}")
            compile_mode = None
    use_graphs = opts.cuda_graphs and compile_mode is not None
    if opts.cuda_graphs and device.type != "cuda":
        report.fallback(f"cuda_graphs: CUDA graphs need a CUDA device; running without them on {device}")
        use_graphs = False
    if compile_mode:
        _utf8_locale()
        cache = compile_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # inductor reads it on every cache access
        # Static shapes: one graph per (resolution, batch); allow many before dynamo gives up.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = _GRAPH_VARIANTS[compile_mode][1 if use_graphs else 0]
        for name in opts.components:
            if name in modules:
                runners[name] = CompiledRunner(modules[name], mode, use_graphs)
                report.add(name, f"compile={mode}")
    if opts.device_scheduler:
        report.add("denoise_loop", "device_scheduler")
    for name, steps in report.applied.items():
        logger.info("torch optimizations on %s: %s", name, ", ".join(steps))
    return runners, report


def _utf8_locale() -> None:
    """Make text files default to UTF-8, as inductor reads its kernel templates with the locale's encoding.

    Triton's python-backend stubs run an isolated embedded interpreter that ignores ``LANG`` and
    ``PYTHONUTF8`` and starts in the C locale (ASCII); ``open()`` follows the current LC_CTYPE.
    """
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            logger.info("text I/O locale set to %s for inductor", name)
            return
        except locale.Error:
            continue
    logger.warning("no UTF-8 locale available: inductor may fail to read its kernel templates")


def sdpa_backends(device: torch.device) -> list[str]:
    """The scaled-dot-product attention kernels torch may pick on ``device`` (for reports)."""
    if device.type != "cuda":
        return ["cpu (flash/mem-efficient are CUDA kernels)"]
    names = []
    for name in ("flash", "mem_efficient", "cudnn", "math"):
        enabled = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
        if enabled is not None and enabled():
            names.append(name)
    return names
