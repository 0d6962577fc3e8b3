"""The results index: the newest result per slug and setting, as the tables of ``results/README.md``.

``results_index`` reads every stored report of the current schema in a results directory and
renders, per (slug, device, precision, networks) the newest engine result, per (slug, target,
endpoint, device) the newest serving series, and the compute floors; ``write_results_index``
writes it as that directory's README (``diffserve bench report --write``).
"""

from __future__ import annotations

from pathlib import Path

from diffserve.benchmarks import floors
from diffserve.benchmarks.record import RESULTS_DIR, device_tag, is_tiny, runtime_label, stored_reports
from diffserve.benchmarks.report import format_ms, format_num, format_pct


def results_index(results_dir: Path | None = None) -> str:
    """Markdown tables of the newest result per (kind, slug, setting) in ``results_dir``, plus floors."""
    reports = []
    for path, r in stored_reports(results_dir):
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
        key = (s["slug"], device_tag(r), s["precision"], bool(s.get("full_size")), is_tiny(r))
        if key not in newest or r["created_utc"] > newest[key]["created_utc"]:
            newest[key] = r
    for key in sorted(newest, key=str):
        r = newest[key]
        s = r["settings"]
        nets = "full size" if s.get("full_size") else ("tiny" if is_tiny(r) else "checkpoint")
        gpu = r["environment"].get("gpu")
        for rt in r["runtimes"]:
            if rt["status"] != "ok":
                lines.append(f"| `{s['slug']}` | {gpu['name'] if gpu else 'CPU'} | {s['precision']} | {nets} "
                             f"| {runtime_label(rt)} | {rt['status']} | | | | | | [{r['_file']}]({r['_file']}) |")
                continue
            e2e = rt["end_to_end"]
            ours = e2e.get("ours")
            base = r.get("baseline")
            lines.append(
                f"| `{s['slug']}` | {gpu['name'] if gpu else 'CPU'} | {s['precision']} | {nets} | {runtime_label(rt)} "
                f"| {format_ms(ours['median_ms']) if ours else format_ms(e2e.get('estimated_ms')) + ' (est.)'} "
                f"| {format_ms(ours['p90_ms']) if ours else '—'} "
                f"| {format_ms(base['end_to_end']['median_ms']) if base and ours else '—'} "
                f"| {format_num((rt.get('ratio_vs_diffusers') or {}).get('median'), '{:.3f}')} "
                f"| {format_ms((r.get('floor') or {}).get('floor_ms'))} | {format_pct(rt.get('fraction_of_floor'))} "
                f"| [{r['_file']}]({r['_file']}) |")
    newest_series: dict[tuple, tuple[dict, dict]] = {}
    for r in sorted((r for r in reports if r["kind"] == "serve"), key=lambda r: r["created_utc"]):
        for s in r["series"]:
            if s["levels"]:
                newest_series[(s["slug"], s["target"], s["endpoint"], device_tag(r))] = (r, s)
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
                f"| {format_ms(first['latency']['p50_ms'])} | {format_ms(first['latency']['p95_ms'])} "
                f"| {format_num(max(lv['throughput_rps'] or 0 for lv in s['levels']), '{:.3f}')} "
                f"| {format_ms(o.get('overhead_ms'))} | {format_ms(o.get('overhead_ms_per_step'))} "
                f"| {format_ms(first.get('non_compute_ms_median'))} | [{r['_file']}]({r['_file']}) |")
    lines += ["", "### Compute floors", "", floors.floors_markdown()]
    return "\n".join(lines) + "\n"


def write_results_index(results_dir: Path | None = None) -> Path:
    root = Path(results_dir or RESULTS_DIR)
    path = root / "README.md"
    path.write_text("# Benchmark results\n\nWritten by `diffserve bench report` from the JSON files in this "
                    "directory (newest per slug and setting). Tiny-model CPU results check the harness; "
                    "they say nothing about GPU speed.\n\n" + results_index(root), encoding="utf-8")
    return path
