"""In-process torch implementation of ``Components`` from a local diffusers checkpoint.

Loads each network with ``from_pretrained(<local dir>/<component>)`` — the same code path for
the tiny random-weight test checkpoints and for real deployments — and wraps it in a small
module whose positional inputs and tuple outputs follow ``diffserve.engine.descriptors``; ONNX export
traces these same wrappers. fp32 on CPU; fp16 or bf16 on GPU (bf16 by default for FLUX, whose
transformer and T5 overflow in fp16). Attention uses PyTorch SDPA (diffusers' default processor
on torch 2).

Which networks a checkpoint holds is its family's business: ``load_component_modules`` asks the family
that recognizes the checkpoint (``diffserve.engine.models.family_of_checkpoint``, ``ModelFamily.load_modules``,
``engine/models/<family>/modules.py``). The Stable Diffusion networks (CLIP text encoders, UNet, VAE)
load here, in ``load_base_modules``, for every family that has them: an Omni-Zero checkpoint adds its
image encoder, adapters, ControlNets, face and depth models (``diffserve.engine.models.omni_zero.modules``); a
FLUX checkpoint loads its T5 and transformer, with the OminiControl subject LoRA found under
``condition_lora/`` or given as ``condition_lora`` (``diffserve.engine.models.ominicontrol.modules``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from diffserve.engine.checkpoint import read_architecture, weights_variant
from diffserve.engine.components import NamedTensorComponents
from diffserve.engine.descriptors import component_descriptors, resolution_axes
from diffserve.engine.models import family_of_checkpoint
from diffserve.engine.options import default_precision
from diffserve.engine.torch_optimize import CompiledRunner, TorchOptimizations, apply_optimizations

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def from_pretrained(cls, path: Path, dtype: torch.dtype):
    """``cls.from_pretrained`` of one component folder, with its fp16 weight variant when the run wants it
    (``diffserve.engine.checkpoint.weights_variant``: published folders often ship ``*.fp16.safetensors`` too)."""
    variant = weights_variant(path, dtype)
    if variant:
        logger.info("%s: loading the %s weight variant", path, variant)
    return cls.from_pretrained(path, torch_dtype=dtype, variant=variant)


def resolve_device_dtype(device: str | None, precision: str | None,
                         family: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype of a run: ``precision`` (``fp32``/``fp16``/``bf16``), else
    ``diffserve.engine.options.default_precision`` of the checkpoint architecture ``family`` (``sd15``, ``sdxl``,
    ``flux``) on that device."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {dev} requested but {why} (torch {torch.__version__}); use --device cpu")
    if precision is None:
        precision = default_precision(family or "", str(dev))
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    if dev.type == "cpu" and dtype is torch.float16:
        logger.warning("fp16 is slow and inexact on CPU; using fp32")
        dtype = torch.float32
    if dev.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        logger.warning("%s has no bf16 support; using fp16", torch.cuda.get_device_name(dev))
        dtype = torch.float16
    return dev, dtype


class TextEncoderModule(nn.Module):
    """input_ids -> (last_hidden_state, penultimate_hidden_state, pooled)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class UNetModule(nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


class VaeEncoderModule(nn.Module):
    """image in [-1, 1] -> posterior moments (mean ‖ logvar)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        h = self.vae.encoder(image)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


class VaeDecoderModule(nn.Module):
    """unscaled latents -> image in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def load_base_modules(root: Path, dtype: torch.dtype, wanted: set[str]) -> dict[str, nn.Module]:
    """The Stable Diffusion networks among ``wanted``: the CLIP text encoder(s) (``text_encoder_2`` where the
    checkpoint has one), the UNet, the VAE encoder and decoder. Other names are left to the family."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    mods: dict[str, nn.Module] = {}
    if "text_encoder" in wanted:
        mods["text_encoder"] = TextEncoderModule(from_pretrained(CLIPTextModel, root / "text_encoder", dtype))
    if "text_encoder_2" in wanted and (root / "text_encoder_2").is_dir():
        mods["text_encoder_2"] = TextEncoderModule(
            from_pretrained(CLIPTextModelWithProjection, root / "text_encoder_2", dtype))
    if "unet" in wanted:
        mods["unet"] = UNetModule(from_pretrained(UNet2DConditionModel, root / "unet", dtype))
    if wanted & {"vae_encoder", "vae_decoder"}:
        vae = from_pretrained(AutoencoderKL, root / "vae", dtype)
        if "vae_encoder" in wanted:
            mods["vae_encoder"] = VaeEncoderModule(vae)
        if "vae_decoder" in wanted:
            mods["vae_decoder"] = VaeDecoderModule(vae)
    return mods


def load_component_modules(checkpoint: str | Path, dtype: torch.dtype = torch.float32,
                           components: list[str] | None = None,
                           condition_lora: str | Path | None = None) -> dict[str, nn.Module]:
    """The wrapper modules of a local diffusers checkpoint, in eval mode on the CPU: ``components`` (default:
    the checkpoint family's set), loaded by the family that recognizes it (``ModelFamily.load_modules``).
    ``condition_lora``: OminiControl's subject LoRA, where not under the checkpoint's ``condition_lora/``."""
    root = Path(checkpoint)
    family = family_of_checkpoint(read_architecture(root))
    mods = family.load_modules(root, dtype, components, condition_lora=condition_lora)
    return {k: m.eval() for k, m in mods.items()}


class TorchComponents(NamedTensorComponents):
    """``Components`` backed by diffusers/transformers torch modules.

    ``optimizations`` (a ``diffserve.engine.torch_optimize`` spec string or ``TorchOptimizations``) fuses,
    re-lays-out and compiles the networks; compiled components are warmed up here, at load.
    """

    def __init__(self, checkpoint: str | Path, *, device: str | None = None, precision: str | None = None,
                 condition_lora: str | Path | None = None,
                 optimizations: str | TorchOptimizations | None = None):
        family = read_architecture(checkpoint).family
        dev, dtype = resolve_device_dtype(device, precision, family)
        modules = load_component_modules(checkpoint, dtype, condition_lora=condition_lora)
        self._setup(checkpoint, dev, dtype, modules, optimizations)

    def _setup(self, checkpoint: str | Path, device: torch.device, dtype: torch.dtype, modules: dict[str, nn.Module],
               optimizations: str | TorchOptimizations | None) -> None:
        NamedTensorComponents.__init__(self, checkpoint, device)
        self.dtype = dtype
        self.descriptors = component_descriptors(self.config)
        self.modules = {k: m.to(self.device) for k, m in modules.items()}
        opts = optimizations if isinstance(optimizations, TorchOptimizations) else \
            TorchOptimizations.parse(optimizations)
        self.optimizations = opts
        self.device_scheduler = opts.device_scheduler
        self.vae_dtype = self._place_vae(opts.vae_precision)
        self._runners, self.optimization_report = apply_optimizations(self.modules, opts, self.device)
        logger.info("loaded %s (%s) on %s in %s (VAE %s; torch optimizations: %s)", self.checkpoint,
                    self.config.family, self.device, self.dtype, self.vae_dtype, opts.spec())
        if opts.compile and opts.warmup:
            self.warm_up()

    def _place_vae(self, precision: str | None) -> torch.dtype:
        """The VAE's dtype: as asked, else the model's, except fp16 where the config forces upcast (SD/SDXL)."""
        vae = self.modules["vae_decoder"].vae if "vae_decoder" in self.modules else None
        if vae is None:
            return self.dtype
        if precision is not None:
            _, dtype = resolve_device_dtype(str(self.device), precision)
        elif self.dtype == torch.float16 and vae.config.get("force_upcast", False):
            dtype = torch.float32
        else:
            dtype = self.dtype
        vae.to(dtype)
        return dtype

    def warm_up(self) -> dict[str, float]:
        """Run every compiled component on zeros of its descriptor's opt shapes (the slug defaults) and at
        the spec's ``sizes``: compile now, not on a request.

        Returns seconds per component. Runs twice, as CUDA-graph trees record on the second call.
        """
        import time

        axis_sets = [{}] + [resolution_axes(self.config, w, h) for w, h in self.optimizations.warmup_sizes]
        seconds = {}
        for name, runner in self._runners.items():
            if not isinstance(runner, CompiledRunner) or name not in self.descriptors:
                continue
            desc = self.descriptors[name]
            shape_sets = {tuple(desc.shape(t, axes=axes) for t in desc.inputs): None for axes in axis_sets}
            t0 = time.perf_counter()
            for shapes in shape_sets:
                inputs = {t.name: torch.zeros(shape, dtype=getattr(torch, t.dtype))
                          for t, shape in zip(desc.inputs, shapes)}
                for _ in range(2):
                    self.run_component(name, inputs)
            seconds[name] = round(time.perf_counter() - t0, 3)
            logger.info("warm-up %s %s: %.1f s", self.checkpoint.name, name, seconds[name])
        self.optimization_report.warmup_seconds.update(seconds)
        return seconds

    @torch.inference_mode()
    def run_component(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if component not in self.modules:
            raise KeyError(f"{self.checkpoint} has no {component!r} component loaded"
                           + (" (no condition LoRA found)" if component in ("condition_kv", "transformer_cached") else ""))
        desc = self.descriptors[component]
        dtype = self.vae_dtype if component.startswith("vae") else self.dtype
        runner = self._runners[component]
        compiled = isinstance(runner, CompiledRunner)
        args = []
        for spec in desc.inputs:
            t = inputs.get(spec.name)
            if t is not None:
                t = t.to(self.device, dtype if t.is_floating_point() and spec.name != "timestep" else t.dtype)
                if compiled and not (t.is_inference() and t.is_contiguous()):
                    # Compiled graphs are specialised on strides and on inference-ness: give them one kind.
                    t = t.contiguous() if not t.is_contiguous() else t.clone()
            args.append(t)
        outs = runner(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {name: o.float() for name, o in zip(desc.output_names, outs)}
