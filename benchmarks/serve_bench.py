"""Serving benchmark: a load generator against ``diffserve serve`` and Triton's pipeline models.

Targets:

* **the HTTP API** (``--url`` of a running server, or ``--start-server demo`` to start
  ``diffserve serve --demo`` on a free loopback port): the sync endpoint ``POST /v1/{slug}``
  (the image comes back in the response) and the async one ``POST /v2/{slug}``, polled at
  ``status_url`` until COMPLETED, then ``response_url`` and the output image are fetched; a
  request's latency runs until its image bytes have arrived;
* **Triton's pipeline models directly** (``--triton``: gRPC streaming through
  ``diffserve.triton_serving.client.TritonPipelineClient``, the client the API's Triton backend uses; a
  Triton server started here serves ``diffserve.export.repository``'s demo repository of the swept
  slugs), once per pipeline mode — ``bls`` (components are separate Triton
  models) and ``fused`` (components in-process in the pipeline model) — to compare the modes;
  with ``fused_variants`` the fused model runs once per variant, reloaded with step batching on
  or off and an instance count (``batched``, ``unbatched``, ``unbatched-x2``: the Triton server
  then runs in explicit model-control mode), to measure what step-level batching gives.

Load is closed-loop (``concurrency`` clients sending back to back, swept 1, 2, 4, 8, ...) or
open-loop (Poisson arrivals at each offered rate; a request's latency counts from its
scheduled arrival, so a server that falls behind is not hidden). One untimed request warms
each series first (model loading is not a latency sample). With ``predict`` (open loop), a
series first times requests back to back (its service-time distribution) and reports, per
offered rate, the p95 that ``diffserve.benchmarks.capacity``'s M/G/c model predicts beside the measured one.

Per level: p50/p95/p99 latency, requests and images per second, errors by kind, and the split
of each request from the API's own metrics (``GET /v2/requests/{id}`` ``metrics``):
``compute`` (the backend's generation time, ``inference_time``), ``api_queue`` (waiting for
a job slot), ``backend_queue`` (inside the backend before compute; with Triton, the gRPC round
trip minus the model's own time) and ``api`` (the rest: HTTP, validation, image encoding,
polling). With a Triton URL, Triton's statistics (queue and compute of the pipeline model,
diffed around each level) are reported beside them.

**Serving overhead** = served p50 at the lowest level − the in-process engine median for the
same request (timed here on the demo server's checkpoint, or read from an engine report), in
ms and per denoising step.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import numpy as np

import diffserve
from diffserve.benchmarks import floors
from diffserve.engine.processes import ChildNotReady, ChildProcess

logger = logging.getLogger(__name__)

REPO_ROOT = diffserve.IMPORT_ROOT  # the checkout (where PYTHONPATH finds diffserve), or site-packages
ENDPOINTS = ("sync", "async")
_READY_RE = re.compile(r"diffserve API ready at (\S+)")
_VARIANT_RE = re.compile(r"(batched|unbatched)(-x([1-9][0-9]*))?")


@dataclass
class ServeBenchConfig:
    slugs: tuple[str, ...] = ("sd1.5-scifi",)
    url: str | None = None
    """Base URL of a running ``diffserve serve``."""
    start_server: bool = False
    """Start ``diffserve serve`` for the run: local backend on the demo checkpoints (or
    ``server_checkpoints``), or Triton backend on the Triton this run uses."""
    server_backend: str = "local"
    server_checkpoints: dict[str, Path] = field(default_factory=dict)
    """``{slug: checkpoint dir}`` for a started local-backend server instead of the demo checkpoints."""
    endpoints: tuple[str, ...] = ENDPOINTS
    loop: str = "closed"
    levels: tuple[float, ...] = (1, 2, 4, 8)
    """Concurrency (closed loop) or offered requests/s (open loop)."""
    requests_per_level: int = 16
    """At least this many requests per level (closed loop: at least the concurrency)."""
    min_duration_s: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    poll_interval_s: float = 0.05
    timeout_s: float = 600.0
    triton: bool = False
    """Also drive Triton's pipeline models directly, once per mode."""
    triton_url: str | None = None
    triton_repository: Path | None = None
    modes: tuple[str, ...] = ("bls", "fused")
    triton_runtime: str = "onnxruntime"
    """Runtime of the demo repository's component models and fused pipelines: onnxruntime or torch."""
    triton_pipeline_instances: int = 2
    """Instances of each pipeline model in the demo repository (requests beyond them queue in Triton)."""
    fused_variants: tuple[str, ...] = ()
    """Series of the fused mode, each on the fused model reloaded as ``batched`` or ``unbatched`` (step-level
    batching on or off), ``-xN`` for N instances (e.g. ``unbatched-x2``: two copies of the weights); empty:
    the fused model as the repository built it."""
    engine_baseline: str = "auto"
    """``auto`` (time in-process on the demo checkpoint when this run started the server), ``none``,
    or the path of an engine report."""
    engine_repeats: int = 3
    device: str | None = None
    precision: str | None = None
    work_dir: Path = Path("var/bench")
    seed: int = 0
    warmup_requests: int = 1
    threads: int | None = None
    """CPU threads for torch/ORT in this process, the started server and Triton (None: their default)."""
    predict: bool = False
    """Open loop: first time ``service_requests`` requests back to back (the service-time
    distribution), then put the queueing model's p95 for each offered rate beside the measured one."""
    service_requests: int = 16
    servers: int = 1
    """Servers the queueing model assumes: workers (GPUs) x jobs each runs at once
    (DIFFSERVE_MAX_CONCURRENT_JOBS; its default is the backend's batch capacity)."""

    def __post_init__(self) -> None:
        from diffserve.engine.catalog import get_model

        if not (self.url or self.start_server or self.triton):
            raise ValueError("nothing to load: give --url, --start-server, or --triton")
        if self.server_backend not in ("local", "triton"):
            raise ValueError(f"server backend must be local or triton, got {self.server_backend!r}")
        if self.loop not in ("closed", "open"):
            raise ValueError(f"loop must be closed or open, got {self.loop!r}")
        bad = [e for e in self.endpoints if e not in ENDPOINTS]
        if bad:
            raise ValueError(f"unknown endpoint(s) {', '.join(bad)}; choose from {', '.join(ENDPOINTS)}")
        if not self.levels or any(lv <= 0 for lv in self.levels):
            raise ValueError("levels must be positive")
        if self.loop == "closed" and any(float(lv) != int(lv) for lv in self.levels):
            raise ValueError("closed-loop levels are concurrencies (integers)")
        for slug in self.slugs:
            get_model(slug)  # an unknown slug fails here
        if self.requests_per_level < 1:
            raise ValueError("requests_per_level must be >= 1")
        if self.predict and self.loop != "open":
            raise ValueError("the queueing model's prediction is checked against an open-loop run (--loop open)")
        if self.service_requests < 2 or self.servers < 1:
            raise ValueError("service_requests must be >= 2 and servers >= 1")
        bad = [v for v in self.fused_variants if not _VARIANT_RE.fullmatch(v)]
        if bad:
            raise ValueError(f"fused variants look like batched, unbatched or unbatched-x2; got {', '.join(bad)}")


@dataclass
class Record:
    """One request as the client saw it."""

    ok: bool
    status: str
    """HTTP status code, FAILED, or the client error's class name."""
    latency_s: float
    start_s: float
    request_id: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The server's view: inference_time, queue_time, backend_queue_time, encode_time, ..."""


# -- requests ------------------------------------------------------------------------------------

def http_payload(slug: str, params: dict[str, Any], image_bytes: bytes) -> dict[str, Any]:
    """The JSON body for the API: the validated request with its images as data URIs."""
    from diffserve.engine.catalog import get_model

    spec = get_model(slug)
    body = {k: v for k, v in params.items() if v is not None}
    uri = "data:image/jpeg;base64," + base64.b64encode(image_bytes).decode("ascii")
    for name in spec.image_params:
        if body.get(name) == "<demo image>":
            body[name] = uri
    if "base64" in spec.param_names:
        body["base64"] = False
    return body


def _headers(cfg: ServeBenchConfig) -> dict[str, str]:
    return {"x-api-key": cfg.api_key} if cfg.api_key else {}


async def send_sync(client, base: str, slug: str, body: dict, headers: dict, scheduled: float, t_zero: float) -> Record:
    import httpx

    try:
        r = await client.post(f"{base}/v1/{slug}", json=body, headers=headers)
        await r.aread()
    except httpx.HTTPError as exc:
        return Record(False, type(exc).__name__, time.perf_counter() - scheduled, scheduled - t_zero, error=str(exc)[:200])
    latency = time.perf_counter() - scheduled
    rec = Record(r.status_code == 200, str(r.status_code), latency, scheduled - t_zero, r.headers.get("x-request-id"))
    if rec.ok:
        rec.metrics = {"inference_time": float(r.headers.get("x-inference-time", "nan")),
                       "queue_time": float(r.headers.get("x-queue-time", "nan"))}
    else:
        rec.error = r.text[:200]
    return rec


async def send_async(client, base: str, slug: str, body: dict, headers: dict, scheduled: float, t_zero: float,
                     poll_s: float) -> Record:
    import httpx

    try:
        r = await client.post(f"{base}/v2/{slug}", json=body, headers=headers)
        if r.status_code != 200:
            return Record(False, str(r.status_code), time.perf_counter() - scheduled, scheduled - t_zero,
                          error=r.text[:200])
        submitted = r.json()
        while True:
            s = await client.get(submitted["status_url"], headers=headers)
            state = s.json().get("status") if s.headers.get("content-type", "").startswith("application/json") else None
            if state in ("COMPLETED", "FAILED") or s.status_code not in (200, 422):
                break
            await asyncio.sleep(poll_s)
        if state != "COMPLETED":
            return Record(False, state or str(s.status_code), time.perf_counter() - scheduled, scheduled - t_zero,
                          submitted["request_id"], error=s.text[:200])
        result = await client.get(submitted["response_url"], headers=headers)
        body_json = result.json()
        for url in body_json.get("output") or []:
            if isinstance(url, str) and url.startswith("http"):
                image = await client.get(url)
                image.raise_for_status()
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Record(False, type(exc).__name__, time.perf_counter() - scheduled, scheduled - t_zero, error=str(exc)[:200])
    rec = Record(True, "200", time.perf_counter() - scheduled, scheduled - t_zero, submitted["request_id"])
    rec.metrics = {k: float(v) for k, v in (body_json.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return rec


async def fetch_metrics(client, base: str, records: list[Record], headers: dict) -> None:
    """Fill each sync record's server metrics from ``GET /v2/requests/{id}`` (outside the timed path)."""
    async def one(rec: Record) -> None:
        try:
            r = await client.get(f"{base}/v2/requests/{rec.request_id}", headers=headers)
            if r.status_code == 200:
                rec.metrics.update({k: float(v) for k, v in (r.json().get("metrics") or {}).items()
                                    if isinstance(v, (int, float))})
        except Exception as exc:  # noqa: BLE001 - metrics are best effort; the latency sample stands
            logger.debug("metrics of %s: %s", rec.request_id, exc)

    await asyncio.gather(*(one(r) for r in records if r.ok and r.request_id))


# -- load shapes -----------------------------------------------------------------------------------

async def closed_loop(send: Callable[[float, float], Awaitable[Record]], concurrency: int, n_requests: int,
                      min_duration_s: float, progress=None) -> tuple[list[Record], float]:
    """``concurrency`` clients, each sending its next request when the previous one is answered."""
    records: list[Record] = []
    counter = itertools.count()
    t_zero = time.perf_counter()

    async def client() -> None:
        while True:
            i = next(counter)
            if i >= n_requests and time.perf_counter() - t_zero >= min_duration_s:
                return
            records.append(await send(time.perf_counter(), t_zero))
            if progress is not None:
                progress.update(1)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - t_zero


async def open_loop(send: Callable[[float, float], Awaitable[Record]], rate: float, n_requests: int,
                    min_duration_s: float, rng: random.Random, progress=None) -> tuple[list[Record], float]:
    """Poisson arrivals at ``rate``/s; each request's clock starts at its scheduled arrival."""
    t_zero = time.perf_counter()
    tasks = []
    arrival = t_zero
    i = 0
    while i < n_requests or arrival - t_zero < min_duration_s:
        arrival += rng.expovariate(rate)
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

        async def one(scheduled: float = arrival) -> Record:
            rec = await send(scheduled, t_zero)
            if progress is not None:
                progress.update(1)
            return rec

        tasks.append(asyncio.create_task(one()))
        i += 1
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - t_zero


# -- summaries -------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 3) if values else None


def request_split(rec: Record) -> dict[str, float] | None:
    """(api, api_queue, backend_queue, compute, image_encode) in ms, from the server's metrics."""
    m = rec.metrics
    compute = m.get("inference_time")
    if compute is None or compute != compute:  # missing or NaN
        return None
    api_queue = m.get("queue_time", 0.0)
    backend_queue = m.get("backend_queue_time", 0.0)
    api = max(0.0, rec.latency_s - api_queue - backend_queue - compute)
    return {"api": api * 1000, "api_queue": api_queue * 1000, "backend_queue": backend_queue * 1000,
            "compute": compute * 1000, "image_encode": m.get("encode_time", 0.0) * 1000}


def summarize_level(level: float, records: list[Record], elapsed_s: float, images_per_request: int,
                    triton: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    lat = [r.latency_s * 1000 for r in ok]
    splits = [s for s in (request_split(r) for r in ok) if s is not None]
    out = {
        "level": level, "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "error_kinds": dict(collections.Counter(r.status for r in records if not r.ok)),
        "error_examples": sorted({r.error for r in records if not r.ok and r.error})[:3],
        "elapsed_s": round(elapsed_s, 3),
        "throughput_rps": round(len(ok) / elapsed_s, 4) if elapsed_s > 0 else None,
        "images_per_s": round(len(ok) * images_per_request / elapsed_s, 4) if elapsed_s > 0 else None,
        "latency": {"p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
                    "mean_ms": round(float(np.mean(lat)), 3) if lat else None,
                    "min_ms": round(min(lat), 3) if lat else None, "max_ms": round(max(lat), 3) if lat else None},
        "split_ms_median": ({k: round(float(np.median([s[k] for s in splits])), 3) for k in splits[0]}
                            if splits else None),
        "split_ms_mean": ({k: round(float(np.mean([s[k] for s in splits])), 3) for k in splits[0]}
                          if splits else None),
        # Everything but the backend's compute, per request: the serving layers' own cost as the
        # server measured it (no cross-process timing noise).
        "non_compute_ms_median": (round(float(np.median([s["api"] + s["api_queue"] + s["backend_queue"]
                                                         for s in splits])), 3) if splits else None),
        "samples_ms": [round(v, 3) for v in lat],
        "triton": triton,
    }
    batch = [r.metrics["batch_requests"] for r in ok if r.metrics.get("batch_requests")]
    if batch:
        # Step batching (fused model's INFO): requests in the largest UNet call each request took part in.
        out["batch_requests_mean"] = round(float(np.mean(batch)), 3)
    return out


# -- Triton --------------------------------------------------------------------------------------------

def _stat_ns(stats: dict[str, Any], key: str) -> tuple[int, int]:
    entry = (stats.get("inference_stats") or {}).get(key) or {}
    return int(entry.get("count", 0)), int(entry.get("ns", 0))


class TritonStats:
    """Triton's per-model statistics, diffed around a level (queue and compute per request)."""

    def __init__(self, grpc_url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(grpc_url)

    def close(self) -> None:
        self.client.close()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        data = self.client.get_inference_statistics(as_json=True)
        return {m["name"]: m for m in data.get("model_stats", [])}

    @staticmethod
    def diff(before: dict[str, Any], after: dict[str, Any], model: str) -> dict[str, Any] | None:
        def one(name: str) -> dict[str, Any] | None:
            a, b = after.get(name), before.get(name, {})
            if a is None:
                return None
            n_a, q_a = _stat_ns(a, "queue")
            n_b, q_b = _stat_ns(b, "queue") if b else (0, 0)
            count = n_a - n_b
            if count <= 0:
                return {"count": 0}
            compute = sum(_stat_ns(a, k)[1] - (_stat_ns(b, k)[1] if b else 0)
                          for k in ("compute_input", "compute_infer", "compute_output"))
            return {"count": count, "queue_ms_per_request": round((q_a - q_b) / count / 1e6, 3),
                    "compute_ms_per_request": round(compute / count / 1e6, 3),
                    "executions": int(a.get("execution_count", 0)) - int(b.get("execution_count", 0) if b else 0)}

        main = one(model)
        if main is None:
            return None
        others = {name: d for name in after if name != model and (d := one(name)) and d.get("count")}
        return {"model": model, **main, "other_models": others}


def _count(snapshot: dict[str, Any], model: str) -> int:
    return _stat_ns(snapshot[model], "success")[0] if model in snapshot else 0


async def _settled_snapshot(stats: TritonStats, model: str, expected: int, wait_s: float = 30.0) -> dict[str, Any]:
    """A statistics snapshot in which ``model`` has counted at least ``expected`` successful requests."""
    deadline = time.perf_counter() + wait_s
    while True:
        snap = await asyncio.to_thread(stats.snapshot)
        if _count(snap, model) >= expected or time.perf_counter() > deadline:
            return snap
        await asyncio.sleep(0.05)


def discover_pipelines(grpc_url: str, slugs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``{model name: {slug, mode, default}}`` of the pipeline models Triton serves for ``slugs``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    out = {}
    for entry in client.get_model_repository_index(as_json=True).get("models", []):
        name = entry["name"]
        if entry.get("state", "READY") != "READY":
            continue
        params = client.get_model_config(name, as_json=True)["config"].get("parameters", {})
        slug = (params.get("slug") or {}).get("string_value")
        mode = (params.get("mode") or {}).get("string_value")
        if slug in slugs and mode:
            out[name] = {"slug": slug, "mode": mode, "default": name == slug}
    return out


def demo_repository(slugs: tuple[str, ...], work_dir: Path, modes: tuple[str, ...],
                    runtime: str = "onnxruntime", pipeline_instances: int = 2, ort_threads: int = 0) -> Path:
    """The tiny demo checkpoints of ``slugs`` in a model repository of their own under ``work_dir``
    (one per slugs, modes and runtime, so sweeps do not rebuild each other's; cached; torch needs no export)."""
    from diffserve.export.repository import build_demo_repository

    repo = Path(work_dir) / ("triton-repository-" + "+".join(sorted(slugs)) + "-" + "+".join(modes) + f"-{runtime}")
    return build_demo_repository(repo, slugs, modes=modes, runtime=runtime, pipeline_instances=pipeline_instances,
                                 fused_runtime="torch" if runtime == "torch" else "onnxruntime",
                                 ort_threads=ort_threads).repository


# -- the API server ----------------------------------------------------------------------------------

@contextlib.contextmanager
def started_api_server(cfg: ServeBenchConfig, triton_url: str | None = None,
                       repository: Path | None = None) -> Iterator[str]:
    """``diffserve serve`` on a free loopback port, in a child process; yields its URL.

    Local backend: ``--demo`` (the tiny demo checkpoints). Triton backend: the API is pointed at
    the Triton server this benchmark runs (``--triton-url``, ``--repository``), so Triton's
    statistics cover the API's requests too.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="api-", dir=_ensure(Path(cfg.work_dir))))
    cmd = [sys.executable, "-m", "diffserve.api.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--backend", cfg.server_backend, "--data-dir", str(data_dir)]
    if cfg.server_backend == "triton":
        cmd += ["--triton-url", str(triton_url), "--repository", str(repository)]
    elif cfg.server_checkpoints:
        cmd += [arg for slug, path in cfg.server_checkpoints.items() for arg in ("--checkpoint", f"{slug}={path}")]
    else:
        cmd += ["--demo"]
    if cfg.device:
        cmd += ["--device", cfg.device]
    if cfg.precision:
        cmd += ["--precision", cfg.precision]
    env = dict(os.environ, **_thread_env(cfg.threads))
    proc = ChildProcess(cmd, name="diffserve serve", cwd=REPO_ROOT, env=env).start()
    try:
        try:
            line = proc.wait_ready(_READY_RE, 300) or ""
        except ChildNotReady:
            raise RuntimeError(f"`diffserve serve` did not start ({' '.join(cmd[2:])}); its output:\n"
                               + "\n".join(proc.tail(40))) from None
        url = line.split("ready at ", 1)[1].split()[0]
        logger.info("started %s at %s (pid %d)", " ".join(cmd[3:]), url, proc.pid)
        yield url
    finally:
        proc.stop(60)  # uvicorn shuts down gracefully on SIGTERM
        shutil.rmtree(data_dir, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _thread_env(threads: int | None) -> dict[str, str]:
    if not threads:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # ORT's: the repository's options


# -- sweeps ----------------------------------------------------------------------------------------------

def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=None, leave=False)


async def run_levels(cfg: ServeBenchConfig, series: dict[str, Any], send: Callable[[float, float], Awaitable[Record]],
                     after_level: Callable[[list[Record]], Awaitable[None]] | None = None,
                     stats: TritonStats | None = None, stats_model: str | None = None) -> dict[str, Any]:
    """Warm up, then run every level of the sweep; fills ``series["levels"]``."""
    stats = stats if stats_model is not None else None
    start_count = _count(await asyncio.to_thread(stats.snapshot), stats_model) if stats else 0
    sent_ok = 0  # successful requests this series sent to ``stats_model`` so far
    for _ in range(cfg.warmup_requests):
        rec = await send(time.perf_counter(), time.perf_counter())
        sent_ok += rec.ok
        if not rec.ok:
            series.setdefault("warmup_errors", []).append(f"{rec.status}: {rec.error}")
    if cfg.predict:
        # Requests that meet no queue: the service-time distribution the queueing model draws from.
        desc = f"{series['slug']} {series['target']} {series['endpoint']} service times"
        with _progress(cfg.service_requests, desc) as bar:
            records, elapsed = await closed_loop(send, 1, cfg.service_requests, 0.0, bar)
        sent_ok += sum(r.ok for r in records)
        series["service"] = summarize_level(1, records, elapsed, series["images_per_request"])
    rng = random.Random(cfg.seed)
    for level in cfg.levels:
        n = max(cfg.requests_per_level, int(level)) if cfg.loop == "closed" else cfg.requests_per_level
        # Triton counts a decoupled model's request after its final response has gone out: wait
        # until everything sent so far is counted, so no earlier request lands in this level.
        before = await _settled_snapshot(stats, stats_model, start_count + sent_ok) if stats else None
        desc = f"{series['slug']} {series['target']} {series['endpoint']} @{level:g}"
        with _progress(n, desc) as bar:
            if cfg.loop == "closed":
                records, elapsed = await closed_loop(send, int(level), n, cfg.min_duration_s, bar)
            else:
                records, elapsed = await open_loop(send, float(level), n, cfg.min_duration_s, rng, bar)
        ok = sum(r.ok for r in records)
        sent_ok += ok
        if after_level is not None:
            await after_level(records)
        triton = None
        if stats is not None:
            after = await _settled_snapshot(stats, stats_model, start_count + sent_ok)
            triton = TritonStats.diff(before, after, stats_model)
        summary = summarize_level(level, records, elapsed, series["images_per_request"], triton)
        series["levels"].append(summary)
        logger.info("%s: %d/%d ok, p50 %s ms, p95 %s ms, %.3f req/s", desc, summary["ok"], summary["requests"],
                    summary["latency"]["p50_ms"], summary["latency"]["p95_ms"], summary["throughput_rps"] or 0)
    if cfg.predict:
        series["queueing"] = predicted_vs_measured(series, cfg.servers)
    return series


def predicted_vs_measured(series: dict[str, Any], servers: int) -> list[dict[str, Any]]:
    """Per offered rate of an open-loop series: the queueing model's latency from the series'
    service-time samples beside the measured latency."""
    from diffserve.benchmarks.capacity import predict_latency

    samples = (series.get("service") or {}).get("samples_ms") or []
    rows = []
    for lv in series["levels"]:
        row = {"arrival_rate": lv["level"], "servers": servers, "measured_p50_ms": lv["latency"]["p50_ms"],
               "measured_p95_ms": lv["latency"]["p95_ms"], "measured_ok": lv["ok"], "measured_errors": lv["errors"]}
        if len(samples) < 2:
            row.update(predicted_p50_ms=None, predicted_p95_ms=None, utilisation=None,
                       reason="fewer than 2 successful service-time samples")
        else:
            p = predict_latency(samples, float(lv["level"]), servers)
            row.update(predicted_p50_ms=p["p50_ms"], predicted_p95_ms=p["p95_ms"], utilisation=p["utilisation"],
                       reason=p["reason"])
        rows.append(row)
    return rows


async def sweep_http(cfg: ServeBenchConfig, base: str, slug: str, endpoint: str, body: dict[str, Any],
                     images_per_request: int, steps: int, stats: TritonStats | None) -> dict[str, Any]:
    import httpx

    headers = _headers(cfg)
    # A comma list of URLs is a scaled-out deployment's API replicas: requests go to them in turn
    # (any replica answers for any job, so metrics are fetched from the first).
    bases = [b.strip().rstrip("/") for b in base.split(",") if b.strip()]
    rotation = itertools.cycle(bases)
    limit = int(max(cfg.levels)) * 3 + 8 if cfg.loop == "closed" else 256
    series = {"slug": slug, "target": "api", "endpoint": endpoint, "model": None,
              "runtime": series_runtime(cfg, "api"), "images_per_request": images_per_request, "steps": steps,
              "levels": []}
    if len(bases) > 1:
        series["replicas"] = len(bases)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, trust_env=False,
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as client:
        if endpoint == "sync":
            async def send(scheduled: float, t_zero: float) -> Record:
                return await send_sync(client, next(rotation), slug, body, headers, scheduled, t_zero)

            async def after(records: list[Record]) -> None:
                await fetch_metrics(client, bases[0], records, headers)
        else:
            async def send(scheduled: float, t_zero: float) -> Record:
                return await send_async(client, next(rotation), slug, body, headers, scheduled, t_zero,
                                        cfg.poll_interval_s)

            after = None
        stats_model = slug if stats is not None else None
        return await run_levels(cfg, series, send, after, stats, stats_model)


async def sweep_triton(cfg: ServeBenchConfig, backend, model: str, mode: str, slug: str, params: dict[str, Any],
                       images_per_request: int, steps: int, stats: TritonStats) -> dict[str, Any]:
    series = {"slug": slug, "target": "triton", "endpoint": mode, "model": model,
              "runtime": series_runtime(cfg, "triton"), "images_per_request": images_per_request, "steps": steps,
              "levels": []}
    counter = itertools.count()

    async def send(scheduled: float, t_zero: float) -> Record:
        try:
            out = await backend.infer(model, dict(params), request_id=f"bench-{next(counter)}")
        except Exception as exc:  # noqa: BLE001 - every failure is an error sample with its kind
            return Record(False, type(exc).__name__, time.perf_counter() - scheduled, scheduled - t_zero,
                          error=str(exc)[:200])
        latency = time.perf_counter() - scheduled
        compute = float(out.info.get("model_seconds", latency))
        rec = Record(True, "OK", latency, scheduled - t_zero)
        rec.metrics = {"inference_time": compute, "backend_queue_time": max(0.0, latency - compute),
                       "queue_time": 0.0, "batch_requests": (out.info.get("batch") or {}).get("requests", 0)}
        return rec

    return await run_levels(cfg, series, send, None, stats, model)


def load_fused_variant(grpc_url: str, model: str, variant: str) -> Callable[[], None]:
    """Reload the fused pipeline ``model`` as ``variant`` (``batched``/``unbatched``, ``-xN``: N instances)
    through Triton's model control; returns what loads its original config back."""
    import json

    import tritonclient.grpc as grpcclient

    match = _VARIANT_RE.fullmatch(variant)
    if match is None:
        raise ValueError(f"unknown fused variant {variant!r}")
    client = grpcclient.InferenceServerClient(grpc_url)
    original = client.get_model_config(model, as_json=True)["config"]
    patched = json.loads(json.dumps(original))
    options = json.loads(patched["parameters"]["options"]["string_value"])
    options["batching"] = match.group(1) == "batched"
    patched["parameters"]["options"]["string_value"] = json.dumps(options, sort_keys=True)
    for group in patched["instance_group"]:
        group["count"] = int(match.group(3) or 1)
    client.load_model(model, config=json.dumps(patched))

    def restore() -> None:
        try:
            client.load_model(model, config=json.dumps(original))
        finally:
            client.close()

    return restore


def variant_rows(series_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per slug and level of the fused variants: images/s against the same variant at the lowest level and
    against ``unbatched`` (one instance) at the same level, p50/p95, requests per batched UNet call."""
    by = {(s["slug"], s["endpoint"].removeprefix("fused-")): s for s in series_list
          if s["target"] == "triton" and s["endpoint"].startswith("fused-")}
    rows = []
    for (slug, variant), series in by.items():
        levels = series["levels"]
        if not levels:
            continue
        first = levels[0]["images_per_s"]
        unbatched = {lv["level"]: lv for lv in (by.get((slug, "unbatched")) or {"levels": []})["levels"]}
        for lv in levels:
            ref = unbatched.get(lv["level"])
            ips = lv["images_per_s"]
            rows.append({"slug": slug, "variant": variant, "level": lv["level"], "images_per_s": ips,
                         "vs_lowest_level": round(ips / first, 3) if ips and first else None,
                         "vs_unbatched": round(ips / ref["images_per_s"], 3) if ips and ref and ref["images_per_s"]
                         else None,
                         "p50_ms": lv["latency"]["p50_ms"], "p95_ms": lv["latency"]["p95_ms"],
                         "batch_requests_mean": lv.get("batch_requests_mean")})
    return rows


# -- engine baseline, overhead, modes --------------------------------------------------------------------

def _served_checkpoints(cfg: ServeBenchConfig) -> dict[str, Path] | None:
    """``{slug: checkpoint}`` every target of this run serves, when known here (for the baseline)."""
    from diffserve.engine.tiny.demo import demo_checkpoints

    triton_here = cfg.triton or (cfg.start_server and cfg.server_backend == "triton")
    if cfg.url or (triton_here and (cfg.triton_url or cfg.triton_repository)):
        return None  # an external server or repository: its checkpoints are unknown here
    if triton_here and cfg.server_checkpoints:
        return None  # Triton serves the demo repository, the local server other checkpoints
    if cfg.server_checkpoints:
        return {slug: Path(p) for slug, p in cfg.server_checkpoints.items()}
    return demo_checkpoints() if (cfg.start_server or cfg.triton) else None


def series_runtime(cfg: ServeBenchConfig, target: str) -> str:
    """The runtime that computes a series' requests (what its in-process baseline must use)."""
    if target == "triton" or (target == "api" and cfg.start_server and cfg.server_backend == "triton"):
        return cfg.triton_runtime if not cfg.triton_repository and not cfg.triton_url else "unknown"
    return "torch"


def engine_baseline(cfg: ServeBenchConfig, slug: str, runtime: str, request: dict[str, Any],
                    checkpoints: dict[str, Path] | None) -> dict[str, Any] | None:
    """The in-process engine's end-to-end median for the same request on ``runtime``."""
    if cfg.engine_baseline == "none":
        return None
    if cfg.engine_baseline != "auto":
        from diffserve.benchmarks.record import load_report

        report = load_report(Path(cfg.engine_baseline))
        if report.get("kind") != "engine" or report["settings"]["slug"] != slug:
            return None
        ok = {rt["runtime"]: rt for rt in report["runtimes"] if rt["status"] == "ok" and "ours" in rt["end_to_end"]}
        rt = ok.get(runtime) or ok.get("torch")
        if rt is None:
            return None
        return {"median_ms": rt["end_to_end"]["ours"]["median_ms"], "p90_ms": rt["end_to_end"]["ours"]["p90_ms"],
                "runtime": rt["runtime"], "steps": rt.get("steps"),
                "source": f"engine report {Path(cfg.engine_baseline).name} ({rt['runtime']})"}
    if not checkpoints or slug not in checkpoints or runtime not in ("torch", "onnxruntime"):
        return None
    from diffserve.benchmarks.engine_bench import EngineBenchConfig, prepare_runtime, stats_ms, time_pipeline
    from diffserve.engine.catalog import get_model
    from diffserve.engine.runtime_torch import DTYPES, resolve_device_dtype

    device, dtype = resolve_device_dtype(cfg.device, cfg.precision, get_model(slug).architecture)
    precision = next(name for name, d in DTYPES.items() if d == dtype)
    bench = EngineBenchConfig(slug=slug, runtimes=(runtime,), device=str(device), precision=precision,
                              work_dir=cfg.work_dir, threads=cfg.threads)
    prepared = prepare_runtime(runtime, bench, checkpoints[slug], None, device, precision)
    walls, _, result = time_pipeline(slug, prepared.components, request, 1, cfg.engine_repeats, prepared.device)
    st = stats_ms(walls)
    return {"median_ms": st["median_ms"], "p90_ms": st["p90_ms"], "steps": result.steps, "runtime": runtime,
            "source": f"in-process {runtime} on {Path(checkpoints[slug]).name} ({device}), {cfg.engine_repeats} runs"}


def overhead_rows(series_list: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Served p50 at the lowest level minus the in-process median of the same request and runtime."""
    rows = []
    for s in series_list:
        base = baselines.get(f"{s['slug']}/{s.get('runtime', 'torch')}")
        if not base or not s["levels"] or s["levels"][0]["latency"]["p50_ms"] is None:
            continue
        served = s["levels"][0]["latency"]["p50_ms"]
        over = served - base["median_ms"]
        steps = s.get("steps") or base.get("steps") or 0
        non_compute = s["levels"][0].get("non_compute_ms_median")
        rows.append({"slug": s["slug"], "target": s["target"], "endpoint": s["endpoint"], "runtime": base["runtime"],
                     "level": s["levels"][0]["level"], "served_p50_ms": served, "engine_median_ms": base["median_ms"],
                     "overhead_ms": round(over, 3), "overhead_ms_per_step": round(over / steps, 3) if steps else None,
                     "non_compute_ms": non_compute,
                     "non_compute_ms_per_step": round(non_compute / steps, 3) if steps and non_compute is not None
                     else None})
    return rows


def mode_rows(series_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    by = {(s["slug"], s["endpoint"]): s for s in series_list if s["target"] == "triton"}
    for (slug, mode), bls in by.items():
        if mode != "bls" or (slug, "fused") not in by:
            continue
        fused = {lv["level"]: lv for lv in by[(slug, "fused")]["levels"]}
        for lv in bls["levels"]:
            other = fused.get(lv["level"])
            if other is None or lv["latency"]["p50_ms"] is None or other["latency"]["p50_ms"] is None:
                continue
            rows.append({"slug": slug, "level": lv["level"], "bls_p50_ms": lv["latency"]["p50_ms"],
                         "fused_p50_ms": other["latency"]["p50_ms"],
                         "fused_over_bls": round(other["latency"]["p50_ms"] / lv["latency"]["p50_ms"], 4),
                         "bls_rps": lv["throughput_rps"], "fused_rps": other["throughput_rps"]})
    return rows


# -- the benchmark ----------------------------------------------------------------------------------------------

async def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    import torch

    from diffserve.benchmarks.engine_bench import demo_image, public_request, reference_request, with_images
    from diffserve.benchmarks.environment import environment
    from diffserve.benchmarks.record import new_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        os.environ.update(_thread_env(cfg.threads))  # inherited by a Triton server started here
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = new_report("serve", environment(device))
    image = demo_image(cfg.work_dir)
    image_path = Path(cfg.work_dir) / "inputs" / "sd-img2img-input.jpeg"
    requests = {slug: reference_request(slug, cfg.params) for slug in cfg.slugs}
    if cfg.start_server:
        target = ("started `diffserve serve` (local backend, "
                  + ("given checkpoints)" if cfg.server_checkpoints else "demo checkpoints)")
                  if cfg.server_backend == "local" else "started `diffserve serve --backend triton` on this run's Triton")
    else:
        target = cfg.url
    report["settings"] = {
        "slugs": list(cfg.slugs), "target": target or "triton only", "backend": cfg.server_backend if cfg.start_server
        else None, "endpoints": list(cfg.endpoints) if target else [], "loop": cfg.loop, "levels": list(cfg.levels),
        "requests_per_level": cfg.requests_per_level, "min_duration_s": cfg.min_duration_s,
        "poll_interval_s": cfg.poll_interval_s, "warmup_requests": cfg.warmup_requests,
        "triton": {"enabled": cfg.triton, "url": cfg.triton_url, "modes": list(cfg.modes),
                   "fused_variants": list(cfg.fused_variants),
                   "repository": str(cfg.triton_repository) if cfg.triton_repository else
                   f"demo ({cfg.triton_runtime}, {cfg.triton_pipeline_instances} instance(s) per pipeline model)"},
        "threads": cfg.threads, "device": device,
        "queueing": ({"service_requests": cfg.service_requests, "servers": cfg.servers} if cfg.predict else None),
    }
    report["requests"] = {slug: public_request(p) for slug, p in requests.items()}
    report["series"] = []
    report["notes"] = []

    # The in-process baselines run first, while nothing else loads the machine: one per runtime
    # that computes a series (the local API backend runs torch; Triton the repository's runtime).
    baselines = {}
    served = _served_checkpoints(cfg) if cfg.engine_baseline == "auto" else None
    runtimes = set()
    if cfg.url or cfg.start_server:
        runtimes.add(series_runtime(cfg, "api"))
    if cfg.triton:
        runtimes.add(series_runtime(cfg, "triton"))
    for slug in cfg.slugs:
        for runtime in sorted(runtimes):
            base = await asyncio.to_thread(engine_baseline, cfg, slug, runtime,
                                           with_images(slug, requests[slug], image), served)
            if base:
                baselines[f"{slug}/{runtime}"] = base
    report["engine_baseline"] = baselines
    if not baselines and cfg.engine_baseline != "none":
        report["notes"].append("no in-process engine baseline (an external server's checkpoint is unknown here): "
                               "pass --engine-baseline with an engine report to get the serving overhead")

    with contextlib.ExitStack() as stack:
        triton_url = repository = None
        triton_ready = None
        if cfg.triton or (cfg.start_server and cfg.server_backend == "triton"):
            triton_url, repository, triton_ready = await _triton_server(cfg, stack, report)
        base_url = cfg.url.rstrip("/") if cfg.url else None
        try:
            if cfg.start_server:
                # The API starts while Triton loads its models (it connects on the first request).
                base_url = await asyncio.to_thread(stack.enter_context,
                                                   started_api_server(cfg, triton_url, repository))
        finally:
            if triton_ready is not None:
                await asyncio.wait({triton_ready})  # never stop a server that is still starting
        if triton_ready is not None:
            triton_ready.result()  # raises TritonLaunchError with Triton's own message
        stats = TritonStats(triton_url) if triton_url else None
        if stats is not None:
            stack.callback(stats.close)
        # Triton's statistics describe the API's requests only when the API runs on that Triton.
        api_on_triton = (cfg.start_server and cfg.server_backend == "triton") or (cfg.url and cfg.triton_url)
        if base_url:
            for slug in cfg.slugs:
                body = http_payload(slug, requests[slug], image_path.read_bytes())
                ipr = int(requests[slug].get("samples") or 1)
                for endpoint in cfg.endpoints:
                    report["series"].append(await sweep_http(cfg, base_url, slug, endpoint, body, ipr,
                                                             floors.steps_run(slug, requests[slug]),
                                                             stats if api_on_triton else None))
        if cfg.triton:
            await _triton_series(cfg, triton_url, report, requests, image)
    report["overhead"] = overhead_rows(report["series"], baselines)
    report["modes"] = mode_rows(report["series"])
    report["fused_variants"] = variant_rows(report["series"])
    if cfg.loop == "closed" and any(s["target"] == "api" for s in report["series"]):
        report["notes"].append("the API runs at most DIFFSERVE_MAX_CONCURRENT_JOBS jobs at once (default: the backend's "
                               "batch capacity, max_batch for a step-batching model, else 1): beyond it, requests "
                               "wait in the API queue (see the split)")
    return report


async def _triton_server(cfg: ServeBenchConfig, stack: contextlib.ExitStack, report: dict[str, Any]
                         ) -> tuple[str, Path | None, asyncio.Future | None]:
    """The Triton gRPC URL (``--triton-url``, or a server started here), its repository, and a
    future that resolves when a server started here is ready (its ports are known at once)."""
    if cfg.triton_url:
        if cfg.start_server and cfg.server_backend == "triton" and cfg.triton_repository is None:
            raise ValueError("an API started on an external Triton needs its --triton-repository (for the manifest)")
        return cfg.triton_url, cfg.triton_repository, None
    from diffserve.triton_serving.server import TritonServer, TritonServerConfig

    repo = cfg.triton_repository or await asyncio.to_thread(demo_repository, cfg.slugs, cfg.work_dir, cfg.modes,
                                                            cfg.triton_runtime, cfg.triton_pipeline_instances,
                                                            cfg.threads or 0)
    # Fused variants reload the fused model with another config: explicit model control.
    control = {"model_control_mode": "explicit", "load_models": ["*"]} if cfg.fused_variants else {}
    server = TritonServer(TritonServerConfig(repository=Path(repo), log_file=Path(cfg.work_dir) / "triton.log",
                                             startup_timeout_s=600, **control))
    # Results are in hand when this runs: python stubs that take long to exit are killed after 10 s.
    stack.callback(server.stop, 10)
    ready = asyncio.ensure_future(asyncio.to_thread(server.start))
    report["settings"]["triton"]["url"] = f"started on {server.grpc_url} from {repo}"
    return server.grpc_url, Path(repo), ready


async def _triton_series(cfg: ServeBenchConfig, url: str, report: dict[str, Any],
                         requests: dict[str, dict[str, Any]], image) -> None:
    from diffserve.triton_serving.client import TritonPipelineClient
    from diffserve.benchmarks.engine_bench import with_images

    pipelines = await asyncio.to_thread(discover_pipelines, url, cfg.slugs)
    backend = TritonPipelineClient(url, pipelines, timeout_s=cfg.timeout_s)
    stats = TritonStats(url)
    try:
        for slug in cfg.slugs:
            params = with_images(slug, requests[slug], image, as_array=True)
            ipr = int(requests[slug].get("samples") or 1)
            for mode in cfg.modes:
                model = next((n for n, p in pipelines.items() if p["slug"] == slug and p["mode"] == mode), None)
                if model is None:
                    report["notes"].append(f"Triton serves no {mode} pipeline model for {slug}")
                    continue
                steps = floors.steps_run(slug, requests[slug])
                if mode != "fused" or not cfg.fused_variants:
                    report["series"].append(await sweep_triton(cfg, backend, model, mode, slug, params, ipr, steps,
                                                               stats))
                    continue
                for variant in cfg.fused_variants:
                    restore = await asyncio.to_thread(load_fused_variant, url, model, variant)
                    try:
                        report["series"].append(await sweep_triton(cfg, backend, model, f"fused-{variant}", slug,
                                                                   params, ipr, steps, stats))
                    finally:
                        await asyncio.to_thread(restore)
    finally:
        await backend.close()
        stats.close()
