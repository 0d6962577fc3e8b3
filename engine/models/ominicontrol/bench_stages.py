"""OminiControl's networks timed alone at full size (``diffserve.benchmarks.engine_bench``, ``--full-size``).

FLUX's T5/CLIP text encoders and 16-channel VAE have no full-size config (``benchmarks/configs``), so the
pipeline does not run end to end there: the transformer is timed and the request estimated from it
(``BenchmarkFigures.network_stages``), and both condition modes are timed on it (``extra_timings``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


def network_stages(raw: dict[str, torch.nn.Module], params: dict[str, Any], device: torch.device, dtype: torch.dtype,
                   fmt: str) -> tuple[dict[str, Callable[[], Any]], Callable[[dict[str, float]], float], str]:
    """One call per stage on the full-size modules ``raw``; the end-to-end estimate from the stages' medians (ms)."""
    from diffserve.engine.imageio import encode_image

    g = torch.Generator("cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    calls: dict[str, Callable[[], Any]] = {}
    flux = raw["transformer"].config
    steps, text_tokens = int(params["steps"]), 256  # FLUX.1-schnell's max_sequence_length
    tokens = 2 * (512 // 16) ** 2  # 1024 image tokens at 512x512, plus as many condition tokens
    hidden, text = rand(1, tokens, flux.in_channels), rand(1, text_tokens, flux.joint_attention_dim)
    pooled, t = rand(1, flux.pooled_projection_dim), torch.full((1,), 1.0, device=device, dtype=dtype)
    img_ids = torch.zeros(tokens, 3, device=device, dtype=dtype)
    txt_ids = torch.zeros(text_tokens, 3, device=device, dtype=dtype)
    calls["transformer_step"] = lambda: raw["transformer"](
        hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
        img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    pixels = (np.random.RandomState(0).rand(512, 512, 3) * 255).astype(np.uint8)
    calls["image_encode"] = lambda: encode_image(pixels, fmt, int(params.get("image_quality") or 95))
    note = ("estimate = steps x transformer_step + image_encode at 512x512 with 1024 condition tokens; "
            "the T5/CLIP text encoders and the FLUX VAE are not timed")

    def estimate(m: dict[str, float]) -> float:
        return steps * m["transformer_step"] + m["image_encode"]

    return calls, estimate, note


def extra_timings(raw: dict[str, torch.nn.Module], params: dict[str, Any], device: torch.device, dtype: torch.dtype,
                  repeats: int, stages: dict[str, dict[str, Any]],
                  time_stages: Callable[..., dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The report entries beside the stages: ``condition_cache`` (``time_condition_cache``)."""
    return {"condition_cache": time_condition_cache(raw["transformer"], params, device, dtype, repeats,
                                                    stages["transformer_step"], time_stages)}


def time_condition_cache(transformer: torch.nn.Module, params: dict[str, Any], device: torch.device,
                         dtype: torch.dtype, repeats: int, joint_step: dict[str, Any],
                         time_stages: Callable[..., dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """OminiControl's condition at full size, in both of our modes, on the networks (no T5/CLIP/VAE configs);
    ``time_stages(calls, repeats, device)`` is the benchmark's timer (``diffserve.benchmarks.engine_bench.time_stages``).

    The default (``diffserve.engine.models.ominicontrol.condition.FluxTransformerModule`` with condition tokens) reproduces the
    reference as shipped: every step runs text, image and the 1024 condition tokens (rank-16 LoRA on
    the condition rows, timestep 0) through one joint attention. The opt-in cached mode computes the
    condition keys/values once (``ConditionKVModule``) and then runs a step over text and image tokens
    attending to them (``FluxCachedConditionTransformerModule``). ``joint_step`` is the stock step
    without condition tokens, for scale. Estimates per request: joint = steps x joint step; cached =
    condition_kv + steps x cached step. Installs the condition attention processors on ``transformer``
    (run last).
    """
    from diffserve.engine.models.ominicontrol.condition import (
        ConditionKVModule, FluxCachedConditionTransformerModule, FluxTransformerModule, condition_lora_targets,
    )

    flux = transformer.config
    steps, text_tokens, tokens = int(params["steps"]), 256, (512 // 16) ** 2
    g = torch.Generator("cpu").manual_seed(1)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device, dtype)

    modules = dict(transformer.named_modules())
    lora = {}
    for name in condition_lora_targets(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)):
        linear = modules.get(name)
        if isinstance(linear, torch.nn.Linear):
            lora[name] = (torch.randn(16, linear.in_features, generator=g) * 0.01,
                          torch.randn(linear.out_features, 16, generator=g) * 0.01)
    branch = ConditionKVModule(transformer, lora).to(device, dtype)
    joint = FluxTransformerModule(transformer, lora).to(device, dtype)
    cached_step = FluxCachedConditionTransformerModule(transformer)
    cond, ids = rand(1, tokens, flux.in_channels), torch.zeros(1, tokens, 3, device=device, dtype=dtype)
    pooled, scale = rand(1, flux.pooled_projection_dim), torch.ones(1, 1, device=device, dtype=dtype)
    hidden, text = rand(1, tokens, flux.in_channels), rand(1, text_tokens, flux.joint_attention_dim)
    t = torch.full((1,), 1.0, device=device, dtype=dtype)
    txt_ids = torch.zeros(1, text_tokens, 3, device=device, dtype=dtype)
    bias = torch.zeros(1, 1, device=device, dtype=dtype)
    with torch.inference_mode():
        key, value = branch(cond, ids, pooled, scale)
        calls = {"condition_kv": lambda: branch(cond, ids, pooled, scale),
                 "cached_step": lambda: cached_step(hidden, t, text, pooled, ids, txt_ids, key, value, bias),
                 "joint_step_with_condition": lambda: joint(hidden, t, text, pooled, ids, txt_ids, cond, ids, scale,
                                                                   bias)}
        stages = time_stages(calls, repeats, device)
    kv_ms, step_ms = stages["condition_kv"]["median_ms"], stages["cached_step"]["median_ms"]
    joint_ms = stages["joint_step_with_condition"]["median_ms"]
    cached, default = kv_ms + steps * step_ms, steps * joint_ms
    return {"stages": stages, "steps": steps, "condition_tokens": tokens, "lora_rank": 16,
            "cached_estimate_ms": round(cached, 3), "joint_estimate_ms": round(default, 3),
            "cached_vs_joint": round(cached / default, 4) if default else None,
            "stock_step_ms": joint_step["median_ms"],
            "note": "denoiser work per request only (text encoders and VAE not timed); joint is the default "
                    "(the reference as shipped), cached the opt-in --ominicontrol-condition cached"}
