"""One descriptor per network component: tensor names, dtypes, dynamic axes, shape profiles.

Everything that moves a tensor across a boundary reads these descriptors — the torch wrapper
modules (argument order), ONNX export (names and dynamic axes), TensorRT engine build
(min/opt/max profiles), the Triton ``config.pbtxt`` files (inputs, outputs, batching) and the
runtimes that bind buffers — so a tensor name is written exactly once. Shape profiles come
from the model catalog: every resolution and ``samples`` value a served slug allows (the
UNet batch doubles under classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from engine.catalog import CATALOG, ModelSpec
from engine.components import ModelConfig

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
    """``text_encoder``, ``text_encoder_2``, ``unet``, ``vae_encoder``, ``vae_decoder``."""
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

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs)}

    def shape(self, tensor: TensorSpec, which: str = "opt") -> tuple[int, ...]:
        index = {"min": 0, "opt": 1, "max": 2}[which]
        return tuple(d if isinstance(d, int) else self.profile[d][index] for d in tensor.dims)

    def input_shapes(self, which: str = "opt") -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape(t, which) for t in self.inputs}


def _span(values: Iterable[int], opt: int | None = None) -> tuple[int, int, int]:
    values = sorted(set(values))
    return values[0], opt if opt is not None else values[0], values[-1]


def family_specs(config: ModelConfig) -> list[ModelSpec]:
    return [s for s in CATALOG.values() if s.family == config.family]


def component_descriptors(config: ModelConfig,
                          specs: list[ModelSpec] | None = None) -> dict[str, ComponentDescriptor]:
    """Descriptors for the components a checkpoint needs to serve ``specs`` (default: its family's slugs)."""
    specs = specs or family_specs(config)
    f = config.vae_scale_factor
    resolutions = [r for s in specs for r in s.resolutions()] or [(config.sample_size * f,) * 2]
    heights = _span(h // f for _, h in resolutions)
    widths = _span(w // f for w, _ in resolutions)
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


def needed_components(config: ModelConfig, specs: list[ModelSpec]) -> list[str]:
    """Component names the slugs in ``specs`` call (the VAE encoder only for image inputs)."""
    names = ["text_encoder"] + [f"text_encoder_{i + 1}" for i in range(1, config.num_text_encoders)]
    names.append("unet")
    if any(s.image_params for s in specs):
        names.append("vae_encoder")
    names.append("vae_decoder")
    return names
