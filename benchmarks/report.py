"""Benchmark reports: the JSON record, its markdown table and PNG plots, and the results index.

Every benchmark run returns a plain dict (``new_report``) that carries the environment it ran
in — machine, GPU, package versions, git commit (and whether the tree had local changes) — and
its settings, so a number can be traced to what produced it and reproduced. ``write_report``
stores ``<stem>.json``, ``<stem>.md`` and ``<stem>-*.png`` under ``benchmarks/results/`` (or
``--out``); ``results_index`` renders the newest result of each kind/slug/setting in that
directory as the tables the README shows, with the compute floors next to them.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import floors

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
_PACKAGES = ("diffserve", "torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "tritonclient", "nvidia-pytriton", "numpy", "fastapi", "uvicorn", "httpx")


# -- environment ------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "branch": git("rev-parse",
                                                                                                  "--abbrev-ref", "HEAD")}


def _gpu(device: Any) -> dict[str, Any] | None:
    import torch

    if device is None or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    info = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "capability": f"{props.major}.{props.minor}"}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
        info["driver"] = out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def environment(device: Any = None) -> dict[str, Any]:
    """Where a benchmark ran: machine, GPU (for a CUDA device), versions, git commit."""
    return {
        "machine": {"platform": platform.platform(), "arch": platform.machine(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(), "memory_gb": _memory_gb()},
        "gpu": _gpu(device),
        "versions": _versions(),
        "git": git_info(),
        "argv": sys.argv[1:],
    }


def new_report(kind: str, env: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "schema_version": SCHEMA_VERSION,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "environment": env}


# -- writing -------------------------------------------------------------------------------------------

def default_stem(report: dict[str, Any]) -> str:
    s = report.get("settings", {})
    stamp = report["created_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")[:15]
    if report["kind"] == "engine":
        size = "full" if s.get("full_size") else ("tiny" if _is_tiny(report) else "ckpt")
        parts = ["engine", s.get("slug"), _device_tag(report), s.get("precision"), size]
    elif report["kind"] == "serve":
        target = s.get("backend") or ("triton" if s.get("target") == "triton only" else "api")
        parts = ["serve", "+".join(s.get("slugs", [])), _device_tag(report), target]
    else:
        parts = [report["kind"]]
    return "-".join(str(p) for p in parts if p) + f"-{stamp}"


def _device_tag(report: dict[str, Any]) -> str:
    gpu = report["environment"].get("gpu")
    if gpu:
        return gpu["name"].replace("NVIDIA ", "").replace(" ", "_").lower()
    return "cpu"


def _is_tiny(report: dict[str, Any]) -> bool:
    ckpt = report.get("settings", {}).get("checkpoint") or ""
    return "tiny-" in Path(ckpt).name


def write_report(report: dict[str, Any], out_dir: Path | None = None, stem: str | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """Write the JSON, markdown and plots of ``report``; returns their paths."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(report)
    paths: dict[str, Path] = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    if plots:
        paths.update(render_plots(report, out, stem))
    report["files"] = {k: p.name for k, p in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    logger.info("report written: %s", ", ".join(str(p) for p in paths.values()))
    return paths


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- markdown -----------------------------------------------------------------------------------------

def _ms(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def _num(value: Any, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _request_summary(req: dict[str, Any]) -> str:
    parts = []
    if "img_width" in req:
        parts.append(f"{req['img_width']}x{req['img_height']}")
    steps = req.get("num_inference_steps") or req.get("number_of_steps") or req.get("steps")
    if steps:
        parts.append(f"{steps} steps" + (f" x strength {req['strength']}" if "strength" in req else ""))
    if req.get("scheduler"):
        parts.append(f"`{req['scheduler']}`")
    if "guidance_scale" in req:
        parts.append(f"guidance {req['guidance_scale']}")
    parts.append(f"{req.get('samples') or req.get('number_of_images') or 1} image(s)")
    return ", ".join(parts)


def _header(report: dict[str, Any], title: str) -> list[str]:
    env = report["environment"]
    git = env.get("git") or {}
    gpu = env.get("gpu")
    v = env.get("versions", {})
    machine = env.get("machine", {})
    lines = [f"# {title}", "",
             f"- created: {report['created_utc']}; commit `{(git.get('commit') or '?')[:12]}`"
             + (" (with local changes)" if git.get("dirty") else ""),
             f"- machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs, {machine.get('memory_gb')} GB), "
             f"{machine.get('platform')}",
             f"- GPU: {gpu['name']} ({gpu['memory_gb']} GB, CUDA {gpu['cuda']}, driver {gpu.get('driver')})"
             if gpu else "- GPU: none" + ("" if report["kind"] == "capacity"
                                          else " (CPU run: no fraction of the compute floor is computed)"),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             ""]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    kind = report["kind"]
    if kind == "engine":
        return render_engine_markdown(report)
    if kind == "serve":
        return render_serve_markdown(report)
    if kind == "capacity":
        return render_capacity_markdown(report)
    raise ValueError(f"unknown report kind {kind!r}")


def render_engine_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    size = "full-size random weights" if s.get("full_size") else (
        "tiny random-weight checkpoint" if _is_tiny(report) else f"checkpoint {s.get('checkpoint')}")
    lines = _header(report, f"Engine benchmark: {s['slug']} ({s['device']}, {s['precision']}, {size})")
    req = report.get("request", {})
    lines += [f"Request: {_request_summary(req)} ({report.get('steps')} denoising steps run); "
              f"{s['warmup']} warm-up + {s['repeats']} timed runs, "
              f"up to {s['stage_repeats']} calls per stage, each timed alone after a warm-up; "
              "device-synchronised timing.", ""]
    floor = report.get("floor") or {}
    lines += [f"Compute floor (H100): {_ms(floor.get('floor_ms'))} — {floor.get('note', '')}"
              + (" (approximate: resolution scaled)" if floor.get("approximate") else ""), ""]
    if report.get("full_size"):
        fs = report["full_size"]
        lines += ["Full-size networks (random weights, built on the device in "
                  f"{fs['build_seconds']} s): " + ", ".join(f"{k} {v}M" for k, v in fs["parameters_m"].items()), ""]
    base = report.get("baseline")
    lines += ["## End to end", "",
              "| runtime | ours median | ours p90 | diffusers median | diffusers p90 | ours / diffusers (median) "
              "| max abs diff vs diffusers | fraction of floor |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runtimes"]:
        if r["status"] != "ok":
            lines.append(f"| {_label(r)} | {r['status']}: {r['reason']} | | | | | | |")
            continue
        e2e = r["end_to_end"]
        if "ours" not in e2e:
            lines.append(f"| {_label(r)} (estimate) | {_ms(e2e['estimated_ms'])} | — | — | — | — | — "
                         f"| {_pct(r.get('fraction_of_floor'))} |")
            continue
        ratio = r.get("ratio_vs_diffusers") or {}
        lines.append(
            f"| {_label(r)} | {_ms(e2e['ours']['median_ms'])} | {_ms(e2e['ours']['p90_ms'])} "
            f"| {_ms(base['end_to_end']['median_ms']) if base else '—'} | {_ms(base['end_to_end']['p90_ms']) if base else '—'} "
            f"| {_num(ratio.get('median'), '{:.3f}')} | {_num(r.get('max_abs_diff_vs_diffusers'), '{:.1e}')} "
            f"| {_pct(r.get('fraction_of_floor'))} |")
    if base:
        lines += ["", f"Baseline: diffusers `{base['pipeline']}` over the same module objects, scheduler "
                      f"`{base['scheduler']}`, VAE in {base['vae_dtype']}, same seed; ratio below 1 means ours is faster."]
    for r in report["runtimes"]:
        if r["status"] == "ok" and "estimate" in r["end_to_end"]:
            lines += ["", f"Estimate: {r['end_to_end']['estimate']}."]
    ok = [r for r in report["runtimes"] if r["status"] == "ok"]
    if ok:
        names = _stage_names(ok)
        lines += ["", "## Stages (per call)", "",
                  "| stage | " + " | ".join(f"{_label(r)} median | {_label(r)} p90" for r in ok) + " |",
                  "|---|" + "---:|---:|" * len(ok)]
        for n in names:
            cells = []
            for r in ok:
                st = r["stages"].get(n)
                cells += [_ms(st["median_ms"]) if st else "—", _ms(st["p90_ms"]) if st else "—"]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        if any(r.get("loop_overhead_per_step_ms") is not None for r in ok):
            lines += ["", "Loop overhead per step (one instrumented run: the denoise stage minus the denoiser "
                          "calls inside it, per step — scheduler, guidance, copies, Python): " + ", ".join(f"{_label(r)} {_ms(r.get('loop_overhead_per_step_ms'))}"
                                                           for r in ok)]
        if any(r.get("denoise_its") is not None for r in ok):
            published = floors.PUBLISHED_FOR_SLUG.get(s["slug"])
            lines += ["", "Iterations per second (one denoising step with both CFG halves; in the end-to-end "
                          "runs / the denoiser call alone): " + ", ".join(
                              f"{_label(r)} {_num(r.get('denoise_its'), '{:.1f}')} / "
                              f"{_num(r.get('denoiser_its'), '{:.1f}')} it/s" for r in ok)
                      + (f". Best published H100, {published}: {floors.PUBLISHED_H100[published]}" if published
                         else "") + "."]
        if report.get("fp32_reference"):
            lines += ["", "Max abs pixel difference from eager fp32 on the same weights: " + ", ".join(
                f"{_label(r)} {_num(r.get('max_abs_diff_vs_fp32'), '{:.1e}')}" for r in ok)]
        for r in ok:
            if r.get("optimization"):
                o = r["optimization"]
                applied = "; ".join(f"{k}: {', '.join(v)}" for k, v in o["applied"].items()) or "nothing"
                lines += ["", f"{_label(r)}: applied {applied}. Max abs diff vs eager torch: "
                              f"{_num(r.get('max_abs_diff_vs_eager'), '{:.1e}')}. Load-time warm-up (compile): "
                          + (", ".join(f"{k} {v} s" for k, v in o["warmup_s"].items()) or "none")
                          + (". Fallbacks: " + "; ".join(o["fallbacks"]) if o["fallbacks"] else "") + "."]
        if any(r.get("unet_step_fraction_of_floor") is not None for r in ok):
            lines.append("")
            lines.append("UNet step fraction of floor: " + ", ".join(
                f"{_label(r)} {_pct(r.get('unet_step_fraction_of_floor'))}" for r in ok))
        split = [r for r in ok if "pipeline_stages" in r["end_to_end"]]
        if split:
            keys: list[str] = []
            for r in split:
                keys += [k for k in r["end_to_end"]["pipeline_stages"] if k not in keys and k != "total"]
            keys.append("total")
            lines += ["", "## Stage split inside the end-to-end runs (pipeline timers)", "",
                      "| stage | " + " | ".join(f"{_label(r)} median" for r in split) + " |",
                      "|---|" + "---:|" * len(split)]
            for k in keys:
                lines.append(f"| {k} | " + " | ".join(
                    _ms(r["end_to_end"]["pipeline_stages"].get(k, {}).get("median_ms")) for r in split) + " |")
    for r in report["runtimes"]:
        for note in r.get("notes") or []:
            lines.append(f"\nNote ({_label(r)}): {note}")
    if report.get("baseline_note"):
        lines.append(f"\nNote: {report['baseline_note']}")
    lines += _plots_md(report)
    return "\n".join(lines) + "\n"


def render_serve_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = _header(report, f"Serving benchmark: {', '.join(s['slugs'])} ({s.get('target')})")
    unit = "concurrency" if s["loop"] == "closed" else "requests/s offered"
    lines += [f"Load: {s['loop']}-loop, levels ({unit}) {', '.join(f'{lv:g}' for lv in s['levels'])}, at least "
              f"{s['requests_per_level']} requests per level after one warm-up request; request: "
              + "; ".join(f"{slug}: {_request_summary(req)}" for slug, req in (report.get("requests") or {}).items())
              + " (full parameters in the JSON).", ""]
    lines += ["| slug | target | endpoint / mode | level | ok | errors | p50 | p95 | p99 | req/s | images/s "
              "| API | API queue | backend queue | compute | Triton queue | Triton compute |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for series in report["series"]:
        for lv in series["levels"]:
            split = dict(lv.get("split_ms_median") or {})
            if series["target"] != "api":  # no API in front of Triton's models
                split["api"] = split["api_queue"] = None
            tri = lv.get("triton") or {}
            lines.append(
                f"| {series['slug']} | {series['target']} | {series['endpoint']} | {lv['level']} | {lv['ok']} "
                f"| {lv['errors']} | {_ms(lv['latency']['p50_ms'])} | {_ms(lv['latency']['p95_ms'])} "
                f"| {_ms(lv['latency']['p99_ms'])} | {_num(lv['throughput_rps'], '{:.3f}')} "
                f"| {_num(lv['images_per_s'], '{:.3f}')} | {_ms(split.get('api'))} | {_ms(split.get('api_queue'))} "
                f"| {_ms(split.get('backend_queue'))} | {_ms(split.get('compute'))} "
                f"| {_ms(tri.get('queue_ms_per_request'))} | {_ms(tri.get('compute_ms_per_request'))} |")
    lines += ["", "Split of each request (medians): API = client latency − API queue − backend queue − compute "
                  "(HTTP, validation, image encoding, polling); API queue = waiting for a job slot; backend queue = "
                  "inside the backend before compute (Triton: gRPC round trip minus model time); compute = the "
                  "pipeline model's own time. Triton columns come from Triton's statistics (queue and "
                  "compute_infer of the pipeline model, per request)."]
    if report.get("overhead"):
        lines += ["", "## Serving overhead (served latency − in-process engine latency, same request)", "",
                  "| slug | target | endpoint / mode | runtime | served p50 (lowest level) | engine median | overhead "
                  "| per denoising step | non-compute (server metrics) | per step |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for o in report["overhead"]:
            lines.append(f"| {o['slug']} | {o['target']} | {o['endpoint']} | {o.get('runtime', 'torch')} "
                         f"| {_ms(o['served_p50_ms'])} "
                         f"| {_ms(o['engine_median_ms'])} | {_ms(o['overhead_ms'])} | {_ms(o['overhead_ms_per_step'])} "
                         f"| {_ms(o.get('non_compute_ms'))} | {_ms(o.get('non_compute_ms_per_step'))} |")
        lines += ["", "The engine median comes from " + "; ".join(
            f"{key}: {b['source']}" for key, b in (report.get("engine_baseline") or {}).items())
            + ". Non-compute = median of (client latency − backend compute) from the server's own metrics, "
              "free of cross-process timing noise."]
    if report.get("modes"):
        lines += ["", "## Pipeline modes (Triton): bls vs fused", "",
                  "| slug | level | bls p50 | fused p50 | fused / bls | bls req/s | fused req/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m in report["modes"]:
            lines.append(f"| {m['slug']} | {m['level']} | {_ms(m['bls_p50_ms'])} | {_ms(m['fused_p50_ms'])} "
                         f"| {_num(m['fused_over_bls'], '{:.3f}')} | {_num(m['bls_rps'], '{:.3f}')} "
                         f"| {_num(m['fused_rps'], '{:.3f}')} |")
    for note in report.get("notes") or []:
        lines.append(f"\nNote: {note}")
    lines += _plots_md(report)
    return "\n".join(lines) + "\n"


def render_capacity_markdown(report: dict[str, Any]) -> str:
    from benchmarks.capacity import FORMULAS_MD

    s = report["settings"]
    lines = _header(report, "Cost and GPU capacity")
    lines += [f"Inputs: p95 objective {_ms(s['slo_p95_ms'])}, target {s['target_rps']} requests/s, "
              f"${s['gpu_hour_usd']}/GPU-hour, {s['gpus_per_server']} GPU(s) per measured server, "
              f"max error rate {s['max_error_rate']}; from {', '.join(s['sources'])}.", "",
              "| slug | measured on | endpoint / mode | best level under SLO | p95 there | requests/s per GPU "
              "| images/s per GPU | GPUs for target | utilisation | $ / 1000 images | $ / 1000 images at peak |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report["plans"]:
        lines.append(
            f"| {p['slug']} | {p['measured_on']} | {p['endpoint']} | {p.get('level') or '—'} | {_ms(p.get('p95_ms'))} "
            f"| {_num(p.get('rps_per_gpu'), '{:.3f}')} | {_num(p.get('images_per_s_per_gpu'), '{:.3f}')} "
            f"| {p.get('gpus_needed') if p.get('gpus_needed') is not None else 'infeasible'} "
            f"| {_pct(p.get('utilisation'))} | {_num(p.get('usd_per_1000_images'), '${:.4f}')} "
            f"| {_num(p.get('usd_per_1000_images_at_peak'), '${:.4f}')} |")
    for p in report["plans"]:
        if p.get("reason"):
            lines.append(f"\n{p['slug']} ({p['endpoint']}): {p['reason']}")
    lines += ["", FORMULAS_MD]
    lines += _plots_md(report)
    return "\n".join(lines) + "\n"


def _label(entry: dict[str, Any]) -> str:
    """A runtime entry's name: ``torch``, or ``torch [fast]`` for torch with optimizations."""
    opts = entry.get("optimizations")
    return f"{entry['runtime']} [{opts}]" if opts else entry["runtime"]


def _stage_names(runtimes: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in runtimes:
        names += [n for n in r.get("stages", {}) if n not in names]
    return names


def _plots_md(report: dict[str, Any]) -> list[str]:
    files = report.get("files") or {}
    pngs = [(k, v) for k, v in files.items() if v.endswith(".png")]
    return ([""] + [f"![{k}]({v})" for k, v in pngs]) if pngs else []


# -- plots ------------------------------------------------------------------------------------------------

def render_plots(report: dict[str, Any], out: Path, stem: str) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional output; JSON and markdown carry the numbers
        logger.warning("matplotlib is not installed: no plots")
        return {}
    kind = report["kind"]
    paths: dict[str, Path] = {}
    if kind == "engine":
        path = out / f"{stem}-stages.png"
        if _plot_engine(report, path, plt):
            paths["plot_stages"] = path
    elif kind == "serve":
        path = out / f"{stem}-latency.png"
        if _plot_serve(report, path, plt):
            paths["plot_latency"] = path
    elif kind == "capacity":
        path = out / f"{stem}-cost.png"
        if _plot_capacity(report, path, plt):
            paths["plot_cost"] = path
    return paths


_STAGE_COLOURS = {"encode_text": "#4e79a7", "encode_image": "#f28e2b", "denoise": "#59a14f", "decode": "#e15759",
                  "other": "#bab0ac", "diffusers": "#76b7b2", "unet_step": "#59a14f", "vae_encode": "#f28e2b",
                  "vae_decode": "#e15759", "image_encode": "#b07aa1", "controlnet_step": "#edc948",
                  "transformer_step": "#9c755f"}


def _plot_engine(report: dict[str, Any], path: Path, plt) -> bool:
    ok = [r for r in report["runtimes"] if r["status"] == "ok"]
    if not ok:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    # Left: the end-to-end split per runtime (stacked), with diffusers' total beside it.
    labels, y = [], 0
    for r in ok:
        st = r["end_to_end"].get("pipeline_stages")
        if not st:
            continue
        left = 0.0
        for k in (k for k in st if k not in ("total", "denoise_per_step")):
            v = st[k]["median_ms"]
            ax1.barh(y, v, left=left, color=_STAGE_COLOURS.get(k), label=k if y == 0 else None)
            left += v
        other = max(0.0, st["total"]["median_ms"] - left) if "total" in st else 0.0
        ax1.barh(y, other, left=left, color=_STAGE_COLOURS["other"], label="other" if y == 0 else None)
        labels.append(f"ours ({_label(r)})")
        y += 1
    base = report.get("baseline")
    if base:
        ax1.barh(y, base["end_to_end"]["median_ms"], color=_STAGE_COLOURS["diffusers"], label="diffusers (total)")
        labels.append("diffusers")
        y += 1
    ax1.set_yticks(range(len(labels)), labels)
    ax1.set_xlabel("median ms per request")
    ax1.set_title("end to end")
    if labels:
        ax1.legend(fontsize=7, loc="lower right")
    # Right: each stage timed alone, per runtime.
    names = _stage_names(ok)
    width = 0.8 / len(ok)
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(names))]
        ax2.bar(xs, [r["stages"].get(n, {}).get("median_ms", 0) for n in names], width, label=_label(r))
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("median ms per call")
    ax2.set_title("stages (timed alone)")
    ax2.legend(fontsize=7)
    s = report["settings"]
    fig.suptitle(f"{s['slug']} — {s['device']} {s['precision']}" + (" full size" if s.get("full_size") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_serve(report: dict[str, Any], path: Path, plt) -> bool:
    series = [s for s in report["series"] if s["levels"]]
    if not series:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for s in series:
        xs = [lv["level"] for lv in s["levels"]]
        label = f"{s['slug']} {s['target']} {s['endpoint']}"
        line = ax1.plot(xs, [lv["latency"]["p50_ms"] for lv in s["levels"]], marker="o", label=f"{label} p50")[0]
        ax1.plot(xs, [lv["latency"]["p95_ms"] for lv in s["levels"]], marker="x", linestyle="--",
                 color=line.get_color(), label=f"{label} p95")
        ax2.plot(xs, [lv["throughput_rps"] for lv in s["levels"]], marker="o", label=label)
    unit = "concurrency" if report["settings"]["loop"] == "closed" else "offered load (req/s)"
    levels = sorted({lv["level"] for s in series for lv in s["levels"]})
    for ax, title, ylabel in ((ax1, "latency", "ms"), (ax2, "throughput", "requests/s")):
        ax.set_xlabel(unit)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [f"{lv:g}" for lv in levels])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_capacity(report: dict[str, Any], path: Path, plt) -> bool:
    curves = report.get("curves") or []
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c in curves:
        ax.plot([p["p95_ms"] for p in c["points"]], [p["usd_per_1000_images"] for p in c["points"]], marker="o",
                label=f"{c['slug']} {c['endpoint']}")
    ax.axvline(report["settings"]["slo_p95_ms"], color="grey", linestyle=":", label="p95 objective")
    ax.set_xlabel("p95 latency (ms)")
    ax.set_ylabel("$ per 1000 images")
    ax.set_title(f"cost vs latency at ${report['settings']['gpu_hour_usd']}/GPU-hour")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the results index (README table) -----------------------------------------------------------------------

def results_index(results_dir: Path | None = None) -> str:
    """Markdown tables of the newest result per (kind, slug, setting) in ``results_dir``, plus floors."""
    root = Path(results_dir or RESULTS_DIR)
    reports = []
    for path in sorted(root.glob("*.json")):
        try:
            r = load_report(path)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and r.get("schema_version") == SCHEMA_VERSION:
            r["_file"] = path.name
            reports.append(r)
    lines = ["### Engine (in-process, per request)", "",
             "| slug | device | precision | networks | runtime | ours median | ours p90 | diffusers median | ours / diffusers "
             "| floor (H100) | fraction of floor | result |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    newest: dict[tuple, dict] = {}
    for r in reports:
        if r["kind"] != "engine":
            continue
        s = r["settings"]
        key = (s["slug"], _device_tag(r), s["precision"], bool(s.get("full_size")), _is_tiny(r))
        if key not in newest or r["created_utc"] > newest[key]["created_utc"]:
            newest[key] = r
    for key in sorted(newest, key=str):
        r = newest[key]
        s = r["settings"]
        nets = "full size" if s.get("full_size") else ("tiny" if _is_tiny(r) else "checkpoint")
        gpu = r["environment"].get("gpu")
        for rt in r["runtimes"]:
            if rt["status"] != "ok":
                lines.append(f"| `{s['slug']}` | {gpu['name'] if gpu else 'CPU'} | {s['precision']} | {nets} "
                             f"| {_label(rt)} | {rt['status']} | | | | | | [{r['_file']}]({r['_file']}) |")
                continue
            e2e = rt["end_to_end"]
            ours = e2e.get("ours")
            base = r.get("baseline")
            lines.append(
                f"| `{s['slug']}` | {gpu['name'] if gpu else 'CPU'} | {s['precision']} | {nets} | {_label(rt)} "
                f"| {_ms(ours['median_ms']) if ours else _ms(e2e.get('estimated_ms')) + ' (est.)'} "
                f"| {_ms(ours['p90_ms']) if ours else '—'} "
                f"| {_ms(base['end_to_end']['median_ms']) if base and ours else '—'} "
                f"| {_num((rt.get('ratio_vs_diffusers') or {}).get('median'), '{:.3f}')} "
                f"| {_ms((r.get('floor') or {}).get('floor_ms'))} | {_pct(rt.get('fraction_of_floor'))} "
                f"| [{r['_file']}]({r['_file']}) |")
    newest_series: dict[tuple, tuple[dict, dict]] = {}
    for r in sorted((r for r in reports if r["kind"] == "serve"), key=lambda r: r["created_utc"]):
        for s in r["series"]:
            if s["levels"]:
                newest_series[(s["slug"], s["target"], s["endpoint"], _device_tag(r))] = (r, s)
    if newest_series:
        lines += ["", "### Serving (HTTP API and Triton)", "",
                  "| slug | target | endpoint / mode | device | p50 at lowest level | p95 there | best req/s "
                  "| overhead vs engine | per step | non-compute (server) | result |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for key in sorted(newest_series, key=str):
            r, s = newest_series[key]
            gpu = r["environment"].get("gpu")
            first = s["levels"][0]
            o = next((o for o in r.get("overhead") or [] if (o["slug"], o["target"], o["endpoint"])
                      == (s["slug"], s["target"], s["endpoint"])), {})
            lines.append(
                f"| `{s['slug']}` | {s['target']} | {s['endpoint']} | {gpu['name'] if gpu else 'CPU'} "
                f"| {_ms(first['latency']['p50_ms'])} | {_ms(first['latency']['p95_ms'])} "
                f"| {_num(max(lv['throughput_rps'] or 0 for lv in s['levels']), '{:.3f}')} "
                f"| {_ms(o.get('overhead_ms'))} | {_ms(o.get('overhead_ms_per_step'))} "
                f"| {_ms(first.get('non_compute_ms_median'))} | [{r['_file']}]({r['_file']}) |")
    lines += ["", "### Compute floors", "", floors.floors_markdown()]
    return "\n".join(lines) + "\n"


def rerender_markdown(results_dir: Path | None = None) -> list[Path]:
    """Rewrite ``<stem>.md`` of every report JSON in ``results_dir`` from the JSON alone."""
    out = []
    for path in sorted(Path(results_dir or RESULTS_DIR).glob("*.json")):
        report = load_report(path)
        if isinstance(report, dict) and report.get("schema_version") == SCHEMA_VERSION:
            md = path.with_suffix(".md")
            md.write_text(render_markdown(report), encoding="utf-8")
            out.append(md)
    return out


def write_results_index(results_dir: Path | None = None) -> Path:
    root = Path(results_dir or RESULTS_DIR)
    path = root / "README.md"
    path.write_text("# Benchmark results\n\nWritten by `diffserve bench report` from the JSON files in this "
                    "directory (newest per slug and setting). Tiny-model CPU results check the harness; "
                    "they say nothing about GPU speed.\n\n" + results_index(root), encoding="utf-8")
    return path
