"""The Omni-Zero family: an SDXL base with IP-Adapter Plus (style, composition), InstantID (identity),
two ControlNets (identity keypoints, depth), face analysis and a depth estimator.

* ``pipeline`` — the reference's ``OmniZeroSingle`` loop; ``checkpoint`` — the extra components'
  layout and config; ``modules`` — their torch modules; ``face_analysis`` — insightface's antelopev2
  detector and recognizer as the reference calls them; ``published`` and ``zoedepth`` — the published
  artifacts checked and assembled (ZoeDepth's original ``.pt`` converted); ``tiny`` — tiny random
  weights in those layouts and the demo portraits; ``descriptors`` — the components' tensors (the
  SDXL base set extended), which ``modules`` loads (``ModelFamily`` hooks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffserve.engine.models.core import ModelFamily
from diffserve.engine.models.omni_zero import figures


# ---- Family hooks that need code (issue #22; the checkpoint hooks read ``descriptors`` and ``modules``) ----
class OmniZeroFamily(ModelFamily):
    def demo_key(self, spec: Any) -> str:
        # Its tiny checkpoint is an SDXL one with Omni-Zero's additions, deployed apart from Segmind-Vega's.
        return f"tiny_{self.name}"

    def write_demo_inputs(self, directory: Path) -> dict[str, Path]:
        # Synthetic portraits standing in for the seed page's identity, style and base image URLs.
        return {f"<omni-{k}>": v for k, v in self.module("tiny").write_demo_inputs(directory).items()}


OMNI_ZERO = OmniZeroFamily(
    name="omni_zero",
    package=__name__,
    pipelines={"omni_zero": "pipeline"},
    demo_params={
        # The seed page's example payload; its image URLs become the tiny demo portraits (write_demo_inputs).
        "omni-zero": {
            "seed": 42, "prompt": "A person", "base_image": "<omni-base>", "style_image": "<omni-style>",
            "guidance_scale": 3, "identity_image": "<omni-identity>", "negative_prompt": "blurry, out of focus",
            "number_of_steps": 10, "number_of_images": 1, "composition_image": "<omni-base>",
            "base_image_strength": 0.15, "depth_image_strength": 0.5, "style_image_strength": 1,
            "identity_image_strength": 1, "composition_image_strength": 1,
        },
    },
    benchmarks=figures.BENCHMARKS,
    denoiser_tflop=figures.DENOISER_TFLOP,
)
