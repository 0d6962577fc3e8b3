"""One descriptor per network component: tensor names, dtypes, dynamic axes, shape profiles.

Everything that moves a tensor across a boundary reads these descriptors — the torch wrapper
modules (argument order), ONNX export (names and dynamic axes), TensorRT engine build
(min/opt/max profiles), the Triton ``config.pbtxt`` files (inputs, outputs, batching) and the
runtimes that bind buffers — so a tensor name is written exactly once. Shape profiles come
from the model catalog: every resolution and ``samples`` value a served slug allows (the
UNet batch doubles under classifier-free guidance).

Tensors are batch-major everywhere (Triton's dynamic batcher concatenates along axis 0): FLUX's
position ids therefore carry a batch axis whose rows are identical, and per-request scalars
(LoRA scale, condition bias) are ``[batch, 1]``.

Which components a checkpoint has is its family's business (``ModelFamily.component_descriptors`` and
``needed_components``, in ``engine/models/<family>/descriptors.py``); this module holds the shared
machinery and the Stable Diffusion base set (text encoders, UNet, VAE) that the ``sd`` family serves
and the ``omni_zero`` family extends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from diffserve.engine.catalog import CATALOG, ModelSpec
from diffserve.engine.checkpoint import CheckpointArchitecture
from diffserve.engine.models import ModelFamily
from diffserve.engine.options import OMINICONTROL_CONDITION_MODES  # re-exported

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """numpy-style dtype name: ``float32``, ``int64``."""
    dims: tuple[Dim, ...]


@dataclass(frozen=True)
class ComponentDescriptor:
    component: str
    """``text_encoder``, ``text_encoder_2``, ``unet``, ``transformer``, ``condition_kv``, ``vae_encoder``,
    ``vae_decoder``."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[int, int, int]]
    """Dynamic axis name -> (min, opt, max)."""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def max_batch(self) -> int:
        return self.profile["batch"][2]

    @property
    def batched(self) -> bool:
        """Whether every tensor leads with the batch axis (else it is served unbatched, like SCRFD)."""
        return all(t.dims and t.dims[0] == "batch" for t in (*self.inputs, *self.outputs))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}

    def shape(self, tensor: TensorSpec, which: str = "opt", axes: dict[str, int] | None = None) -> tuple[int, ...]:
        """The profile's ``which`` shape of ``tensor``; ``axes`` sets named dynamic axes (``resolution_axes``)."""
        index = {"min": 0, "opt": 1, "max": 2}[which]
        axes = axes or {}
        return tuple(d if isinstance(d, int) else axes.get(d, self.profile[d][index]) for d in tensor.dims)

    def input_shapes(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape(t, which) for t in self.inputs}


def resolution_axes(config: CheckpointArchitecture, width: int, height: int) -> dict[str, int]:
    """The size of every resolution-dependent axis for a ``width`` x ``height`` image."""
    f = config.vae_scale_factor
    if width % (2 * f) or height % (2 * f):
        raise ValueError(f"{width}x{height} is not a multiple of {2 * f} (twice the VAE scale factor)")
    tokens = (width // (2 * f)) * (height // (2 * f))  # FLUX: packed 2x2 latent patches
    return {"latent_height": height // f, "latent_width": width // f, "image_height": height, "image_width": width,
            "image_tokens": tokens, "condition_tokens": tokens}


def span(values: Iterable[int], opt: int | None = None) -> tuple[int, int, int]:
    values = sorted(set(values))
    return values[0], opt if opt is not None else values[0], values[-1]


def family_specs(config: CheckpointArchitecture) -> list[ModelSpec]:
    """The catalog's slugs of the checkpoint's architecture (``ModelSpec.architecture``)."""
    return [s for s in CATALOG.values() if s.architecture == config.family]


def serving_family(config: CheckpointArchitecture, specs: list[ModelSpec]) -> ModelFamily:
    """The family whose checkpoint ``config`` is, among the families of ``specs`` (``ModelSpec.family``).

    Slugs of one architecture may belong to several families (SDXL: ``sd``'s Segmind-Vega and
    ``omni_zero``); the checkpoint says which of them owns its components (``ModelFamily.recognizes``).
    """
    families = list(dict.fromkeys(s.family for s in specs))
    found = [f for f in families if f.recognizes(config)]
    if len(found) != 1:
        raise ValueError(f"slugs {', '.join(s.slug for s in specs)} ({', '.join(f.name for f in families)}): "
                         f"{'no family of theirs' if not found else 'more than one family'} recognizes this "
                         f"{config.family} checkpoint")
    return found[0]


def component_descriptors(config: CheckpointArchitecture,
                          specs: list[ModelSpec] | None = None) -> dict[str, ComponentDescriptor]:
    """Descriptors for the components a checkpoint needs to serve ``specs`` (default: its architecture's
    slugs), as the checkpoint's family declares them (``ModelFamily.component_descriptors``)."""
    specs = specs or family_specs(config)
    return serving_family(config, specs).component_descriptors(config, specs)


def needed_components(config: CheckpointArchitecture, specs: list[ModelSpec], condition_mode: str = "joint") -> list[str]:
    """Component names the slugs in ``specs`` call (the VAE encoder only for image inputs; the cached
    OminiControl components only in the ``cached`` condition mode, ``EngineOptions.ominicontrol_condition``),
    as the checkpoint's family lists them (``ModelFamily.needed_components``)."""
    if condition_mode not in OMINICONTROL_CONDITION_MODES:
        raise ValueError(f"condition_mode must be one of {', '.join(OMINICONTROL_CONDITION_MODES)}, "
                         f"got {condition_mode!r}")
    return serving_family(config, specs).needed_components(config, specs, condition_mode)


# ---- The Stable Diffusion base set (the ``sd`` family's components; ``omni_zero`` extends the SDXL one) ----

def text_encoder_names(config: CheckpointArchitecture) -> list[str]:
    """``text_encoder``, ``text_encoder_2``...: one per text encoder of the checkpoint."""
    return ["text_encoder"] + [f"text_encoder_{i + 1}" for i in range(1, config.num_text_encoders)]


def vae_names(specs: list[ModelSpec]) -> list[str]:
    """The VAE encoder where a slug takes an image input, and the decoder."""
    return (["vae_encoder"] if any(s.image_params for s in specs) else []) + ["vae_decoder"]


def sd_descriptors(config: CheckpointArchitecture, specs: list[ModelSpec]) -> dict[str, ComponentDescriptor]:
    """CLIP text encoder(s), the UNet (SDXL: with its added text and time embeddings) and the VAE."""
    f = config.vae_scale_factor
    resolutions = [r for s in specs for r in s.resolutions()] or [(config.sample_size * f,) * 2]
    heights = span(h // f for _, h in resolutions)
    widths = span(w // f for w, _ in resolutions)
    images = max(s.max_batch() for s in specs)
    seq = config.tokenizer_max_length
    c = config.latent_channels

    def image_axes(prefix: str, scale: int) -> dict[str, tuple[int, int, int]]:
        return {f"{prefix}height": tuple(v * scale for v in heights),
                f"{prefix}width": tuple(v * scale for v in widths)}

    out: dict[str, ComponentDescriptor] = {}
    for i, hidden in enumerate(config.text_hidden_sizes):
        name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        pooled = config.text_encoder_projection_dim if (config.family == "sdxl" and i == len(config.text_hidden_sizes) - 1) else hidden
        out[name] = ComponentDescriptor(
            component=name,
            inputs=(TensorSpec("input_ids", "int64", ("batch", seq)),),
            outputs=(
                TensorSpec("last_hidden_state", "float32", ("batch", seq, hidden)),
                TensorSpec("penultimate_hidden_state", "float32", ("batch", seq, hidden)),
                TensorSpec("pooled", "float32", ("batch", int(pooled))),
            ),
            profile={"batch": (1, 1, 2)},
        )
    unet_inputs = [
        TensorSpec("sample", "float32", ("batch", c, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", seq, config.unet_cross_attention_dim)),
    ]
    if config.family == "sdxl":
        unet_inputs += [
            TensorSpec("text_embeds", "float32", ("batch", int(config.text_encoder_projection_dim))),
            TensorSpec("time_ids", "float32", ("batch", 6)),
        ]
    latent_axes = image_axes("latent_", 1)
    out["unet"] = ComponentDescriptor(
        component="unet",
        inputs=tuple(unet_inputs),
        outputs=(TensorSpec("noise_pred", "float32", ("batch", c, "latent_height", "latent_width")),),
        profile={"batch": (1, 2, 2 * images), **latent_axes},
    )
    out["vae_encoder"] = ComponentDescriptor(
        component="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        outputs=(TensorSpec("moments", "float32", ("batch", 2 * c, "latent_height", "latent_width")),),
        profile={"batch": (1, 1, images), **image_axes("image_", f), **latent_axes},
    )
    out["vae_decoder"] = ComponentDescriptor(
        component="vae_decoder",
        inputs=(TensorSpec("latents", "float32", ("batch", c, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        profile={"batch": (1, 1, images), **image_axes("image_", f), **latent_axes},
    )
    return out


