"""Cost per image and GPU capacity planning from measured latency/throughput curves.

Input: serving sweeps (``diffserve bench serve``: throughput, p95 latency and errors at each
concurrency or offered load) or, lacking one, engine results (one request at a time). For each
slug and each measured path (API sync/async, Triton bls/fused), with a p95 latency objective
``SLO``, a target request rate ``R``, a price ``P`` in $ per GPU-hour and ``G`` GPUs behind the
measured server:

    feasible levels    L = { l : p95(l) <= SLO  and  errors(l) / requests(l) <= max_error_rate }
    per-GPU capacity   X = max over L of throughput(l) / G                      [requests/s/GPU]
    GPUs needed        N = ceil(R / X)
    utilisation        U = R / (N * X)
    images per second  I = X * images_per_request                               [per GPU]
    cost               $ per 1000 images = P / (3600 * I) * 1000

"at peak" is the same cost at the level of highest throughput whatever its latency (the
cheapest a GPU-second gets). With no feasible level the plan is infeasible: even the lightest
load measured misses the objective, and more GPUs do not lower latency.

An engine result is a single point: throughput = 1000 / median ms (one request at a time, no
batching across requests), p95 taken as the end-to-end p90 (the closest statistic it keeps).
It is a conservative estimate for a server that overlaps requests. The capacity report's
markdown (``benchmarks.report``) restates these formulas for its readers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.environment import environment
from benchmarks.record import load_report, new_report, stored_reports


@dataclass(frozen=True)
class CapacityInputs:
    slo_p95_ms: float
    target_rps: float
    gpu_hour_usd: float
    gpus_per_server: int = 1
    max_error_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.slo_p95_ms <= 0 or self.target_rps <= 0 or self.gpu_hour_usd < 0:
            raise ValueError("the p95 objective and target rate must be positive, the price not negative")
        if self.gpus_per_server < 1 or not 0 <= self.max_error_rate < 1:
            raise ValueError("gpus_per_server must be >= 1 and max_error_rate in [0, 1)")


@dataclass(frozen=True)
class CurvePoint:
    level: float
    throughput_rps: float
    p95_ms: float
    requests: int
    errors: int


def usd_per_1000_images(gpu_hour_usd: float, images_per_s_per_gpu: float) -> float | None:
    if images_per_s_per_gpu <= 0:
        return None
    return gpu_hour_usd / (3600.0 * images_per_s_per_gpu) * 1000.0


def plan(points: list[CurvePoint], images_per_request: int, inputs: CapacityInputs) -> dict[str, Any]:
    """Capacity and cost of one measured curve (see the module docstring for the formulas)."""
    usable = [p for p in points if p.throughput_rps and p.p95_ms is not None]
    feasible = [p for p in usable
                if p.p95_ms <= inputs.slo_p95_ms and (p.errors / p.requests if p.requests else 1) <= inputs.max_error_rate]
    out: dict[str, Any] = {"level": None, "p95_ms": None, "rps_per_gpu": None, "images_per_s_per_gpu": None,
                           "gpus_needed": None, "utilisation": None, "usd_per_1000_images": None,
                           "usd_per_1000_images_at_peak": None, "reason": None}
    if usable:
        peak = max(usable, key=lambda p: p.throughput_rps)
        out["usd_per_1000_images_at_peak"] = _r(usd_per_1000_images(
            inputs.gpu_hour_usd, peak.throughput_rps / inputs.gpus_per_server * images_per_request))
    if not feasible:
        lowest = min(usable, key=lambda p: p.level) if usable else None
        out["reason"] = ("infeasible: no measured level meets the objective"
                         + (f" (p95 at level {lowest.level:g} is {lowest.p95_ms:.1f} ms > {inputs.slo_p95_ms:g} ms"
                            f"{', or it had errors' if lowest.errors else ''})" if lowest else " (no successful level)"))
        return out
    best = max(feasible, key=lambda p: p.throughput_rps)
    x = best.throughput_rps / inputs.gpus_per_server
    n = math.ceil(inputs.target_rps / x - 1e-9)
    images = x * images_per_request
    out.update(level=best.level, p95_ms=best.p95_ms, rps_per_gpu=_r(x), images_per_s_per_gpu=_r(images),
               gpus_needed=n, utilisation=_r(inputs.target_rps / (n * x)),
               usd_per_1000_images=_r(usd_per_1000_images(inputs.gpu_hour_usd, images)))
    return out


def _r(v: float | None, digits: int = 6) -> float | None:
    return None if v is None else round(v, digits)


def curves_from_report(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{slug, endpoint, images_per_request, points}]`` from a serve or engine report."""
    gpu = report["environment"].get("gpu")
    measured_on = gpu["name"] if gpu else "CPU"
    curves = []
    if report["kind"] == "serve":
        for s in report["series"]:
            points = [CurvePoint(lv["level"], lv["throughput_rps"] or 0.0, lv["latency"]["p95_ms"], lv["requests"],
                                 lv["errors"]) for lv in s["levels"]]
            curves.append({"slug": s["slug"], "endpoint": f"{s['target']} {s['endpoint']}", "measured_on": measured_on,
                           "images_per_request": s["images_per_request"], "points": points})
    elif report["kind"] == "engine":
        ipr = int(report.get("request", {}).get("samples") or 1)
        for rt in report["runtimes"]:
            if rt["status"] != "ok" or "ours" not in rt["end_to_end"]:
                continue
            ours = rt["end_to_end"]["ours"]
            point = CurvePoint(1, 1000.0 / ours["median_ms"], ours["p90_ms"], ours["n"], 0)
            curves.append({"slug": report["settings"]["slug"], "endpoint": f"engine {rt['runtime']} (in-process)",
                           "measured_on": measured_on, "images_per_request": ipr, "points": [point]})
    else:
        raise ValueError(f"a {report['kind']} report has no latency curve")
    return curves


def latest_reports(results_dir: Path | None = None) -> list[Path]:
    """The newest serve report, else the newest engine report per slug and device, in ``results_dir``."""
    found: dict[tuple, tuple[str, Path]] = {}
    serve: tuple[str, Path] | None = None
    for path, r in stored_reports(results_dir):
        if r.get("kind") == "serve" and (serve is None or r["created_utc"] > serve[0]):
            serve = (r["created_utc"], path)
        elif r.get("kind") == "engine":
            key = (r["settings"]["slug"], str(r["environment"].get("gpu")), r["settings"].get("full_size"))
            if key not in found or r["created_utc"] > found[key][0]:
                found[key] = (r["created_utc"], path)
    if serve:
        return [serve[1]]
    return [p for _, p in sorted(found.values())]


def capacity_report(paths: list[Path], inputs: CapacityInputs) -> dict[str, Any]:
    report = new_report("capacity", environment(None))
    report["settings"] = {"slo_p95_ms": inputs.slo_p95_ms, "target_rps": inputs.target_rps,
                          "gpu_hour_usd": inputs.gpu_hour_usd, "gpus_per_server": inputs.gpus_per_server,
                          "max_error_rate": inputs.max_error_rate, "sources": [Path(p).name for p in paths]}
    report["plans"], report["curves"] = [], []
    for path in paths:
        for curve in curves_from_report(load_report(Path(path))):
            p = plan(curve["points"], curve["images_per_request"], inputs)
            report["plans"].append({"slug": curve["slug"], "endpoint": curve["endpoint"],
                                    "measured_on": curve["measured_on"], "source": Path(path).name, **p})
            report["curves"].append({"slug": curve["slug"], "endpoint": curve["endpoint"], "points": [
                {"level": pt.level, "p95_ms": pt.p95_ms, "rps": pt.throughput_rps,
                 "usd_per_1000_images": usd_per_1000_images(
                     inputs.gpu_hour_usd, pt.throughput_rps / inputs.gpus_per_server * curve["images_per_request"])}
                for pt in curve["points"] if pt.throughput_rps and pt.p95_ms is not None]})
    return report
