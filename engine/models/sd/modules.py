"""The Stable Diffusion family's networks as torch modules (``ModelFamily.load_modules``): the shared
base set of ``diffserve.engine.runtime_torch`` — CLIP text encoder(s), the UNet, the VAE."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffserve.engine.runtime_torch import load_base_modules

SD_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
"""Every network an SD1.5 or SDXL checkpoint may hold (SD1.5 has no ``text_encoder_2``)."""


def load_modules(root: Path, dtype: torch.dtype, components: list[str] | None = None,
                 **_options) -> dict[str, nn.Module]:
    """``components`` of an SD1.5 or SDXL checkpoint (default: all it has)."""
    return load_base_modules(Path(root), dtype, set(components or SD_COMPONENTS))
