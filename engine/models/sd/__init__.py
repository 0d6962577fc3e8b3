"""The Stable Diffusion family: SD1.5 and SDXL (Segmind-Vega) text-to-image, SD1.5 img2img.

* ``txt2img`` — diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` loop;
* ``img2img`` — SDEdit on SD1.5 (``StableDiffusionImg2ImgPipeline``);
* ``published`` — diffusers folders and LDM single files, checked and converted with the
  architecture configs in ``configs/`` (``ldm_keys``: the single-file key layout);
* ``descriptors`` and ``modules`` — its checkpoints' networks (``ModelFamily`` hooks): the shared SD
  base set of ``diffserve.engine.descriptors`` and ``diffserve.engine.runtime_torch`` (CLIP text encoders, UNet, VAE).
"""

from __future__ import annotations

from pathlib import Path

from diffserve.engine.models.core import ModelFamily
from diffserve.engine.models.sd import figures


class SdFamily(ModelFamily):
    def write_tiny(self, root: Path, slugs: list[str]) -> dict[str, dict[str, Path]]:
        # One ``checkpoint`` role per slug: an LDM single file (sd1.5-scifi) or a diffusers folder.
        written = self.published.write_tiny(Path(root))
        return {slug: {"checkpoint": written[slug]} for slug in slugs}


SD = SdFamily(
    name="sd",
    package=__name__,
    pipelines={"txt2img": "txt2img", "sd15_img2img": "img2img"},
    demo_params={
        # The seed pages' example payloads, with the example input image replaced by a local one.
        "sd1.5-scifi": {
            "prompt": "futuristic sci-fi high-tech city of Atlantis in late afternoon light, wispy clouds in a blue sky",
            "negative_prompt": "blurry, blurred, amateur, ugly, low quality, sketch, low resolution, warped, crooked, "
                               "deformed, cartoony, low detail",
            "scheduler": "dpmpp_2m", "num_inference_steps": 30, "guidance_scale": 5, "samples": 1,
            "seed": 516797155652, "img_width": 512, "img_height": 768, "base64": False,
        },
        "sd1.5-img2img": {
            "image": "<local>", "samples": 1, "prompt": "A fantasy landscape, trending on artstation, mystical sky",
            "negative_prompt": "nude, disfigured, blurry", "scheduler": "DDIM", "num_inference_steps": 25,
            "guidance_scale": 10.5, "strength": 0.75, "seed": 98877465625, "img_width": 512, "img_height": 512,
            "base64": False,
        },
        "segmind-vega": {
            "prompt": "cinematic photo detailed closeup portrait of a Beautiful cyberpunk woman, robotic parts, cables, "
                      "lights, high quality photography, 3 point lighting, flash with softbox, 4k",
            "negative_prompt": "(worst quality, low quality)", "samples": 1, "scheduler": "UniPC",
            "num_inference_steps": 25, "guidance_scale": 9, "seed": 1232788698, "img_width": 1024,
            "img_height": 1024, "base64": False,
        },
    },
    benchmarks=figures.BENCHMARKS,
    denoiser_tflop=figures.DENOISER_TFLOP,
)
