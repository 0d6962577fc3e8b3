"""The OminiControl family's networks as torch modules (``ModelFamily.load_modules``): FLUX.1's CLIP and T5
text encoders, the transformer with the OminiControl subject LoRA on its condition tokens (joint mode)
or computing/using cached condition keys and values (cached mode), and the VAE (``diffserve.engine.runtime_torch``).

The LoRA is the one ``.safetensors`` file under the checkpoint's ``condition_lora/`` (e.g. a copy of or
link to ``subject_512.safetensors``), or the ``condition_lora`` path given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from diffserve.engine.checkpoint import CONDITION_LORA_DIR, find_condition_lora
from diffserve.engine.models.ominicontrol.descriptors import CACHED_CONDITION_COMPONENTS
from diffserve.engine.runtime_torch import TextEncoderModule, from_pretrained, load_base_modules

logger = logging.getLogger(__name__)

FLUX_COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", *CACHED_CONDITION_COMPONENTS)
"""The networks loaded here; the VAE loads with ``diffserve.engine.runtime_torch.load_base_modules``."""


class T5EncoderModule(nn.Module):
    """input_ids -> last_hidden_state (FLUX's sequence conditioning; no attention mask, as FluxPipeline)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids, output_hidden_states=False)[0]


def load_modules(root: Path, dtype: torch.dtype, components: list[str] | None = None, *,
                 condition_lora: str | Path | None = None, **_options) -> dict[str, nn.Module]:
    """``components`` of a FLUX checkpoint (default: all, less the cached condition components where no
    condition LoRA is found: a plain FLUX checkpoint)."""
    root = Path(root)
    wanted = set(components or [*FLUX_COMPONENTS, "vae_encoder", "vae_decoder"])
    if components is None and find_condition_lora(root) is None and condition_lora is None:
        wanted -= set(CACHED_CONDITION_COMPONENTS)  # plain FLUX checkpoint
    mods = load_flux_modules(root, dtype, wanted, condition_lora)
    mods.update(load_base_modules(root, dtype, wanted - set(FLUX_COMPONENTS)))
    return mods


def load_flux_modules(root: Path, dtype: torch.dtype, wanted: set[str],
                      condition_lora: str | Path | None) -> dict[str, nn.Module]:
    """CLIP, T5 and the transformer modules among ``wanted`` (one set of transformer weights for all three
    transformer components)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from diffserve.engine.models.ominicontrol.condition import (
        ConditionKVModule, FluxCachedConditionTransformerModule, FluxTransformerModule, LoRALinear,
        read_condition_lora,
    )

    mods: dict[str, nn.Module] = {}
    if "text_encoder" in wanted:
        mods["text_encoder"] = TextEncoderModule(from_pretrained(CLIPTextModel, root / "text_encoder", dtype))
    if "text_encoder_2" in wanted:
        mods["text_encoder_2"] = T5EncoderModule(from_pretrained(T5EncoderModel, root / "text_encoder_2", dtype))
    if wanted & {"transformer", "condition_kv", "transformer_cached"}:
        # One set of weights serves all three: the condition branch reuses the image-stream layers.
        transformer = from_pretrained(FluxTransformer2DModel, root / "transformer", dtype)
        lora_path = Path(condition_lora) if condition_lora else find_condition_lora(root)
        lora = None
        if lora_path is not None:
            weights = read_condition_lora(lora_path, transformer)
            lora = nn.ModuleDict({name.replace(".", "-"): LoRALinear(*w) for name, w in weights.items()}).to(dtype)
            logger.info("condition LoRA %s: %d adapted layers", lora_path, len(weights))
        elif wanted & {"condition_kv"}:
            raise FileNotFoundError(f"no condition LoRA: put the OminiControl subject LoRA (.safetensors) in "
                                    f"{root / CONDITION_LORA_DIR}/ or pass its path")
        if "transformer" in wanted:
            mods["transformer"] = FluxTransformerModule(transformer, lora)
        if "transformer_cached" in wanted:
            mods["transformer_cached"] = FluxCachedConditionTransformerModule(transformer)
        if "condition_kv" in wanted:
            mods["condition_kv"] = ConditionKVModule(transformer, lora)
    return mods
