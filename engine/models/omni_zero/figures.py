"""The Omni-Zero family's benchmark constants (DESIGN.md's compute floor, README's tolerance): light, no torch."""

from __future__ import annotations

from diffserve.engine.models.core import BenchmarkFigures

BENCHMARKS = {
    "omni-zero": BenchmarkFigures(
        floor_ms=276.0, reference_request="1024x1024, 10 steps, CFG, SDXL UNet + 2 ControlNets", reference_steps=10,
        full_size={"text_encoder": "clip_vit_l_text_encoder", "text_encoder_2": "openclip_bigg_text_encoder",
                   "unet": "sdxl_unet", "vae": "sdxl_vae", "controlnet": "sdxl_controlnet",
                   "controlnet_2": "sdxl_controlnet"},
        network_stages="bench_stages",
        # IP-Adapter's ViT-H/14 image encoder (model card).
        published_params_m={"image_encoder": 632.1},
        # InstantID ip-adapter.bin (1.70 GB) + ip-adapter-plus_sdxl_vit-h (0.85 GB), antelopev2's ONNX files
        # (0.36 GB), ZoeD_M12_N.pt (1.44 GB).
        published_files_gb={"ip_adapter": 1.70 + 0.85, "face_analysis": 0.36, "depth_estimator": 1.44},
        published_folders={"controlnet": "controlnet_identity", "controlnet_2": "controlnet_depth"},
        gpu_tolerance=1e-3,
    ),
}

DENOISER_TFLOP = {"sdxl_unet": {(1024, 1024): 6.76}}
"""TFLOP of one SDXL UNet evaluation for one image (the ControlNets not counted)."""
