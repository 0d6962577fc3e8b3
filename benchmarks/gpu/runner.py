"""The GPU figures in one device call: a plan ordered by value, a deadline, and what it measured kept.

``benchmarks/gpu/run.sh`` runs ``python -m diffserve.benchmarks.gpu.runner``. This module owns the plan
(``PLAN``, most valuable first: Segmind-Vega at 1024², SD1.5 at 512x768, the denoiser's throughput
against batch size, step-level batching of whole requests at concurrency 1-16, OminiControl and Omni-Zero
networks, SD1.5 at 512²), the time guard that fits it
into one call of the device machine, and the summary. Each step is its own process (a crash, an
out-of-memory or the deadline loses that step alone), and a step's report is written to disk after
*every entry* (diffusers, eager, each optimised spec), so a step cut off at the deadline keeps the
entries it finished. After each step ``$OUT`` is rewritten: ``summary.json``, ``summary.md`` (the
table, then every step's full markdown) and ``steps.tar`` (every step's JSON, partial ones
included); with ``run.log`` (written by run.sh) that is 4 files, inside the device tool's 8.
``diffserve bench report --rerender`` rebuilds each step's markdown once the JSONs are unpacked into
``benchmarks/results/``.

Per entry the report holds what the speed means: the image is finite and not uniform, the optimised
path's denoiser step equals eager's at the same precision on two different inputs (a stale CUDA graph
replay fails), the VAE precision on both sides (SD1.5 runs ours with diffusers' fp16 VAE: like for
like), inductor's graphs, graph breaks, recompiles and CUDA-graph skips, and the peak memory of that
entry alone (the optimised entry takes the eager weights over instead of copying them).

``DRY_RUN=1`` runs the same plan through the same code on the CPU: the tiny configs of
``benchmarks/configs/tiny/`` in place of the full-size ones, fp32, 2 denoising steps (or the
catalog's minimum: 20 for SD1.5 and Vega, 4 for OminiControl), no warm-up and 1 timed run, and the
``fast`` preset without ``compile``/``cuda_graphs`` (inductor on a CPU takes minutes per network;
``tests/engine/test_torch_optimize.py`` covers it), the batching sweep at 128², 2 steps, concurrency 1
and 2 (``DRY_BATCHING``), so the script is checked by
the tests (``tests/benchmarks/test_gpu_script.py``) without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffserve.engine.processes import ChildProcess

logger = logging.getLogger("diffserve.benchmarks.gpu")

TINY_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tiny"
FAST_GPU = "fast,nowarmup"
"""``fast`` (fused QKV, channels-last, torch.compile, CUDA graphs, device scheduler), compiled lazily:
only the request's shape compiles, in the first warm-up run, reported apart as that run's excess."""
FAST_DRY = "fuse_qkv,channels_last,device_scheduler"
"""The dry run's stand-in for ``fast``: everything but ``compile`` and ``cuda_graphs``."""
BATCHING_OPTIMIZE = "fuse_qkv,device_scheduler"
"""The batching sweep's ``diffserve.engine.torch_optimize`` spec, GPU and dry run alike: ``fast`` less
``compile``/``cuda_graphs`` (a compile per batch shape) and ``channels_last`` (eager NHWC group norms; the
sweep's eager column is NCHW, so the batched calls compare with it)."""
DRY_BATCHING = {"concurrency": (1, 2), "requests": 1, "size": 128}
"""The dry run's batching sweep: concurrency 1 and 2, one request per client, 128², 2 steps."""
DRY_STEPS = 2
"""Denoising steps of a dry run, raised to the catalog's minimum where it has one."""
GPU_REPEATS = 3
"""Timed runs per engine entry on the GPU (after 2 warm-ups for ``fast``, 1 for diffusers and eager)."""
GPU_STAGE_REPEATS = 5
"""Calls per stage timed alone on the GPU."""
GPU_SWEEP_REPEATS = 5
"""Calls per point of the UNet batch sweep (eager and graph replay each)."""
CRASH_AFTER_ENTRIES = "DIFFSERVE_GPU_RUN_CRASH_AFTER_ENTRIES"
"""Tests only: a step process dies at once when this many entries are written (a step cut off mid-way)."""
STEPS_ARCHIVE = "steps.tar"
"""Every step's JSON in one file of ``$OUT``: the device tool brings back at most 8 files."""


def tolerances() -> dict[str, float]:
    """README's max pixel differences of the optimised path from eager torch at the same precision (fp32,
    reordered sums amplified by the sampler), per slug as its family states them (``BenchmarkFigures.
    gpu_tolerance``). Judged in fp32 runs only: fp16/bf16 against the fp32 reference differ by rounding
    far above these, and are reported, not judged."""
    from diffserve.benchmarks.figures import all_figures

    return {slug: fig.gpu_tolerance for slug, _, fig in all_figures() if fig.gpu_tolerance is not None}



@dataclass(frozen=True)
class Step:
    name: str
    """Stem tag and name on the command line (``STEPS=``), e.g. ``sd1.5-scifi-512x512``."""
    slug: str
    resolution: str
    params: dict[str, Any]
    precision: str
    optimize: tuple[str, ...] = ()
    fp32_reference: bool = True
    min_s: float = 60.0
    """Seconds the step needs on the H200 at least (process start, build, compile, runs): skipped when
    less is left before the deadline."""
    optional: bool = False
    """Runs only if time is left (ominicontrol, omni-zero, the second SD1.5 size)."""
    note: str = ""
    vae: str | None = None
    """Our VAE precision (``EngineBenchConfig.vae_precision``): diffusers' own where its pipeline ignores
    the config's ``force_upcast`` (StableDiffusionPipeline), so the ratio compares like with like."""
    kind: str = "engine"
    """``engine`` (one ``bench engine`` run), ``batch-sweep`` (``diffserve.benchmarks.batch_sweep``) or
    ``batching-sweep`` (``diffserve.benchmarks.batching_bench`` per slug of ``params["slugs"]``)."""
    max_s: float | None = None
    """Seconds after which the step is stopped on the GPU (keeping the entries it finished), so one slow
    compile cannot eat the steps after it."""


SD15_NOTE = ("VAE in fp16 on both sides: diffusers' StableDiffusionPipeline decodes in the pipeline dtype "
             "whatever the config's force_upcast says, so ours runs with vae=fp16 here (the engine's default "
             "upcasts it to fp32)")
# The plan names slugs as a run script names its runs: which requests to time on the GPU, in what order,
# with what deadline. It restates no per-slug constant (tolerances, floors, full-size configs and the
# sweep's shapes come from the families' BenchmarkFigures); a new family needs no line here unless it is
# to be timed on the GPU, which is a choice of this run, not part of the family.
PLAN: tuple[Step, ...] = (
    Step("segmind-vega-1024x1024", "segmind-vega", "1024x1024",
         {"img_width": 1024, "img_height": 1024, "num_inference_steps": 25, "scheduler": "UniPC",
          "guidance_scale": 9}, "fp16", (FAST_GPU,), max_s=240, min_s=150,
         note="VAE in fp32 on both sides (force_upcast: StableDiffusionXLPipeline upcasts it to decode, ours "
              "keeps it in fp32)"),
    Step("sd1.5-scifi-512x768", "sd1.5-scifi", "512x768",
         {"img_width": 512, "img_height": 768, "num_inference_steps": 30, "scheduler": "dpmpp_2m",
          "guidance_scale": 5}, "fp16", (FAST_GPU,), max_s=170, min_s=110, vae="fp16", note=SD15_NOTE),
    Step("unet-batch-sweep", "sd1.5-scifi", "512x512+1024x1024", {}, "fp16", max_s=80, min_s=45, kind="batch-sweep",
         note="the denoiser alone over 1-16 images per call (2-32 rows under CFG), eager and CUDA-graph replay: "
              "the ceiling of step-level batching"),
    Step("batching-sweep", "sd1.5-scifi", "512x512+1024x1024",
         {"slugs": {"sd1.5-scifi": {"img_width": 512, "img_height": 512, "num_inference_steps": 20,
                                    "scheduler": "dpmpp_2m", "guidance_scale": 5},
                    "segmind-vega": {"img_width": 1024, "img_height": 1024, "num_inference_steps": 10,
                                     "scheduler": "UniPC", "guidance_scale": 9}},
          "concurrency": (1, 2, 4, 8, 16), "requests": 1},
         "fp16", (BATCHING_OPTIMIZE,), max_s=85, min_s=50, optional=True, kind="batching-sweep",
         note="whole requests through the engine's StepBatcher against the same client threads each running its "
              "pipeline alone: concurrency 1-16 closed-loop clients, 1 request each, into one set of full-size "
              "components (fp16, fused QKV and the device scheduler; eager: compiling each batch shape would take "
              "~70 s each); Vega at 10 steps (the catalog's fewest is 20) to fit the budget; the request of seed 0 "
              "batched against the same request alone (max pixel difference, fp16)"),
    Step("ominicontrol-512x512", "ominicontrol", "512x512", {"steps": 8}, "bf16", fp32_reference=False,
         max_s=90, min_s=70, optional=True,
         note="networks only (no full-size T5, CLIP-L or FLUX-VAE configs yet, so diffusers' FluxPipeline and "
              "our pipeline do not run end to end): the stock FLUX step over 2048 joint tokens (1024 image + "
              "1024 condition, as the reference runs every step) against our condition branch computed once "
              "(cached) or per step (uncached) with our 1024-token step attending to it"),
    Step("omni-zero-1024x1024", "omni-zero", "1024x1024", {"number_of_steps": 10}, "fp16", fp32_reference=False,
         max_s=80, min_s=60, optional=True,
         note="networks only: SDXL UNet + 2 ControlNets, text encoders, VAE; no diffusers baseline"),
    Step("sd1.5-scifi-512x512", "sd1.5-scifi", "512x512",
         {"img_width": 512, "img_height": 512, "num_inference_steps": 30, "scheduler": "dpmpp_2m",
          "guidance_scale": 5}, "fp16", (FAST_GPU,), fp32_reference=False, max_s=150, min_s=100, optional=True, vae="fp16",
         note=SD15_NOTE),
)


def _dry_run() -> bool:
    return os.environ.get("DRY_RUN", "") not in ("", "0")


def step_config(step: Step, dry_run: bool, work_dir: Path):
    """The ``EngineBenchConfig`` of ``step``: the GPU settings, or the dry run's CPU settings."""
    from diffserve.benchmarks.engine_bench import EngineBenchConfig

    from diffserve.engine.catalog import get_model

    params = dict(step.params)
    if dry_run:
        for key in ("num_inference_steps", "steps", "number_of_steps"):
            if key in params:  # 2 steps, or the fewest the catalog accepts (SD1.5 and Vega: 20, FLUX: 4)
                params[key] = max(DRY_STEPS, int(get_model(step.slug).param(key).minimum or 0))
    optimize = tuple(FAST_DRY if (dry_run and spec == FAST_GPU) else spec for spec in step.optimize)
    return EngineBenchConfig(
        slug=step.slug, full_size=True, params=params, optimizations=optimize, vae_precision=step.vae,
        fp32_reference=step.fp32_reference, work_dir=work_dir,
        device="cpu" if dry_run else "cuda", precision="fp32" if dry_run else step.precision,
        config_dir=TINY_CONFIGS if dry_run else None,
        warmup=0 if dry_run else 2,  # GPU: the first run compiles, the second records the CUDA graphs
        eager_warmup=None if dry_run else 1,  # diffusers and eager: nothing to compile or record
        # GPU: 3 timed runs and 5 calls per stage (5 and 10, and 2 warm-ups for every entry, before the batching
        # sweep joined the plan: the H200 run of 2026-12-04 took 472 s of 500; benchmarks/README.md "GPU run")
        repeats=1 if dry_run else GPU_REPEATS, stage_repeats=1 if dry_run else GPU_STAGE_REPEATS,
        threads=1 if dry_run else None)


def run_step(step: Step, out_dir: Path, dry_run: bool) -> Path:
    """Run one step in this process; returns the JSON written into ``out_dir``.

    The report so far is written to ``<stem>.partial.json`` after every entry, and the final one to
    ``<stem>.json``, so the orchestrator finds what a step cut off at the deadline measured.
    """
    from diffserve.benchmarks.report import default_stem, write_report
    from diffserve.engine import home_dir

    meta = {"step": step.name, "resolution": step.resolution, "dry_run": dry_run, "note": step.note,
            "commit": _git_commit()}
    if step.kind == "batch-sweep":
        return _run_sweep(step, out_dir, dry_run, meta)
    if step.kind == "batching-sweep":
        return _run_batching(step, out_dir, dry_run, meta)
    from diffserve.benchmarks.engine_bench import public_report, run_engine_bench

    stem = None

    def save_partial(report: dict[str, Any]) -> None:
        nonlocal stem
        public = public_report(report)
        public["gpu_run"] = {**meta, "partial": True}
        stem = stem or _stem(public, step, dry_run)
        _write_atomic(out_dir / f"{stem}.partial.json", json.dumps(public, indent=2, default=str) + "\n")
        finished = len(public["runtimes"]) + (public.get("baseline") is not None)
        if os.environ.get(CRASH_AFTER_ENTRIES) == str(finished):
            os._exit(137)  # the tests' stand-in for a step killed mid-way (OOM, the deadline)

    report = run_engine_bench(step_config(step, dry_run, home_dir() / "bench"), on_update=save_partial)
    report["gpu_run"] = meta
    paths = write_report(report, out_dir, stem or _stem(report, step, dry_run), plots=False)
    (out_dir / f"{paths['json'].stem}.partial.json").unlink(missing_ok=True)
    return paths["json"]


def _stem(report: dict[str, Any], step: Step, dry_run: bool) -> str:
    from diffserve.benchmarks.report import default_stem

    stem = default_stem(report).replace(f"engine-{step.slug}-", f"engine-{step.slug}-{step.resolution}-", 1)
    return ("dryrun-" if dry_run else "") + stem


def _run_sweep(step: Step, out_dir: Path, dry_run: bool, meta: dict[str, Any]) -> Path:
    import datetime as _dt

    from diffserve.benchmarks.batch_sweep import run_batch_sweep, sweep_markdown

    report = run_batch_sweep(device="cpu" if dry_run else "cuda", precision="fp32" if dry_run else step.precision,
                             batches=(1, 2) if dry_run else (1, 2, 4, 8, 16), repeats=1 if dry_run else GPU_SWEEP_REPEATS,
                             config_dir=TINY_CONFIGS if dry_run else None, cuda_graphs=not dry_run,
                             size=(256, 256) if dry_run else None)
    report["gpu_run"] = meta
    device = "cpu" if dry_run else _device_name(False).lower().replace("nvidia ", "").replace(" ", "-")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    stem = f"{'dryrun-' if dry_run else ''}batch-sweep-unet-{device}-{step.precision if not dry_run else 'fp32'}-{stamp}"
    path = out_dir / f"{stem}.json"
    _write_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
    _write_atomic(out_dir / f"{stem}.md", sweep_markdown(report))
    return path


def _run_batching(step: Step, out_dir: Path, dry_run: bool, meta: dict[str, Any]) -> Path:
    """Each slug of ``step.params["slugs"]`` at full size: ``run_batching_bench`` on its components. The report
    so far (the points finished) is written to ``<stem>.partial.json`` after every point."""
    import datetime as _dt
    import gc

    import torch

    from diffserve.benchmarks.batching_bench import run_batching_bench, sweep_markdown
    from diffserve.benchmarks.environment import environment
    from diffserve.benchmarks.full_size import full_size_setup
    from diffserve.benchmarks.record import new_report
    from diffserve.engine import home_dir

    device = "cpu" if dry_run else "cuda"
    precision = "fp32" if dry_run else step.precision
    if dry_run:
        torch.set_num_threads(1)  # as the engine steps' dry run: a shared CPU oversubscribed is seconds per call
    concurrency = DRY_BATCHING["concurrency"] if dry_run else tuple(step.params["concurrency"])
    requests = DRY_BATCHING["requests"] if dry_run else int(step.params["requests"])
    report = new_report("batching-sweep", environment(torch.device(device)))
    report["settings"] = {"device": device, "precision": precision, "concurrency": list(concurrency),
                          "requests_per_client": requests, "optimizations": step.optimize[0],
                          "configs": str(TINY_CONFIGS) if dry_run else "benchmarks/configs"}
    report["note"] = ("closed-loop client threads, each sending its requests back to back into one set of full-size "
                      "random-weight torch components: unbatched, every thread runs its pipeline alone; batched, "
                      "the threads' denoising loops go through one StepBatcher (one UNet call per tick over every "
                      "request in step). Max pixel diff vs alone: the request of seed 0 against the same request "
                      "run alone before the sweep (pixels in 0..1)")
    report["sweeps"] = []
    report["gpu_run"] = meta
    dev_name = "cpu" if dry_run else _device_name(False).lower().replace("nvidia ", "").replace(" ", "-")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    stem = f"{'dryrun-' if dry_run else ''}batching-sweep-{dev_name}-{precision}-{stamp}"
    partial = out_dir / f"{stem}.partial.json"

    def save(done: list[dict[str, Any]], current: dict[str, Any] | None) -> None:
        now = [{k: v for k, v in current.items() if k != "environment"}] if current else []
        body = dict(report, sweeps=done + now, gpu_run={**meta, "partial": True})
        _write_atomic(partial, json.dumps(body, indent=2, default=str) + "\n")
        points = sum(len(sw["points"]) for sw in body["sweeps"])
        if os.environ.get(CRASH_AFTER_ENTRIES) == str(points):
            os._exit(137)  # the tests' stand-in for a step killed mid-way (OOM, the deadline)

    done: list[dict[str, Any]] = []
    for slug, params in step.params["slugs"].items():
        params = dict(params)
        width, height, steps = params.pop("img_width"), params.pop("img_height"), params.pop("num_inference_steps")
        if dry_run:
            width = height = DRY_BATCHING["size"]
            steps = DRY_STEPS
        full = full_size_setup(slug, device=device, precision=precision,
                               skeleton_root=home_dir() / "bench" / "full-size",
                               config_dir=TINY_CONFIGS if dry_run else None, optimizations=step.optimize[0])
        try:
            sweep = run_batching_bench(
                slug=slug, components=full.components, params=params, width=width, height=height, steps=steps,
                requests=requests, concurrency=concurrency, max_batch=2 * max(concurrency),
                command=f"gpu plan step {step.name}", on_point=lambda r: save(done, r))
        finally:
            del full
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        sweep.pop("environment", None)
        done.append(sweep)
        save(done, None)
    report["sweeps"] = done
    path = out_dir / f"{stem}.json"
    _write_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
    _write_atomic(out_dir / f"{stem}.md", sweep_markdown(report))
    partial.unlink(missing_ok=True)
    return path


# -- the summary -----------------------------------------------------------------------------------------

def _r(value: Any, digits: int = 4) -> Any:
    return None if value is None else round(float(value), digits)


def summarize_report(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per entry (diffusers, eager torch, each optimised spec) of an engine report."""
    from diffserve.benchmarks import floors

    slug, device = report["settings"]["slug"], report["settings"]["device"]
    precision = report["settings"]["precision"]
    floor_ms = (report.get("floor") or {}).get("floor_ms")
    tol = tolerances().get(slug)
    rows: list[dict[str, Any]] = []
    base = report.get("baseline")
    if base:
        median = base["end_to_end"]["median_ms"]
        rows.append({"entry": f"diffusers {base['pipeline']}", "status": "ok", "median_ms": median,
                     "p90_ms": base["end_to_end"]["p90_ms"], "ratio_vs_diffusers": 1.0, "speedup_vs_diffusers": 1.0,
                     "fraction_of_floor": _r(floors.fraction_of_floor(floor_ms, median, device)),
                     "max_abs_diff_vs_fp32": base.get("max_abs_diff_vs_fp32"), "vae_dtype": base.get("vae_dtype"),
                     "image_check": base.get("image_check"), "peak_memory_gb": base.get("peak_memory_gb")})
    for e in report["runtimes"]:
        label = e["runtime"] + (f" [{e['optimizations']}]" if e.get("optimizations") else " eager")
        row: dict[str, Any] = {"entry": label, "status": e["status"], "reason": e.get("reason")}
        if e["status"] == "ok":
            e2e = e["end_to_end"]
            ours = e2e.get("ours")
            ratio = (e.get("ratio_vs_diffusers") or {}).get("median")
            row.update(
                median_ms=ours["median_ms"] if ours else None, p90_ms=ours["p90_ms"] if ours else None,
                estimated_ms=e2e.get("estimated_ms"), ratio_vs_diffusers=ratio,
                speedup_vs_diffusers=_r(1.0 / ratio, 3) if ratio else None,
                denoise_its=e.get("denoise_its"), denoiser_its=e.get("denoiser_its"),
                fraction_of_floor=e.get("fraction_of_floor"),
                unet_step_fraction_of_floor=e.get("unet_step_fraction_of_floor"),
                max_abs_diff_vs_fp32=e.get("max_abs_diff_vs_fp32"), max_abs_diff_vs_eager=e.get("max_abs_diff_vs_eager"),
                loop_overhead_per_step_ms=e.get("loop_overhead_per_step_ms"),
                first_run_excess_s=(e.get("warmup") or {}).get("first_run_excess_s"),
                load_compile_s=_r(sum((e.get("optimization") or {}).get("warmup_s", {}).values()), 3),
                peak_memory_gb=e.get("peak_memory_gb"), resident_at_start_gb=e.get("resident_at_start_gb"),
                vae_dtype=e.get("vae_dtype"), image_check=e.get("image_check"),
                denoiser_check=e.get("denoiser_check"), compile_counters=e.get("compile_counters"),
                stage_split_ms={k: v["median_ms"] for k, v in (e2e.get("pipeline_stages") or {}).items()},
                stages_ms={k: v["median_ms"] for k, v in (e.get("stages") or {}).items()})
            if row["denoiser_its"] is None:  # networks-only steps: the denoiser stage timed alone
                step = next((row["stages_ms"][k] for k in ("transformer_step", "unet_step") if k in row["stages_ms"]),
                            None)
                row["denoiser_its"] = float(f"{1000.0 / step:.4g}") if step else None
            if e.get("condition_cache"):
                row["condition_cache"] = {k: v for k, v in e["condition_cache"].items() if k != "stages"}
            if precision == "fp32" and tol is not None and row["max_abs_diff_vs_eager"] is not None:
                row["within_tolerance_vs_eager"] = row["max_abs_diff_vs_eager"] <= tol
        rows.append(row)
    return rows


def summarize_sweep(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (slug, batch) point of a batch-sweep report."""
    return [{"entry": f"{sw['slug']} {sw['resolution']} batch {p['batch']}", **p}
            for sw in report["sweeps"] for p in sw["points"]]


def summarize_batching(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (slug, concurrency, mode) point of a batching-sweep report."""
    rows = []
    for sw in report["sweeps"]:
        s = sw["settings"]
        for p in sw["points"]:
            rows.append({"entry": f"{s['slug']} {s['width']}x{s['height']} c{p['concurrency']} {p['mode']}",
                         "slug": s["slug"], "resolution": f"{s['width']}x{s['height']}", "steps": s["steps"],
                         **p})
    return rows


def checks_cell(row: dict[str, Any]) -> str:
    """What the speed of a row means: image finite and not uniform, denoiser step = eager, compile counters."""
    parts = []
    img = row.get("image_check")
    if img:
        parts.append("image ok" if img["ok"] else f"IMAGE BAD (finite {img['finite']}, std {img['std']:.1e})")
    den = row.get("denoiser_check")
    if den:
        parts.append(f"step vs eager rel {den['rel_l2']:.1e}" + ("" if den["ok"] else " FAILED"))
    cc = row.get("compile_counters")
    if cc and cc.get("unique_graphs"):
        parts.append(f"{cc['unique_graphs']} graphs, {cc['graph_breaks']} breaks, {cc['recompiles']} recompiles, "
                     f"{cc['cudagraph_skips']} cudagraph skips")
    if row.get("vae_dtype"):
        parts.append(f"VAE {row['vae_dtype'].replace('float', 'fp')}")
    return "; ".join(parts)


def _fmt(value: Any, fmt: str = "{:.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def render_summary(summary: dict[str, Any], step_markdown: dict[str, str]) -> str:
    dry = summary["dry_run"]
    lines = [f"# GPU figures{' (DRY RUN: tiny configs on CPU, fp32, 2 steps or the catalog minimum — says nothing about speed)' if dry else ''}",
             "", f"Device: {summary['device']}. Commit {summary.get('commit') or '?'}. Started "
             f"{summary['started_utc']}, {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget.", "",
             "| step | entry | median | p90 | ours / diffusers | speed-up | it/s (e2e / UNet) | fraction of floor "
             "| max diff vs fp32 | first-run excess (compile) | peak GB | checks |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    sweeps, batching = [], []
    for st in summary["steps"]:
        if st["status"] not in ("ok", "partial"):
            lines.append(f"| {st['name']} | {st['status']}: {st.get('reason') or ''} | | | | | | | | | | |")
            continue
        if st.get("kind") == "batch-sweep":
            sweeps.append(st)
            lines.append(f"| {st['name']} | see the batch table below | | | | | | | | | | |")
            continue
        if st.get("kind") == "batching-sweep":
            batching.append(st)
            lines.append(f"| {st['name']} | {'partial: ' + (st.get('reason') or '') + '; ' if st['status'] == 'partial' else ''}"
                         "see the batching table below | | | | | | | | | | |")
            continue
        if st["status"] == "partial":
            lines.append(f"| {st['name']} | partial: {st.get('reason') or ''} | | | | | | | | | | |")
        for row in st["entries"]:
            if row["status"] != "ok":
                lines.append(f"| {st['name']} | {row['entry']}: {row['status']} ({row.get('reason') or ''}) "
                             "| | | | | | | | | | |")
                continue
            median = row.get("median_ms")
            est = row.get("estimated_ms")
            lines.append(
                f"| {st['name']} | {row['entry']} | "
                + (_fmt(median, "{:.1f} ms") if median is not None else _fmt(est, "~{:.1f} ms (estimate)"))
                + f" | {_fmt(row.get('p90_ms'), '{:.1f} ms')} | {_fmt(row.get('ratio_vs_diffusers'), '{:.3f}')} "
                f"| {_fmt(row.get('speedup_vs_diffusers'), '{:.2f}x')} "
                f"| {_fmt(row.get('denoise_its'))} / {_fmt(row.get('denoiser_its'))} "
                f"| {_fmt(row.get('fraction_of_floor'), '{:.1%}')} | {_fmt(row.get('max_abs_diff_vs_fp32'), '{:.1e}')} "
                f"| {_fmt(row.get('first_run_excess_s'), '{:.1f} s')} | {_fmt(row.get('peak_memory_gb'), '{:.2f}')} "
                f"| {checks_cell(row)} |")
    for st in sweeps:
        lines += ["", f"{st['name']}: one denoiser call over B images (2B rows under CFG); image-steps/s from the "
                  "faster of eager and CUDA-graph replay; the ceiling of step-level batching.", "",
                  "| network | batch | eager | CUDA graph | image-steps/s | vs batch 1 | fraction of floor | peak GB "
                  "| check |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in st["entries"]:
            if row.get("status") != "ok":
                lines.append(f"| {row['entry']} | | {row.get('status')} | | | | | | |")
                continue
            check = ("finite" if row.get("finite") else "NOT FINITE") + (
                "" if "graph_ok" not in row else (", replay = eager" if row["graph_ok"] else ", REPLAY DIFFERS"))
            lines.append(f"| {row['entry'].rsplit(' batch ', 1)[0]} | {row['batch']} | {_fmt(row.get('eager_ms'), '{:.2f} ms')} "
                         f"| {_fmt(row.get('graph_ms'), '{:.2f} ms')} | {_fmt(row.get('image_steps_per_s'))} "
                         f"| {_fmt(row.get('throughput_vs_batch_1'), '{:.2f}x')} "
                         f"| {_fmt(row.get('fraction_of_floor'), '{:.1%}')} | {_fmt(row.get('peak_memory_gb'), '{:.2f}')} "
                         f"| {check} |")
    for st in batching:
        lines += ["", f"{st['name']}: whole requests from closed-loop client threads (1 request each) into one set "
                  "of full-size components, through the engine's StepBatcher (batched) or each pipeline alone "
                  "(unbatched); mean UNet rows per call (2 per image under CFG); max pixel diff: the request of "
                  "seed 0 against the same request alone (0..1).", "",
                  "| network | steps | concurrency | mode | images/s | vs unbatched | p50 | p95 | mean UNet rows/call "
                  "| max pixel diff vs alone | peak GB |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in st["entries"]:
            if row.get("status", "ok") != "ok":
                lines.append(f"| {row['slug']} {row['resolution']} | {row['steps']} | {row['concurrency']} "
                             f"| {row['mode']} | {row['status']}: {row.get('reason') or ''} | | | | | | |")
                continue
            lines.append(f"| {row['slug']} {row['resolution']} | {row['steps']} | {row['concurrency']} | {row['mode']} "
                         f"| {_fmt(row.get('images_per_s'), '{:.2f}')} | {_fmt(row.get('over_unbatched'), '{:.2f}x')} "
                         f"| {_fmt(row.get('p50_s'), '{:.2f} s')} | {_fmt(row.get('p95_s'), '{:.2f} s')} "
                         f"| {_fmt(row.get('mean_call_rows'))} | {_fmt(row.get('max_pixel_diff_vs_alone'), '{:.1e}')} "
                         f"| {_fmt(row.get('peak_memory_gb'), '{:.2f}')} |")
    lines += ["", "Ours / diffusers below 1 = faster (same process, same modules, same seed). Fraction of floor = "
              "H100 compute floor (benchmarks/floors.py, 800 TFLOP/s dense bf16) / measured median; GPU only. "
              "Max diff vs fp32: largest pixel difference (0..1) from eager fp32 on the same weights; README "
              "tolerances (" + ", ".join(f"{k} {v:g}" for k, v in tolerances().items()) + ") are for the optimised "
              "path against eager at the same precision and are judged in fp32 runs only. First-run excess: the "
              "first warm-up run minus the timed median (lazy compile, CUDA graph capture), kept out of the "
              "timed runs. Peak GB: the entry's own peak of allocated device memory (the optimised entry takes "
              "the eager weights over; the fp32 reference ran before it). Checks: the final image is finite and "
              "not uniform; one denoiser step of the optimised path against eager at the same precision on two "
              "different inputs (relative L2, limit 1e-2 at fp16/bf16; a stale CUDA-graph replay fails); "
              "inductor's graphs, graph breaks, recompiles and CUDA-graph skips; the VAE precision."]
    for st in summary["steps"]:
        for row in st.get("entries") or []:
            cc = row.get("condition_cache")
            if cc:
                lines.append(f"\n{st['name']}, the condition ({cc['condition_tokens']} tokens, {cc['steps']} steps; "
                             f"denoiser work per request): the default joint attention (the reference as shipped) "
                             f"{_fmt(cc['joint_estimate_ms'], '{:.1f} ms')}, the opt-in cached condition "
                             f"{_fmt(cc['cached_estimate_ms'], '{:.1f} ms')}; cached / joint "
                             f"{_fmt(cc.get('cached_vs_joint'), '{:.3f}')}.")
    for st in summary["steps"]:
        if st.get("note"):
            lines.append(f"\nNote ({st['name']}): {st['note']}.")
    for st in summary["steps"]:
        if st["name"] in step_markdown:
            lines += ["", "---", "", step_markdown[st["name"]]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _git_commit() -> str | None:
    """``$GIT_COMMIT`` (the device's copy of the tree has no .git: pass it in the command), else git."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        from diffserve.benchmarks.report import git_info

        info = git_info()
        commit = info.get("commit")
        return commit[:12] + ("+dirty" if info.get("dirty") else "") if commit else None
    except Exception:  # noqa: BLE001 - the summary never fails on git
        return None


# -- the orchestrator ---------------------------------------------------------------------------------------

@dataclass
class Orchestrator:
    out: Path
    budget_s: float
    dry_run: bool
    steps: tuple[Step, ...]
    started: float = field(default_factory=time.time)
    summary: dict[str, Any] = field(default_factory=dict)
    step_markdown: dict[str, str] = field(default_factory=dict)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="diffserve-gpu-steps-")))
    """Each step writes here first; its JSON (final or partial) then goes into ``out/steps.tar``."""
    step_files: list[Path] = field(default_factory=list)

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def write(self) -> None:
        self.summary["elapsed_s"] = round(time.time() - self.started, 1)
        _write_atomic(self.out / "summary.json", json.dumps(self.summary, indent=2, default=str) + "\n")
        _write_atomic(self.out / "summary.md", render_summary(self.summary, self.step_markdown))
        if self.step_files:
            tmp = self.out / ".steps.tar.tmp"
            with tarfile.open(tmp, "w") as tar:
                for path in self.step_files:
                    tar.add(path, arcname=path.name)
            os.replace(tmp, self.out / STEPS_ARCHIVE)

    def run(self) -> int:
        import datetime as _dt

        self.out.mkdir(parents=True, exist_ok=True)
        self.summary = {"dry_run": self.dry_run, "device": _device_name(self.dry_run), "budget_s": self.budget_s,
                        "started_utc": _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc).isoformat(
                            timespec="seconds"), "commit": _git_commit(), "steps": []}
        for step in self.steps:
            record: dict[str, Any] = {"name": step.name, "slug": step.slug, "resolution": step.resolution,
                                      "kind": step.kind, "precision": "fp32" if self.dry_run else step.precision,
                                      "optional": step.optional, "note": step.note}
            self.summary["steps"].append(record)
            left = self.remaining()
            need = 5.0 if self.dry_run else step.min_s
            if left < need:
                record.update(status="skipped", reason=f"time guard: needs ~{need:.0f} s, {max(left, 0):.0f} s left "
                                                       f"of the {self.budget_s:.0f} s budget")
                logger.warning("%s skipped: %s", step.name, record["reason"])
                self.write()
                continue
            limit = left if self.dry_run or step.max_s is None else min(left, step.max_s)
            logger.info("step %s: starting, %.0f s left, stopped after %.0f s", step.name, left, limit)
            record.update(self._run_child(step, limit))
            self.write()
        self.write()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        print(render_summary(self.summary, {}))
        ok = [s for s in self.summary["steps"] if s["status"] in ("ok", "partial")]
        return 0 if ok else 1

    def _run_child(self, step: Step, timeout: float) -> dict[str, Any]:
        work = self.work_dir / step.name
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "diffserve.benchmarks.gpu.runner", "--step", step.name, "--step-out", str(work)]
        t0 = time.time()
        # Own process group: a step cut off at the deadline takes its compile workers with it.
        proc = ChildProcess(cmd, name=f"step {step.name}", pipe_output=False).start()
        try:
            rc = proc.wait(timeout=timeout)
            why = None if rc == 0 else f"exit status {rc}; see run.log"
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, why = None, f"stopped at the deadline after {time.time() - t0:.0f} s"
        wall = round(time.time() - t0, 1)
        final = sorted(p for p in work.glob("*.json") if not p.name.endswith(".partial.json"))
        partial = sorted(work.glob("*.partial.json"))
        if rc == 0 and final:
            src, status = final[-1], "ok"
        elif partial:  # what the step measured before it was cut off or failed
            src, status = partial[-1], "partial"
        else:
            return {"status": "cut_off" if rc is None else "failed", "wall_s": wall,
                    "reason": (why or "no report written") + " (nothing of it measured)"}
        report = json.loads(src.read_text(encoding="utf-8"))
        self.step_files.append(src)
        md = src.with_suffix(".md")
        if md.is_file():
            self.step_markdown[step.name] = md.read_text(encoding="utf-8")
        entries = {"batch-sweep": summarize_sweep, "batching-sweep": summarize_batching}.get(
            step.kind, summarize_report)(report)
        out = {"status": status, "wall_s": wall, "json": src.name, "entries": entries,
               "floor_ms": (report.get("floor") or {}).get("floor_ms"), "steps_run": report.get("steps")}
        if status == "partial":
            out["reason"] = f"{why}; the entries it finished are kept"
        return out


def _device_name(dry_run: bool) -> str:
    if dry_run:
        return "cpu (dry run)"
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


def select_steps(names: str | None) -> tuple[Step, ...]:
    """``STEPS=a,b`` (names or slugs) picks steps of the plan, in plan order; empty: the whole plan."""
    if not names:
        return PLAN
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if not any(n in (s.name, s.slug) for s in PLAN)]
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; the plan: {', '.join(s.name for s in PLAN)}")
    return tuple(s for s in PLAN if s.name in wanted or s.slug in wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffserve.benchmarks.gpu.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu-run",
                        help="where the JSONs and the summary go (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S") or 0) or None,
                        help="seconds for the whole plan (default $BUDGET_S; 480 on GPU, 300 dry)")
    parser.add_argument("--steps", default=os.environ.get("STEPS"), help="comma list of step names or slugs")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a child: run this one step
    parser.add_argument("--step-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dry = _dry_run()
    if args.step:
        (step,) = select_steps(args.step)
        path = run_step(step, Path(args.step_out), dry)
        print(f"step {step.name}: written {path}", flush=True)
        return 0
    budget = args.budget_s or (300.0 if dry else 480.0)
    # The deadline counts from run.sh's start (wheel install included) when it passes it.
    started = float(os.environ.get("RUN_STARTED") or time.time())
    orch = Orchestrator(Path(args.out), budget, dry, select_steps(args.steps), started=started)
    return orch.run()


if __name__ == "__main__":
    sys.exit(main())
