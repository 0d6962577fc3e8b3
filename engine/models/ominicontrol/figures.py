"""The OminiControl family's benchmark constants (DESIGN.md's compute floor, README's tolerance): light, no torch."""

from __future__ import annotations

from diffserve.engine.models.core import BenchmarkFigures

BENCHMARKS = {
    "ominicontrol": BenchmarkFigures(
        floor_ms=387.0, reference_request="512x512, 8 steps, FLUX DiT with 1024 condition tokens", reference_steps=8,
        full_size={"transformer": "flux1_schnell_transformer"},
        network_stages="bench_stages",
        # FLUX's CLIP-L and T5-XXL encoders and 16-channel VAE, the subject LoRA (rank 16): model cards and
        # file headers.
        published_params_m={"text_encoder": 123.1, "text_encoder_2": 4762.3, "vae": 83.8, "condition_lora": 14.2},
        gpu_tolerance=1e-4,
    ),
}

DENOISER_TFLOP = {"flux1_schnell_transformer": {(1024, 1024): 74.0}}
"""TFLOP of one FLUX DiT evaluation for one 1024² image."""
