"""The Stable Diffusion family's components (``ModelFamily.component_descriptors`` / ``needed_components``):
the shared base set of ``diffserve.engine.descriptors`` — CLIP text encoder(s), the UNet, the VAE.
"""

from __future__ import annotations

from diffserve.engine.catalog import ModelSpec
from diffserve.engine.checkpoint import CheckpointArchitecture
from diffserve.engine.descriptors import ComponentDescriptor, sd_descriptors, text_encoder_names, vae_names


def recognizes(architecture: CheckpointArchitecture) -> bool:
    """A plain SD1.5 or SDXL checkpoint (a ``unet/``; an SDXL one with Omni-Zero's additions is ``omni_zero``'s)."""
    return architecture.family in ("sd15", "sdxl") and architecture.omni_zero is None


def component_descriptors(config: CheckpointArchitecture, specs: list[ModelSpec]) -> dict[str, ComponentDescriptor]:
    return sd_descriptors(config, specs)


def needed_components(config: CheckpointArchitecture, specs: list[ModelSpec], condition_mode: str = "joint") -> list[str]:
    """The text encoders, the UNet, the VAE."""
    return text_encoder_names(config) + ["unet"] + vae_names(specs)
