"""Omni-Zero's networks timed alone at full size (``diffserve.benchmarks.engine_bench``, ``--full-size``).

The IP-Adapter image encoder and the face models have no full-size config (``benchmarks/configs``), so
the pipeline does not run end to end there: the networks that have one are timed and the request is
estimated from them (``BenchmarkFigures.network_stages``).
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
    # Shapes from the modules' own configs, so the same code times tiny test configs.
    unet, vae, te1, te2 = raw["unet"].config, raw["vae"].config, raw["text_encoder"].config, raw["text_encoder_2"].config
    size, steps, cfg_batch = 1024, int(params["number_of_steps"]), 2
    latent = size // 2 ** (len(vae.block_out_channels) - 1)
    ids = torch.randint(0, te1.vocab_size, (1, te1.max_position_embeddings), generator=g).to(device)
    lat = rand(cfg_batch, unet.in_channels, latent, latent)
    t = torch.full((cfg_batch,), 999.0, device=device, dtype=dtype)
    hidden = rand(cfg_batch, te1.max_position_embeddings, unet.cross_attention_dim)
    n_ids = (unet.projection_class_embeddings_input_dim - te2.projection_dim) // unet.addition_time_embed_dim
    added = {"text_embeds": rand(cfg_batch, te2.projection_dim), "time_ids": rand(cfg_batch, n_ids)}
    cond = rand(cfg_batch, 3, size, size)
    calls["encode_text"] = lambda: [raw[k](ids, output_hidden_states=True) for k in ("text_encoder", "text_encoder_2")
                                    for _ in range(2)]
    calls["unet_step"] = lambda: raw["unet"](lat, t, encoder_hidden_states=hidden, added_cond_kwargs=added)
    calls["controlnet_step"] = lambda: [raw[k](lat, t, encoder_hidden_states=hidden, controlnet_cond=cond,
                                               added_cond_kwargs=added, return_dict=False)
                                        for k in ("controlnet", "controlnet_2")]
    image = rand(1, 3, size, size)
    calls["vae_encode"] = lambda: raw["vae"].encode(image)
    calls["vae_decode"] = lambda: raw["vae"].decode(lat[:1])
    pixels = (np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8)
    calls["image_encode"] = lambda: encode_image(pixels, fmt)
    note = ("estimate = encode_text + steps x (unet_step + controlnet_step) + vae_encode + vae_decode + "
            "image_encode; the IP-Adapter image encoder and face analysis are not timed")

    def estimate(m: dict[str, float]) -> float:
        return (m["encode_text"] + steps * (m["unet_step"] + m["controlnet_step"]) + m["vae_encode"]
                + m["vae_decode"] + m["image_encode"])

    return calls, estimate, note
