"""PNG plots of a benchmark report: engine stages, serving latency and throughput, cost vs latency.

``render_plots(report, out, stem)`` draws the one figure of a report's kind — the engine's
end-to-end split and per-stage times per runtime (``<stem>-stages.png``), the serving sweep's
p50/p95 and throughput per level (``<stem>-latency.png``), capacity's cost per 1000 images
against p95 (``<stem>-cost.png``) — with matplotlib's Agg backend. Plots are optional output:
without matplotlib none are drawn, and the JSON and markdown still carry every number.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffserve.benchmarks.record import runtime_label, stage_names

logger = logging.getLogger(__name__)


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
        labels.append(f"ours ({runtime_label(r)})")
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
    names = stage_names(ok)
    width = 0.8 / len(ok)
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(names))]
        ax2.bar(xs, [r["stages"].get(n, {}).get("median_ms", 0) for n in names], width, label=runtime_label(r))
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
