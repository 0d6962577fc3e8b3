"""Step-level batching in-process: images/s and latency at concurrency 1, 2, 4, 8, batched vs unbatched.

``concurrency`` client threads each send ``requests`` requests back to back (a closed loop) into one
set of torch components. *unbatched*: every thread runs its pipeline alone, the threads sharing the
CPU or GPU as the local backend did before batching; *batched*: the same threads with
``RunControl.driver`` set to one ``diffserve.engine.batching.StepBatcher`` over the UNet, as the local backend
runs now. Per point: images/s over the wall time of all requests, p50/p95 of request latency, and the
process's CPU seconds per image — on a machine other processes share, wall-clock figures depend on
how many threads each mode keeps runnable; CPU seconds per image do not. Also per point: the mean
UNet rows per denoiser call (batched), and the largest pixel difference of the request of seed 0 from
the same request run alone before the sweep (0 unbatched; batched, the UNet's rounding at another batch
size). The GPU plan (``diffserve.benchmarks.gpu.runner``, step ``batching-sweep``) runs it on full-size
random-weight components of SD1.5 and Vega, writing its report after every point.
The default request is the catalog's smallest for ``sd1.5-scifi`` (512², 20 steps, CFG), on the
tiny demo checkpoint unless ``--checkpoint`` names another.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from diffserve.benchmarks.environment import environment
from diffserve.benchmarks.record import new_report

logger = logging.getLogger(__name__)

CONCURRENCY = (1, 2, 4, 8)
SLUG = "sd1.5-scifi"
"""The slug this benchmark times (a setting of the run, as ``scale_out.SLUG``; its figures are its family's)."""


def _point(components, slug: str, params: dict[str, Any], concurrency: int, requests: int, batcher,
           reference: np.ndarray | None = None) -> dict[str, Any]:
    from diffserve.engine.pipelines import RunControl, run

    latencies: list[float] = []
    first: list[np.ndarray] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(requests):
            control = RunControl(driver=batcher.run if batcher is not None else None)
            start = time.perf_counter()
            result = run(slug, dict(params, seed=1000 * index + k), components, control)
            with lock:
                latencies.append(time.perf_counter() - start)
                if index == 0 and k == 0:  # seed 0: the reference request
                    first.append(result.images)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    cpu_start = time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    images = concurrency * requests * int(params.get("samples", 1))
    if len(latencies) != concurrency * requests:
        raise RuntimeError(f"{concurrency * requests - len(latencies)} of {concurrency * requests} requests failed "
                           "(see the log)")
    point = {"concurrency": concurrency, "requests": concurrency * requests, "wall_s": wall,
             "images_per_s": images / wall, "cpu_s_per_image": cpu / images,
             "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
             "mean_call_rows": None}
    if reference is not None and first:
        # The same request (seed 0) alone and here: 0 unbatched, the UNet's rounding at another batch size batched.
        point["max_pixel_diff_vs_alone"] = float(np.abs(first[0].astype(np.float64) - reference).max())
    return point


class _CountingDenoiser:
    """The denoiser with the rows of every call recorded (``StepBatcher.calls`` keeps the last 64 only)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.call_rows: list[int] = []

    def __call__(self, *args, **kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if v is not None)
        self.call_rows.append(int(first.shape[0]))
        return self.denoiser(*args, **kwargs)


def run_batching_bench(*, checkpoint: Path | None = None, width: int = 512, height: int = 512, steps: int = 20,
                       requests: int = 3, concurrency: tuple[int, ...] = CONCURRENCY, max_batch: int = 16,
                       device: str | None = None, command: str = "", slug: str = SLUG, components=None,
                       params: dict[str, Any] | None = None,
                       on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The sweep as a report (kind ``batching``).

    ``components``: torch components already built (the GPU plan's full-size random-weight networks); else
    ``checkpoint`` (default the tiny demo checkpoint of ``slug``) is loaded. ``params``: request parameters
    besides size and steps (scheduler, guidance). ``width``, ``height`` and ``steps`` are set after the
    catalog's validation, so a benchmark may run fewer steps or a smaller size than the API accepts (the
    report says so). ``on_point(report)`` is called after every point with the report so far (a run cut off
    keeps the points it finished). Per point, the request of seed 0 is compared with the same request run
    alone before the sweep (``max_pixel_diff_vs_alone``, pixels in 0..1).
    """
    from diffserve.engine.batching import BatchingOptions, StepBatcher
    from diffserve.engine.catalog import get_model, validate

    if components is None:
        from diffserve.engine.runtime_torch import TorchComponents

        if checkpoint is None:
            from diffserve.engine.tiny.demo import demo_checkpoints

            checkpoint = Path(demo_checkpoints()[slug])
        components = TorchComponents(checkpoint, device=device)
    spec = get_model(slug)
    request = validate(slug, {"prompt": "a city at night", **(params or {})})
    below = {}
    for key, value in (("img_width", width), ("img_height", height), ("num_inference_steps", steps)):
        if key in request:
            request[key] = value
            param = spec.param(key)
            if (param.choices and value not in param.choices) or (param.minimum is not None and value < param.minimum):
                below[key] = value
    from diffserve.engine.pipelines import run

    reference = run(slug, dict(request, seed=0), components).images.astype(np.float64)  # warm-up, alone
    report = new_report("batching", environment(components.device))
    report["settings"] = {"slug": slug, "checkpoint": str(checkpoint) if checkpoint is not None else None,
                          "width": width, "height": height, "steps": steps, "requests_per_client": requests,
                          "max_batch": max_batch, "device": str(components.device),
                          "precision": str(components.dtype).replace("torch.", ""),
                          "request": {k: v for k, v in request.items() if k not in ("prompt", "seed")},
                          "outside_the_catalog": below, "command": command,
                          "load_average_at_start": list(os.getloadavg())}
    report["points"] = []
    for c in concurrency:
        for mode in ("unbatched", "batched"):
            batcher = None
            try:
                if mode == "batched":
                    batcher = StepBatcher(_CountingDenoiser(components.unet), BatchingOptions(max_batch=max_batch))
                point = dict(_point(components, slug, request, c, requests, batcher, reference), mode=mode, status="ok")
                if batcher is not None:
                    point["mean_call_rows"] = _mean(batcher.denoiser.call_rows)
                    point["calls"] = len(batcher.denoiser.call_rows)
            except Exception as exc:  # noqa: BLE001 - a failed point (out of memory) keeps the others
                logger.exception("%s concurrency %d %s failed", slug, c, mode)
                point = {"concurrency": c, "mode": mode, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                if batcher is not None:
                    batcher.close()
            if components.device.type == "cuda":
                point["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(components.device) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(components.device)
            report["points"].append(point)
            _relate(report["points"], concurrency[0])
            logger.info("%s concurrency %d %s: %s", slug, c, mode, point)
            if on_point is not None:
                on_point(report)
    report["settings"]["load_average_at_end"] = list(os.getloadavg())
    return report


def _mean(values: list[int]) -> float | None:
    return float(np.mean(values)) if values else None


def _relate(rows: list[dict[str, Any]], first: int) -> None:
    """Each ok point against its mode at the first concurrency and against unbatched at its own."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    base = {r["mode"]: r["images_per_s"] for r in ok if r["concurrency"] == first}
    for r in ok:
        r["speedup_over_c1"] = r["images_per_s"] / base[r["mode"]] if r["mode"] in base else None
        unbatched = next((u for u in ok if u["mode"] == "unbatched" and u["concurrency"] == r["concurrency"]), None)
        r["over_unbatched"] = r["images_per_s"] / unbatched["images_per_s"] if unbatched else None


def batching_markdown(report: dict[str, Any], header: bool = True) -> str:
    s = report["settings"]
    env = report["environment"]
    source = f"checkpoint {Path(s['checkpoint']).name}" if s.get("checkpoint") else "full-size random weights"
    lines = [f"# Step-level batching in-process: {s.get('slug', SLUG)} {s['width']}x{s['height']}, {s['steps']} steps "
             f"({s['device']}, {s.get('precision', 'float32').replace('float', 'fp')}, {source})", ""]
    if header:
        lines += [f"- run: {report['created_utc']}; `{s.get('command', '')}`",
                  f"- CPU: {env.get('machine', {}).get('cpu', '?')} ({env.get('machine', {}).get('cpu_count', '?')} "
                  f"cores); load average {s['load_average_at_start'][0]:.1f} at start"
                  + (f", {s['load_average_at_end'][0]:.1f} at end" if "load_average_at_end" in s else "")
                  + " (other processes share this machine: compare rows of one run only)"]
    lines += [f"- max_batch {s['max_batch']} rows; {s['requests_per_client']} requests per client"
              + (f"; outside the catalog (a benchmark setting): {s['outside_the_catalog']}" if s.get("outside_the_catalog")
                 else ""),
              "",
              "| concurrency | mode | images/s | vs concurrency 1 | vs unbatched | p50 s | p95 s | CPU s/image "
              "| mean UNet rows/call | max pixel diff vs alone |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["points"]:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['concurrency']} | {r['mode']} | {r['status']}: {r.get('reason', '')} | | | | | | | |")
            continue
        lines.append(f"| {r['concurrency']} | {r['mode']} | {r['images_per_s']:.3f} | {_x(r.get('speedup_over_c1'))} | "
                     f"{_x(r.get('over_unbatched'))} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r.get('cpu_s_per_image', float('nan')):.2f} | {_f(r.get('mean_call_rows'), '{:.1f}')} "
                     f"| {_f(r.get('max_pixel_diff_vs_alone'), '{:.1e}')} |")
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def sweep_markdown(report: dict[str, Any]) -> str:
    """A ``batching-sweep`` report (the GPU plan's step: one ``batching`` report per slug under ``sweeps``)."""
    s = report["settings"]
    lines = [f"# Step-level batching at full size ({s['device']}, {s['precision']})", "", report.get("note", "") + ".", ""]
    for sweep in report["sweeps"]:
        lines += [batching_markdown({**sweep, "environment": report["environment"]}, header=False).replace(
            "# Step-level", "## Step-level", 1)]
    return "\n".join(lines)
