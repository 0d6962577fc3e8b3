"""Denoiser throughput against batch size: what step-level batching can give on a device, at most.

Step-level batching (many requests' denoising steps in one network call) pays only as far as one
call over ``B`` requests costs less than ``B`` calls over one. This benchmark measures exactly that
on the full-size UNets with random weights: for each batch of ``B`` images (``2B`` rows under CFG),
the time of one UNet evaluation, eager and replayed as a CUDA graph (captured directly, no compiler,
so every batch size costs a second instead of a compile), the image-steps per second it gives and
their ratio to batch 1. A batcher's own overhead (gathering latents, per-request scheduler steps)
comes on top; the figures here are its ceiling.

Each point also checks what it measured: the graph replay equals the eager call on fresh inputs
(a stale replay fails), and the output is finite.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffserve.benchmarks import floors
from diffserve.benchmarks.figures import all_figures

logger = logging.getLogger(__name__)

SWEEP_SHAPES: dict[str, tuple[int, int]] = {slug: fig.sweep_shape for slug, _, fig in all_figures() if fig.sweep_shape}
"""The slugs swept and their resolution, as their families state them (``BenchmarkFigures.sweep_shape``):
batching pays at 512², little at 1024² (sglang PR #22183)."""
BATCHES = (1, 2, 4, 8, 16)


def _unet_inputs(config, batch: int, width: int, height: int, device: torch.device, dtype: torch.dtype,
                 seed: int, text_tokens: int = 77) -> dict[str, Any]:
    """Random inputs of one CFG denoising call over ``batch`` images (``2 * batch`` rows)."""
    g = torch.Generator("cpu").manual_seed(seed)
    rows, factor = 2 * batch, 8  # the SD/SDXL VAE downsamples by 8

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    kwargs: dict[str, Any] = {
        "sample": rand(rows, config.in_channels, height // factor, width // factor),
        "timestep": torch.full((rows,), 999.0 - seed, device=device),
        "encoder_hidden_states": rand(rows, text_tokens, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":
        n_ids = 6  # original size, crop top-left, target size
        pooled = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(rows, pooled), "time_ids": rand(rows, n_ids)}
    return kwargs


def _time(fn, repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median seconds of ``fn`` (synchronised)."""
    from diffserve.benchmarks.engine_bench import measure

    return float(np.median(measure(fn, repeats, device, warmup=warmup)))


def _graph(fn, static: dict[str, Any]):
    """``fn(**static)`` captured as a CUDA graph: (replay, its static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up off the capture stream (cuDNN/cuBLAS workspaces, SDPA kernel choice)
            fn(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(**static)
    return graph.replay, out


def _copy_into(static: dict[str, Any], fresh: dict[str, Any]) -> None:
    for key, value in fresh.items():
        if isinstance(value, dict):
            _copy_into(static[key], value)
        else:
            static[key].copy_(value)


def sweep_unet(slug: str, *, device: torch.device, dtype: torch.dtype, batches: tuple[int, ...] = BATCHES,
               repeats: int = 10, config_dir: Path | None = None, cuda_graphs: bool = True,
               size: tuple[int, int] | None = None) -> dict[str, Any]:
    """One slug's UNet over ``batches`` at ``size`` (default ``SWEEP_SHAPES``): per point eager and
    graph-replay time, throughput, checks."""
    from diffserve.benchmarks.full_size import SLUG_ARCHITECTURES, build_module

    width, height = size or SWEEP_SHAPES[slug]
    t0 = time.perf_counter()
    unet = build_module(SLUG_ARCHITECTURES[slug]["unet"], device, dtype, config_dir)
    build_s = time.perf_counter() - t0
    params = {"img_width": width, "img_height": height, "samples": 1, "guidance_scale": 7.5}
    step_floor_ms = floors.unet_step_floor_ms(slug, params)  # one image's CFG pair
    graphs = cuda_graphs and device.type == "cuda"

    def call(**kw):
        return unet(**kw, return_dict=False)[0]

    points: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in batches:
            point: dict[str, Any] = {"batch": batch, "rows": 2 * batch}
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                inputs = _unet_inputs(unet.config, batch, width, height, device, dtype, seed=1)
                eager_s = _time(lambda: call(**inputs), repeats, device)
                point["eager_ms"] = round(eager_s * 1000, 3)
                best = eager_s
                if graphs:
                    replay, out = _graph(call, inputs)
                    graph_s = _time(replay, repeats, device)
                    point["graph_ms"] = round(graph_s * 1000, 3)
                    fresh = _unet_inputs(unet.config, batch, width, height, device, dtype, seed=2)
                    _copy_into(inputs, fresh)
                    replay()
                    expected = call(**fresh)
                    diff = (out.float() - expected.float()).abs().max().item()
                    point["graph_max_abs_diff_vs_eager"] = diff
                    point["finite"] = bool(torch.isfinite(out).all().item())
                    point["graph_ok"] = point["finite"] and diff <= 1e-2 * max(expected.float().abs().max().item(), 1)
                    best = min(best, graph_s)
                    del replay, out, expected
                else:
                    point["finite"] = bool(torch.isfinite(call(**inputs)).all().item())
                point["image_steps_per_s"] = round(batch / best, 2)
                if device.type == "cuda":
                    point["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    point["fraction_of_floor"] = round(step_floor_ms * batch / (best * 1000), 4) if step_floor_ms else None
            except torch.cuda.OutOfMemoryError as exc:  # a point past the memory is a result too
                point.update(status="out of memory", reason=str(exc)[:200])
            except Exception as exc:  # noqa: BLE001 - one failed point (a capture refused) keeps the others
                logger.exception("%s batch %d failed", slug, batch)
                point.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            point.setdefault("status", "ok")
            points.append(point)
            logger.info("%s batch %d: %s", slug, batch, point)
    base = next((p["image_steps_per_s"] for p in points if p["status"] == "ok" and p["batch"] == 1), None)
    for p in points:
        if base and p.get("image_steps_per_s"):
            p["throughput_vs_batch_1"] = round(p["image_steps_per_s"] / base, 3)
    del unet
    return {"slug": slug, "resolution": f"{width}x{height}", "build_s": round(build_s, 2),
            "cuda_graphs": graphs, "unet_step_floor_ms_per_image": step_floor_ms, "points": points}


def run_batch_sweep(*, device: str | None, precision: str | None, slugs: tuple[str, ...] = tuple(SWEEP_SHAPES),
                    batches: tuple[int, ...] = BATCHES, repeats: int = 10, config_dir: Path | None = None,
                    cuda_graphs: bool = True, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The sweep of every slug in ``slugs``, as a report (``kind`` ``batch-sweep``); ``size`` replaces
    every slug's resolution (the CPU dry run's small one)."""
    from diffserve.benchmarks.environment import environment
    from diffserve.benchmarks.record import new_report
    from diffserve.engine.runtime_torch import resolve_device_dtype

    dev, dtype = resolve_device_dtype(device, precision, "sd15")
    report = new_report("batch-sweep", environment(dev))
    report["settings"] = {"device": str(dev), "precision": str(dtype).replace("torch.", ""), "batches": list(batches),
                          "repeats": repeats, "cuda_graphs": cuda_graphs and dev.type == "cuda",
                          "configs": "benchmarks/configs" if config_dir is None else str(config_dir)}
    report["note"] = ("one UNet evaluation over B images (2B rows under CFG) at the slug's resolution, random "
                      "weights; image-steps/s = B / the faster of eager and CUDA-graph replay; the ceiling of "
                      "step-level batching (a batcher's own gathering and per-request scheduler steps come on top)")
    report["sweeps"] = [sweep_unet(slug, device=dev, dtype=dtype, batches=batches, repeats=repeats,
                                   config_dir=config_dir, cuda_graphs=cuda_graphs, size=size) for slug in slugs]
    return report


def sweep_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Denoiser throughput against batch size ({report['settings']['device']}, "
             f"{report['settings']['precision']})", "", report["note"] + ".", "",
             "| slug | batch (images) | eager | CUDA graph | image-steps/s | vs batch 1 | fraction of floor | peak GB | check |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for sweep in report["sweeps"]:
        for p in sweep["points"]:
            if p["status"] != "ok":
                lines.append(f"| {sweep['slug']} {sweep['resolution']} | {p['batch']} | {p['status']} | | | | | | |")
                continue
            check = "finite" if p.get("finite") else "NOT FINITE"
            if "graph_ok" in p:
                check += f", replay = eager ({p['graph_max_abs_diff_vs_eager']:.1e})" if p["graph_ok"] else \
                    ", REPLAY DIFFERS"
            lines.append(
                f"| {sweep['slug']} {sweep['resolution']} | {p['batch']} | {p['eager_ms']:.2f} ms "
                f"| {p['graph_ms']:.2f} ms |" if "graph_ms" in p else
                f"| {sweep['slug']} {sweep['resolution']} | {p['batch']} | {p['eager_ms']:.2f} ms | — |")
            lines[-1] += (f" {p['image_steps_per_s']:.1f} | {p.get('throughput_vs_batch_1') or 0:.2f}x "
                          f"| {_pct(p.get('fraction_of_floor'))} | {p.get('peak_memory_gb', '—')} | {check} |")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"
