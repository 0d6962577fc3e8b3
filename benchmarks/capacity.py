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
markdown (``diffserve.benchmarks.report``) restates these formulas for its readers.

Queueing model (``--arrival-rate``, below): a measured curve answers only for the loads that
were measured. The M/G/c model predicts p95 latency for any arrival rate and number of GPUs
from one measured service-time distribution; an open-loop (Poisson) run of ``bench serve
--predict`` puts its prediction beside the measured p95.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffserve.benchmarks.environment import environment
from diffserve.benchmarks.record import load_report, new_report, stored_reports


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


def capacity_report(paths: list[Path], inputs: CapacityInputs | None,
                    queueing: QueueingInputs | None = None) -> dict[str, Any]:
    """Plans from measured curves (``inputs``) and/or queueing-model predictions (``queueing``)."""
    if inputs is None and queueing is None:
        raise ValueError("nothing to plan: give the plan's inputs or the queueing model's")
    report = new_report("capacity", environment(None))
    report["settings"] = {"slo_p95_ms": inputs.slo_p95_ms if inputs else None,
                          "target_rps": inputs.target_rps if inputs else None,
                          "gpu_hour_usd": inputs.gpu_hour_usd if inputs else None,
                          "gpus_per_server": inputs.gpus_per_server if inputs else None,
                          "max_error_rate": inputs.max_error_rate if inputs else None,
                          "sources": [Path(p).name for p in paths]}
    report["plans"], report["curves"] = [], []
    if queueing is not None:
        report["settings"]["queueing"] = {"arrival_rates": list(queueing.arrival_rates), "gpus": list(queueing.gpus),
                                          "slo_p95_ms": queueing.slo_p95_ms, "customers": queueing.customers,
                                          "seed": queueing.seed}
        report["queueing"] = []
        for path in paths:
            for row in queueing_predictions(load_report(Path(path)), queueing):
                report["queueing"].append({**row, "source": Path(path).name})
    if inputs is None:
        return report
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


# -- queueing model: p95 latency for an arrival rate and a number of GPUs ---------------------------------
#
# A GPU is one server that runs one request at a time (the API's DIFFSERVE_MAX_CONCURRENT_JOBS=1,
# one worker per Triton): requests arrive as a Poisson process at rate lambda and wait in one
# shared FCFS queue (the Redis stream every worker reads) for the first of c servers to free up.
# Service times are the measured latencies of requests that met no queue (a closed-loop level at
# concurrency 1, or the calibration requests of an open-loop run), drawn with replacement.
#
# The p95 comes from a discrete-event simulation of that M/G/c queue rather than from Erlang C
# with the Allen-Cunneen correction: Allen-Cunneen approximates only the MEAN wait, and turning it
# into a p95 needs a guess at the wait's distribution (exponential tail) and at how it adds to a
# service-time distribution that is far from exponential (diffusion requests are nearly
# deterministic with a few slow outliers). The simulation uses the measured distribution as it
# is, so the tail of (wait + service) is read off directly; Erlang C / Allen-Cunneen is kept as a
# cross-check of the simulated mean wait (exact for M/M/c, and for M/G/1 it is Pollaczek-Khinchine).

@dataclass(frozen=True)
class QueueingInputs:
    arrival_rates: tuple[float, ...]
    """Requests/s to predict for."""
    gpus: tuple[int, ...] = ()
    """Numbers of GPUs (servers) to predict for; empty: the fewest that meet ``slo_p95_ms``."""
    slo_p95_ms: float | None = None
    max_gpus: int = 1024
    customers: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.arrival_rates or any(r <= 0 for r in self.arrival_rates):
            raise ValueError("arrival rates must be positive")
        if any(g < 1 for g in self.gpus):
            raise ValueError("numbers of GPUs must be >= 1")
        if not self.gpus and self.slo_p95_ms is None:
            raise ValueError("give the numbers of GPUs (--gpus) or a p95 objective to size for (--slo-p95-ms)")
        if self.slo_p95_ms is not None and self.slo_p95_ms <= 0:
            raise ValueError("the p95 objective must be positive")
        if self.customers < 1000:
            raise ValueError("simulate at least 1000 requests")


def simulate_queue(service_s, arrival_rate: float, servers: int, customers: int = 100_000,
                   warmup_fraction: float = 0.1, seed: int = 0) -> dict[str, float] | None:
    """Latency statistics (s) of an FCFS M/G/c queue whose service times are drawn from ``service_s``.

    None when the queue is unstable (utilisation >= 1: the backlog grows without bound, so there
    is no steady-state p95). The first ``warmup_fraction`` of requests, which found an emptier
    system than the steady state, are left out of the statistics.
    """
    import heapq

    import numpy as np

    samples = np.asarray(service_s, dtype=float)
    if samples.size == 0 or servers < 1 or arrival_rate <= 0:
        raise ValueError("need service-time samples, servers >= 1 and a positive arrival rate")
    if arrival_rate * samples.mean() / servers >= 1.0:
        return None
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / arrival_rate, customers))
    service = rng.choice(samples, size=customers, replace=True)
    free_at = [0.0] * servers  # a heap of the times each server next frees up
    wait = np.empty(customers)
    for i in range(customers):
        start = max(arrivals[i], free_at[0])
        wait[i] = start - arrivals[i]
        heapq.heapreplace(free_at, start + service[i])
    skip = int(customers * warmup_fraction)
    w, total = wait[skip:], wait[skip:] + service[skip:]
    return {"p50": float(np.percentile(total, 50)), "p95": float(np.percentile(total, 95)),
            "p99": float(np.percentile(total, 99)), "mean": float(total.mean()), "mean_wait": float(w.mean()),
            "p_wait": float((w > 0).mean())}


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (Erlang C), offered load a = lambda / mu < c."""
    if offered_load >= servers:
        return 1.0
    term, total = 1.0, 1.0  # a^k / k!, summed for k = 0 .. c-1 (iteratively: no factorial overflow)
    for k in range(1, servers):
        term *= offered_load / k
        total += term
    last = term * offered_load / servers / (1 - offered_load / servers)  # a^c / c! / (1 - rho)
    return last / (total + last)


def allen_cunneen_wait_s(service_s, arrival_rate: float, servers: int) -> float | None:
    """Mean wait of M/G/c by Allen-Cunneen: W_q(M/M/c) * (c_a^2 + c_s^2) / 2, c_a^2 = 1 for Poisson."""
    import numpy as np

    s = np.asarray(service_s, dtype=float)
    mean = float(s.mean())
    a = arrival_rate * mean
    if a >= servers:
        return None
    cs2 = float(s.var()) / mean ** 2
    wq_mmc = erlang_c(servers, a) * mean / (servers - a)  # C / (c mu - lambda)
    return wq_mmc * (1.0 + cs2) / 2.0


def predict_latency(service_ms, arrival_rate: float, gpus: int, customers: int = 100_000,
                    seed: int = 0) -> dict[str, Any]:
    """Predicted latency (ms) at ``arrival_rate`` requests/s on ``gpus`` servers; see above."""
    service_s = [v / 1000.0 for v in service_ms]
    mean_s = sum(service_s) / len(service_s)
    out: dict[str, Any] = {"arrival_rate": arrival_rate, "gpus": gpus,
                           "utilisation": _r(arrival_rate * mean_s / gpus, 4),
                           "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_wait_ms": None,
                           "mean_wait_ms_allen_cunneen": None, "p_wait": None, "reason": None}
    sim = simulate_queue(service_s, arrival_rate, gpus, customers=customers, seed=seed)
    if sim is None:
        out["reason"] = (f"unstable: utilisation {arrival_rate * mean_s / gpus:.2f} >= 1 "
                         f"(each GPU serves at most {1 / mean_s:.3f} requests/s)")
        return out
    ac = allen_cunneen_wait_s(service_s, arrival_rate, gpus)
    out.update(p50_ms=_r(sim["p50"] * 1000, 3), p95_ms=_r(sim["p95"] * 1000, 3), p99_ms=_r(sim["p99"] * 1000, 3),
               mean_wait_ms=_r(sim["mean_wait"] * 1000, 3), p_wait=_r(sim["p_wait"], 4),
               mean_wait_ms_allen_cunneen=_r(ac * 1000 if ac is not None else None, 3))
    return out


def fewest_gpus(service_ms, arrival_rate: float, slo_p95_ms: float, max_gpus: int = 1024,
                customers: int = 100_000, seed: int = 0) -> dict[str, Any]:
    """The fewest GPUs whose predicted p95 at ``arrival_rate`` meets ``slo_p95_ms``, with its prediction."""
    mean_s = sum(service_ms) / len(service_ms) / 1000.0
    gpus = max(1, math.floor(arrival_rate * mean_s) + 1)  # the fewest for which the queue is stable
    while gpus <= max_gpus:
        p = predict_latency(service_ms, arrival_rate, gpus, customers, seed)
        if p["p95_ms"] is not None and p["p95_ms"] <= slo_p95_ms:
            return p
        if p["p_wait"] is not None and p["p_wait"] < 1e-3:
            break  # nobody waits: p95 is the service time's own, more GPUs cannot lower it
        gpus += 1
    out = predict_latency(service_ms, arrival_rate, min(gpus, max_gpus), customers, seed)
    out["reason"] = (f"infeasible: the service time's own p95 exceeds {slo_p95_ms:g} ms"
                     if gpus <= max_gpus else f"infeasible with up to {max_gpus} GPUs")
    return out


def service_distributions(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{slug, endpoint, samples_ms, source}]``: per series of a serve report, the latencies of
    requests that met no queue (the open-loop calibration, else a closed-loop level at concurrency 1)."""
    if report.get("kind") != "serve":
        raise ValueError(f"a {report.get('kind')} report has no service-time samples: use a serve report")
    out = []
    closed = report["settings"].get("loop", "closed") == "closed"
    for s in report["series"]:
        service = s.get("service")
        if service and service.get("samples_ms"):
            samples, source = service["samples_ms"], "calibration at concurrency 1"
        else:
            lv = next((lv for lv in s["levels"] if closed and lv["level"] == 1 and lv.get("samples_ms")), None)
            if lv is None:
                continue
            samples, source = lv["samples_ms"], "closed-loop level 1"
        out.append({"slug": s["slug"], "endpoint": f"{s['target']} {s['endpoint']}", "samples_ms": samples,
                    "source": source})
    return out


def queueing_predictions(report: dict[str, Any], inputs: QueueingInputs) -> list[dict[str, Any]]:
    """Predicted latency per series, arrival rate and number of GPUs (or the fewest GPUs for the SLO)."""
    rows = []
    for dist in service_distributions(report):
        samples = dist["samples_ms"]
        base = {"slug": dist["slug"], "endpoint": dist["endpoint"], "service_source": dist["source"],
                "service_n": len(samples), "service_mean_ms": _r(sum(samples) / len(samples), 3)}
        for rate in inputs.arrival_rates:
            if inputs.gpus:
                for g in inputs.gpus:
                    rows.append({**base, **predict_latency(samples, rate, g, inputs.customers, inputs.seed)})
            else:
                rows.append({**base, **fewest_gpus(samples, rate, inputs.slo_p95_ms, inputs.max_gpus,
                                                   inputs.customers, inputs.seed)})
    return rows
