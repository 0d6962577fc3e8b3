"""The SD family's benchmark constants (DESIGN.md's compute floors, README's tolerances): light, no torch."""

from __future__ import annotations

from diffserve.engine.models.core import BenchmarkFigures

_SD15_FULL_SIZE = {"text_encoder": "clip_vit_l_text_encoder", "unet": "sd15_unet", "vae": "sd_vae"}

BENCHMARKS = {
    "sd1.5-scifi": BenchmarkFigures(
        floor_ms=102.0, reference_request="512x768, 30 steps, CFG, 1 image (seed page example)",
        floor_denoiser="sd15_unet", published="SD1.5 512x512 UNet", diffusers_pipeline="StableDiffusionPipeline",
        full_size=_SD15_FULL_SIZE, full_size_end_to_end=True, gpu_tolerance=2e-4, sweep_shape=(512, 512),
        e2e_size=512,
    ),
    "sd1.5-img2img": BenchmarkFigures(
        floor_ms=41.0, reference_request="512x512, 25 steps x strength 0.75 = 18 steps, CFG, 1 image",
        floor_denoiser="sd15_unet", img2img=True, published="SD1.5 512x512 UNet",
        diffusers_pipeline="StableDiffusionImg2ImgPipeline", full_size=_SD15_FULL_SIZE, full_size_end_to_end=True,
        e2e_size=512,
    ),
    "segmind-vega": BenchmarkFigures(
        floor_ms=190.0, reference_request="1024x1024, 25 steps, CFG, 1 image", floor_denoiser="segmind_vega_unet",
        published="SDXL 1024x1024, 30 steps",  # Vega is a distilled SDXL: a bound, not a like-for-like figure
        diffusers_pipeline="StableDiffusionXLPipeline",
        full_size={"text_encoder": "clip_vit_l_text_encoder", "text_encoder_2": "openclip_bigg_text_encoder",
                   "unet": "segmind_vega_unet", "vae": "sdxl_vae"},
        full_size_end_to_end=True, gpu_tolerance=1e-3, sweep_shape=(1024, 1024), e2e_size=1024,
    ),
}

DENOISER_TFLOP = {
    # TFLOP of one network evaluation for one image, keyed by (width, height) in pixels.
    "sd15_unet": {(512, 512): 0.80, (512, 768): 1.29, (768, 512): 1.29},
    "segmind_vega_unet": {(1024, 1024): 2.82},
}
