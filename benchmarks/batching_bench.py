"""Step-level batching in-process: images/s and latency at concurrency 1, 2, 4, 8, batched vs unbatched.

``concurrency`` client threads each send ``requests`` requests back to back (a closed loop) into one
set of torch components. *unbatched*: every thread runs its pipeline alone, the threads sharing the
CPU or GPU as the local backend did before batching; *batched*: the same threads with
``RunControl.driver`` set to one ``diffserve.engine.batching.StepBatcher`` over the UNet, as the local backend
runs now. Per point: images/s over the wall time of all requests, p50/p95 of request latency, and the
process's CPU seconds per image — on a machine other processes share, wall-clock figures depend on
how many threads each mode keeps runnable; CPU seconds per image do not.
The default request is the catalog's smallest for ``sd1.5-scifi`` (512², 20 steps, CFG), on the
tiny demo checkpoint unless ``--checkpoint`` names another.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffserve.benchmarks.environment import environment
from diffserve.benchmarks.record import new_report

CONCURRENCY = (1, 2, 4, 8)
SLUG = "sd1.5-scifi"
"""The slug this benchmark times (a setting of the run, as ``scale_out.SLUG``; its figures are its family's)."""


def _point(components, params: dict[str, Any], concurrency: int, requests: int, batcher) -> dict[str, Any]:
    from diffserve.engine.pipelines import RunControl, run

    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(requests):
            control = RunControl(driver=batcher.run if batcher is not None else None)
            start = time.perf_counter()
            run(SLUG, dict(params, seed=1000 * index + k), components, control)
            with lock:
                latencies.append(time.perf_counter() - start)

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
    return {"concurrency": concurrency, "requests": concurrency * requests, "wall_s": wall,
            "images_per_s": images / wall, "cpu_s_per_image": cpu / images, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)),
            "mean_call_rows": float(np.mean(batcher.calls)) if batcher is not None and batcher.calls else None}


def run_batching_bench(*, checkpoint: Path | None = None, width: int = 512, height: int = 512, steps: int = 20,
                       requests: int = 3, concurrency: tuple[int, ...] = CONCURRENCY, max_batch: int = 16,
                       device: str | None = None, command: str = "") -> dict[str, Any]:
    from diffserve.engine.batching import BatchingOptions, StepBatcher
    from diffserve.engine.catalog import validate
    from diffserve.engine.runtime_torch import TorchComponents

    if checkpoint is None:
        from diffserve.engine.tiny.demo import demo_checkpoints

        checkpoint = Path(demo_checkpoints()[SLUG])
    components = TorchComponents(checkpoint, device=device)
    params = validate(SLUG, {"prompt": "a city at night", "img_width": width, "img_height": height,
                             "num_inference_steps": steps})
    from diffserve.engine.pipelines import run

    run(SLUG, dict(params, seed=1), components)  # warm-up
    report = new_report("batching", environment(components.device))
    report["settings"] = {"slug": SLUG, "checkpoint": str(checkpoint), "width": width, "height": height,
                          "steps": steps, "requests_per_client": requests, "max_batch": max_batch,
                          "device": str(components.device), "command": command,
                          "load_average_at_start": list(os.getloadavg())}
    rows = []
    for c in concurrency:
        for mode in ("unbatched", "batched"):
            batcher = StepBatcher(components.unet, BatchingOptions(max_batch=max_batch)) if mode == "batched" else None
            try:
                point = _point(components, params, c, requests, batcher)
            finally:
                if batcher is not None:
                    batcher.close()
            rows.append(dict(point, mode=mode))
    base = {r["mode"]: r["images_per_s"] for r in rows if r["concurrency"] == concurrency[0]}
    for r in rows:
        r["speedup_over_c1"] = r["images_per_s"] / base[r["mode"]]
        unbatched = next(u for u in rows if u["mode"] == "unbatched" and u["concurrency"] == r["concurrency"])
        r["over_unbatched"] = r["images_per_s"] / unbatched["images_per_s"]
    report["points"] = rows
    report["settings"]["load_average_at_end"] = list(os.getloadavg())
    return report


def batching_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    env = report["environment"]
    lines = [f"# Step-level batching in-process: sd1.5-scifi {s['width']}x{s['height']}, {s['steps']} steps "
             f"({s['device']}, checkpoint {Path(s['checkpoint']).name})", "",
             f"- run: {report['created_utc']}; `{s.get('command', '')}`",
             f"- CPU: {env.get('machine', {}).get('cpu', '?')} ({env.get('machine', {}).get('cpu_count', '?')} cores); "
             f"load average {s['load_average_at_start'][0]:.1f} at start, {s['load_average_at_end'][0]:.1f} at end "
             "(other processes share this machine: compare rows of one run only)",
             f"- max_batch {s['max_batch']}; {s['requests_per_client']} requests per client",
             "",
             "| concurrency | mode | images/s | vs concurrency 1 | vs unbatched | p50 s | p95 s | CPU s/image "
             "| mean UNet rows/call |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["points"]:
        rows = "" if r["mean_call_rows"] is None else f"{r['mean_call_rows']:.1f}"
        lines.append(f"| {r['concurrency']} | {r['mode']} | {r['images_per_s']:.3f} | {r['speedup_over_c1']:.2f}x | "
                     f"{r['over_unbatched']:.2f}x | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                     f"{r.get('cpu_s_per_image', float('nan')):.2f} | {rows} |")
    return "\n".join(lines) + "\n"
