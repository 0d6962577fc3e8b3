"""The OminiControl family: FLUX.1-schnell with the OminiControl subject LoRA.

* ``flux`` — the FLUX flow-matching loop; ``pipeline`` — OminiControl on top of it (condition tokens
  of the subject image); ``condition`` — the LoRA-on-condition-tokens transformer; ``published`` — the
  FLUX folder and the LoRA checked and assembled; ``descriptors`` and ``modules`` — the checkpoint's
  networks (``ModelFamily`` hooks): CLIP, T5, the transformer in joint or cached condition mode, the VAE.
"""

from __future__ import annotations

from diffserve.engine.models.core import ModelFamily
from diffserve.engine.models.ominicontrol import figures


OMINICONTROL = ModelFamily(
    name="ominicontrol",
    package=__name__,
    pipelines={"ominicontrol": "pipeline"},
    demo_params={
        "ominicontrol": {
            "image": "<local>", "prompt": "photo of this orange sofa in a modern living room", "steps": 8,
            "seed": 4710825087, "image_format": "png", "image_quality": 90, "base64": False,
        },
    },
    benchmarks=figures.BENCHMARKS,
    denoiser_tflop=figures.DENOISER_TFLOP,
)
