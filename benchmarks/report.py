"""A benchmark report written out: its markdown table, and its JSON, markdown and plots on disk.

``render_markdown`` turns an engine, serve or capacity report into the markdown a reader
compares results with (the environment header, the tables, the notes, the formulas of a
capacity plan in ``FORMULAS_MD``); ``write_report`` stores ``<stem>.json``, ``<stem>.md`` and
the plots (``diffserve.benchmarks.plots``) under ``benchmarks/results/`` or ``--out``, the stem naming
kind, slug, device, precision and time; ``rerender_markdown`` rewrites every ``.md`` from its
JSON alone. The number formatters (``format_ms`` ...) are shared with ``diffserve.benchmarks.index``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from diffserve.benchmarks import floors
from diffserve.benchmarks.plots import render_plots
from diffserve.benchmarks.record import (
    RESULTS_DIR, SCHEMA_VERSION, device_tag, is_tiny, load_report, runtime_label, stage_names,
)

logger = logging.getLogger(__name__)

FORMULAS_MD = """### How these numbers are computed

- feasible levels L = levels with p95 ≤ objective and error rate ≤ the tolerated rate
- requests/s per GPU X = max over L of measured throughput ÷ GPUs behind the measured server
- GPUs needed N = ⌈target rate ÷ X⌉; utilisation = target ÷ (N · X)
- images/s per GPU I = X · images per request; **$ per 1000 images = price per GPU-hour ÷ (3600 · I) · 1000**
- "at peak" uses the level with the highest throughput regardless of latency
- from an engine result (no sweep): one point, throughput = 1000 ÷ median ms, p95 ≈ the end-to-end p90"""


# -- markdown -----------------------------------------------------------------------------------------

def format_ms(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def format_num(value: Any, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def format_pct(value: Any) -> str:
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
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    if report.get("command"):
        lines.append(f"- command: `{report['command']}`")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    kind = report["kind"]
    if kind == "engine":
        return render_engine_markdown(report)
    if kind == "serve":
        return render_serve_markdown(report)
    if kind == "capacity":
        return render_capacity_markdown(report)
    if kind == "batch-sweep":
        from diffserve.benchmarks.batch_sweep import sweep_markdown

        return sweep_markdown(report)
    if kind == "batching":
        from diffserve.benchmarks.batching_bench import batching_markdown

        return batching_markdown(report)
    if kind == "batching-sweep":
        from diffserve.benchmarks.batching_bench import sweep_markdown as batching_sweep_markdown

        return batching_sweep_markdown(report)
    raise ValueError(f"unknown report kind {kind!r}")


def render_engine_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    size = "full-size random weights" if s.get("full_size") else (
        "tiny random-weight checkpoint" if is_tiny(report) else f"checkpoint {s.get('checkpoint')}")
    lines = _header(report, f"Engine benchmark: {s['slug']} ({s['device']}, {s['precision']}, {size})")
    req = report.get("request", {})
    lines += [f"Request: {_request_summary(req)} ({report.get('steps')} denoising steps run); "
              f"{s['warmup']} warm-up + {s['repeats']} timed runs, "
              f"up to {s['stage_repeats']} calls per stage, each timed alone after a warm-up; "
              "device-synchronised timing.", ""]
    floor = report.get("floor") or {}
    lines += [f"Compute floor (H100): {format_ms(floor.get('floor_ms'))} — {floor.get('note', '')}"
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
            lines.append(f"| {runtime_label(r)} | {r['status']}: {r['reason']} | | | | | | |")
            continue
        e2e = r["end_to_end"]
        if "ours" not in e2e:
            lines.append(f"| {runtime_label(r)} (estimate) | {format_ms(e2e['estimated_ms'])} | — | — | — | — | — "
                         f"| {format_pct(r.get('fraction_of_floor'))} |")
            continue
        ratio = r.get("ratio_vs_diffusers") or {}
        lines.append(
            f"| {runtime_label(r)} | {format_ms(e2e['ours']['median_ms'])} | {format_ms(e2e['ours']['p90_ms'])} "
            f"| {format_ms(base['end_to_end']['median_ms']) if base else '—'} | {format_ms(base['end_to_end']['p90_ms']) if base else '—'} "
            f"| {format_num(ratio.get('median'), '{:.3f}')} | {format_num(r.get('max_abs_diff_vs_diffusers'), '{:.1e}')} "
            f"| {format_pct(r.get('fraction_of_floor'))} |")
    if base:
        lines += ["", f"Baseline: diffusers `{base['pipeline']}` over the same module objects, scheduler "
                      f"`{base['scheduler']}`, VAE in {base['vae_dtype']}, same seed; ratio below 1 means ours is faster."]
    for r in report["runtimes"]:
        if r["status"] == "ok" and "estimate" in r["end_to_end"]:
            lines += ["", f"Estimate: {r['end_to_end']['estimate']}."]
    ok = [r for r in report["runtimes"] if r["status"] == "ok"]
    if ok:
        names = stage_names(ok)
        lines += ["", "## Stages (per call)", "",
                  "| stage | " + " | ".join(f"{runtime_label(r)} median | {runtime_label(r)} p90" for r in ok) + " |",
                  "|---|" + "---:|---:|" * len(ok)]
        for n in names:
            cells = []
            for r in ok:
                st = r["stages"].get(n)
                cells += [format_ms(st["median_ms"]) if st else "—", format_ms(st["p90_ms"]) if st else "—"]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        if any(r.get("loop_overhead_per_step_ms") is not None for r in ok):
            lines += ["", "Loop overhead per step (one instrumented run: the denoise stage minus the denoiser "
                          "calls inside it, per step — scheduler, guidance, copies, Python): " + ", ".join(f"{runtime_label(r)} {format_ms(r.get('loop_overhead_per_step_ms'))}"
                                                           for r in ok)]
        if any(r.get("denoise_its") is not None for r in ok):
            published = floors.published_for_slug(s["slug"])
            lines += ["", "Iterations per second (one denoising step with both CFG halves; in the end-to-end "
                          "runs / the denoiser call alone): " + ", ".join(
                              f"{runtime_label(r)} {format_num(r.get('denoise_its'), '{:.1f}')} / "
                              f"{format_num(r.get('denoiser_its'), '{:.1f}')} it/s" for r in ok)
                      + (f". Best published H100, {published}: {floors.PUBLISHED_H100[published]}" if published
                         else "") + "."]
        if report.get("fp32_reference"):
            lines += ["", "Max abs pixel difference from eager fp32 on the same weights: " + ", ".join(
                f"{runtime_label(r)} {format_num(r.get('max_abs_diff_vs_fp32'), '{:.1e}')}" for r in ok)]
        for r in ok:
            if r.get("optimization"):
                o = r["optimization"]
                applied = "; ".join(f"{k}: {', '.join(v)}" for k, v in o["applied"].items()) or "nothing"
                lines += ["", f"{runtime_label(r)}: applied {applied}. Max abs diff vs eager torch: "
                              f"{format_num(r.get('max_abs_diff_vs_eager'), '{:.1e}')}. Load-time warm-up (compile): "
                          + (", ".join(f"{k} {v} s" for k, v in o["warmup_s"].items()) or "none")
                          + (". Fallbacks: " + "; ".join(o["fallbacks"]) if o["fallbacks"] else "") + "."]
        if any(r.get("unet_step_fraction_of_floor") is not None for r in ok):
            lines.append("")
            lines.append("UNet step fraction of floor: " + ", ".join(
                f"{runtime_label(r)} {format_pct(r.get('unet_step_fraction_of_floor'))}" for r in ok))
        split = [r for r in ok if "pipeline_stages" in r["end_to_end"]]
        if split:
            keys: list[str] = []
            for r in split:
                keys += [k for k in r["end_to_end"]["pipeline_stages"] if k not in keys and k != "total"]
            keys.append("total")
            lines += ["", "## Stage split inside the end-to-end runs (pipeline timers)", "",
                      "| stage | " + " | ".join(f"{runtime_label(r)} median" for r in split) + " |",
                      "|---|" + "---:|" * len(split)]
            for k in keys:
                lines.append(f"| {k} | " + " | ".join(
                    format_ms(r["end_to_end"]["pipeline_stages"].get(k, {}).get("median_ms")) for r in split) + " |")
    for r in report["runtimes"]:
        for note in r.get("notes") or []:
            lines.append(f"\nNote ({runtime_label(r)}): {note}")
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
                f"| {lv['errors']} | {format_ms(lv['latency']['p50_ms'])} | {format_ms(lv['latency']['p95_ms'])} "
                f"| {format_ms(lv['latency']['p99_ms'])} | {format_num(lv['throughput_rps'], '{:.3f}')} "
                f"| {format_num(lv['images_per_s'], '{:.3f}')} | {format_ms(split.get('api'))} | {format_ms(split.get('api_queue'))} "
                f"| {format_ms(split.get('backend_queue'))} | {format_ms(split.get('compute'))} "
                f"| {format_ms(tri.get('queue_ms_per_request'))} | {format_ms(tri.get('compute_ms_per_request'))} |")
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
                         f"| {format_ms(o['served_p50_ms'])} "
                         f"| {format_ms(o['engine_median_ms'])} | {format_ms(o['overhead_ms'])} | {format_ms(o['overhead_ms_per_step'])} "
                         f"| {format_ms(o.get('non_compute_ms'))} | {format_ms(o.get('non_compute_ms_per_step'))} |")
        lines += ["", "The engine median comes from " + "; ".join(
            f"{key}: {b['source']}" for key, b in (report.get("engine_baseline") or {}).items())
            + ". Non-compute = median of (client latency − backend compute) from the server's own metrics, "
              "free of cross-process timing noise."]
    if report.get("modes"):
        lines += ["", "## Pipeline modes (Triton): bls vs fused", "",
                  "| slug | level | bls p50 | fused p50 | fused / bls | bls req/s | fused req/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m in report["modes"]:
            lines.append(f"| {m['slug']} | {m['level']} | {format_ms(m['bls_p50_ms'])} | {format_ms(m['fused_p50_ms'])} "
                         f"| {format_num(m['fused_over_bls'], '{:.3f}')} | {format_num(m['bls_rps'], '{:.3f}')} "
                         f"| {format_num(m['fused_rps'], '{:.3f}')} |")
    if report.get("fused_variants"):
        lines += ["", "## Step-level batching (Triton fused pipeline model): batched vs unbatched", "",
                  "| slug | variant | level | images/s | vs lowest level | vs unbatched | p50 | p95 "
                  "| requests per UNet call (mean of each request's largest) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v in report["fused_variants"]:
            lines.append(f"| {v['slug']} | {v['variant']} | {v['level']} | {format_num(v['images_per_s'], '{:.3f}')} "
                         f"| {format_num(v['vs_lowest_level'], '{:.2f}x')} | {format_num(v['vs_unbatched'], '{:.2f}x')} "
                         f"| {format_ms(v['p50_ms'])} | {format_ms(v['p95_ms'])} "
                         f"| {format_num(v['batch_requests_mean'], '{:.2f}')} |")
        lines += ["", "Variants: the fused model reloaded with step batching on (`batched`: one instance takes "
                      "`max_batch` requests in flight) or off (`unbatched`: one request at a time per instance), "
                      "`-xN`: N instances (N copies of the weights). A batched instance answers from worker threads "
                      "after `execute` has returned, so Triton's queue/compute columns do not describe it."]
    queueing = [(series, q) for series in report["series"] for q in series.get("queueing") or []]
    if queueing:
        lines += ["", "## Queueing model: predicted vs measured p95 (open loop)", "",
                  "| slug | target | endpoint / mode | arrival rate (req/s) | servers | utilisation | predicted p50 "
                  "| measured p50 | predicted p95 | measured p95 | ok / errors |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for series, q in queueing:
            lines.append(f"| {series['slug']} | {series['target']} | {series['endpoint']} | {q['arrival_rate']:g} "
                         f"| {q['servers']} | {format_pct(q.get('utilisation'))} | {format_ms(q.get('predicted_p50_ms'))} "
                         f"| {format_ms(q.get('measured_p50_ms'))} | {format_ms(q.get('predicted_p95_ms'))} "
                         f"| {format_ms(q.get('measured_p95_ms'))} | {q['measured_ok']} / {q['measured_errors']} |")
        lines += [f"\n{series['slug']} {series['endpoint']} at {q['arrival_rate']:g} req/s: {q['reason']}"
                  for series, q in queueing if q.get("reason")]
        n = sorted({len((series.get("service") or {}).get("samples_ms") or []) for series, _ in queueing})
        lines += ["", f"Service times: {', '.join(map(str, n))} successful requests per series, timed back to "
                      "back before the rates. " + QUEUEING_MD.split("\n", 2)[2].replace("\n", " ")]
    for note in report.get("notes") or []:
        lines.append(f"\nNote: {note}")
    lines += _plots_md(report)
    return "\n".join(lines) + "\n"


QUEUEING_MD = """### Queueing model

A GPU serves one request at a time; requests arrive as a Poisson process and wait in one FCFS queue
for the first free GPU (M/G/c). Service times are the measured latencies of requests that met no
queue, drawn with replacement; p50/p95/p99 of wait + service come from a discrete-event simulation
of that queue (the first 10 % of simulated requests left out as warm-up). The Allen–Cunneen column
is the analytic mean wait, Erlang C × (1 + c_s²) / 2, as a cross-check. Utilisation ≥ 1: unstable."""


def queueing_rows_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| slug | endpoint / mode | arrival rate (req/s) | GPUs | utilisation | predicted p50 | predicted p95 "
             "| predicted p99 | mean wait | mean wait (Allen–Cunneen) | P(wait) | service samples |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for q in rows:
        lines.append(f"| {q['slug']} | {q['endpoint']} | {q['arrival_rate']:g} | {q['gpus']} "
                     f"| {format_pct(q.get('utilisation'))} | {format_ms(q.get('p50_ms'))} | {format_ms(q.get('p95_ms'))} "
                     f"| {format_ms(q.get('p99_ms'))} | {format_ms(q.get('mean_wait_ms'))} "
                     f"| {format_ms(q.get('mean_wait_ms_allen_cunneen'))} | {format_pct(q.get('p_wait'))} "
                     f"| {q.get('service_n')} ({q.get('service_source')}) |")
    lines += [f"\n{q['slug']} ({q['endpoint']}) at {q['arrival_rate']:g} req/s: {q['reason']}"
              for q in rows if q.get("reason")]
    return lines


def render_capacity_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = _header(report, "Cost and GPU capacity")
    if s.get("slo_p95_ms") is not None and s.get("target_rps") is not None:
        lines += [f"Inputs: p95 objective {format_ms(s['slo_p95_ms'])}, target {s['target_rps']} requests/s, "
                  f"${s['gpu_hour_usd']}/GPU-hour, {s['gpus_per_server']} GPU(s) per measured server, "
                  f"max error rate {s['max_error_rate']}; from {', '.join(s['sources'])}.", "",
                  "| slug | measured on | endpoint / mode | best level under SLO | p95 there | requests/s per GPU "
                  "| images/s per GPU | GPUs for target | utilisation | $ / 1000 images | $ / 1000 images at peak |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in report["plans"]:
            lines.append(
                f"| {p['slug']} | {p['measured_on']} | {p['endpoint']} | {p.get('level') or '—'} | {format_ms(p.get('p95_ms'))} "
                f"| {format_num(p.get('rps_per_gpu'), '{:.3f}')} | {format_num(p.get('images_per_s_per_gpu'), '{:.3f}')} "
                f"| {p.get('gpus_needed') if p.get('gpus_needed') is not None else 'infeasible'} "
                f"| {format_pct(p.get('utilisation'))} | {format_num(p.get('usd_per_1000_images'), '${:.4f}')} "
                f"| {format_num(p.get('usd_per_1000_images_at_peak'), '${:.4f}')} |")
        for p in report["plans"]:
            if p.get("reason"):
                lines.append(f"\n{p['slug']} ({p['endpoint']}): {p['reason']}")
        lines += ["", FORMULAS_MD]
    if report.get("queueing") is not None:
        q = s.get("queueing") or {}
        sizing = (f"GPUs: {', '.join(map(str, q['gpus']))}" if q.get("gpus")
                  else f"the fewest GPUs meeting a p95 of {format_ms(q.get('slo_p95_ms'))}")
        lines += ["", "## Predicted latency (queueing model)", "",
                  f"From {', '.join(s['sources'])}; {sizing}; {q.get('customers')} simulated requests each.", ""]
        lines += queueing_rows_md(report["queueing"])
        lines += ["", QUEUEING_MD]
    lines += _plots_md(report)
    return "\n".join(lines) + "\n"


def _plots_md(report: dict[str, Any]) -> list[str]:
    files = report.get("files") or {}
    pngs = [(k, v) for k, v in files.items() if v.endswith(".png")]
    return ([""] + [f"![{k}]({v})" for k, v in pngs]) if pngs else []


# -- writing -------------------------------------------------------------------------------------------

def default_stem(report: dict[str, Any]) -> str:
    s = report.get("settings", {})
    stamp = report["created_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")[:15]
    if report["kind"] == "engine":
        size = "full" if s.get("full_size") else ("tiny" if is_tiny(report) else "ckpt")
        parts = ["engine", s.get("slug"), device_tag(report), s.get("precision"), size]
    elif report["kind"] == "serve":
        target = s.get("backend") or ("triton" if s.get("target") == "triton only" else "api")
        parts = ["serve", "+".join(s.get("slugs", [])), device_tag(report), target]
    else:
        parts = [report["kind"]]
    return "-".join(str(p) for p in parts if p) + f"-{stamp}"


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
