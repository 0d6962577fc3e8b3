"""The model families, one folder each, registered here (see ``diffserve.engine.models.core``).

* ``sd`` — Stable Diffusion 1.5 and SDXL text-to-image and SD1.5 img2img (``sd1.5-scifi``,
  ``sd1.5-img2img``, ``segmind-vega``);
* ``omni_zero`` — SDXL with IP-Adapters, InstantID, ControlNets, face analysis and depth (``omni-zero``);
* ``ominicontrol`` — FLUX.1-schnell with the OminiControl subject LoRA (``ominicontrol``).

Adding a family: its folder (an ``__init__`` building a ``ModelFamily``, its pipelines, ``published``)
and one line in ``FAMILIES``; its slugs go in the catalog. Its checkpoint hooks (``ModelFamily.recognizes``,
``component_descriptors``, ``needed_components``, ``load_modules``) read its ``descriptors`` and ``modules``.
"""

from __future__ import annotations

from diffserve.engine.models.core import ModelFamily
from diffserve.engine.models.omni_zero import OMNI_ZERO
from diffserve.engine.models.ominicontrol import OMINICONTROL
from diffserve.engine.models.sd import SD

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD, OMNI_ZERO, OMINICONTROL)}



def family_of_checkpoint(architecture) -> ModelFamily:
    """The one registered family that recognizes a checkpoint of this ``diffserve.engine.checkpoint.CheckpointArchitecture``
    (``ModelFamily.recognizes``): for callers holding a checkpoint directory and no slug."""
    found = [f for f in FAMILIES.values() if f.recognizes(architecture)]
    if len(found) != 1:
        raise ValueError(f"a {architecture.family} checkpoint is recognized by "
                         f"{', '.join(f.name for f in found) or 'no family'}; exactly one family must own it")
    return found[0]


__all__ = ["FAMILIES", "ModelFamily", "OMINICONTROL", "OMNI_ZERO", "SD", "family_of_checkpoint"]
