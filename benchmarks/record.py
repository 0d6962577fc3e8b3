"""The benchmark record: a report as a plain JSON-able dict, where it is stored, and how it is read.

Every benchmark returns ``new_report(kind, environment)`` filled with its settings and numbers
(``kind`` is ``engine``, ``serve`` or ``capacity``; ``schema_version`` says which layout it
has). Reports are stored as ``<stem>.json`` under ``RESULTS_DIR`` (``benchmarks/results/``)
or another directory; ``stored_reports`` reads back those of the current schema. The small
facts several readers derive from a record (the device tag, whether it ran on a tiny demo
checkpoint, a runtime entry's label, the stage names) live here, below the markdown, the plots
and the index that use them.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterator

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1


def new_report(kind: str, env: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "schema_version": SCHEMA_VERSION,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "environment": env}


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def stored_reports(results_dir: Path | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path, report)`` of every readable report of the current schema in ``results_dir``, by name."""
    for path in sorted(Path(results_dir or RESULTS_DIR).glob("*.json")):
        try:
            report = load_report(path)
        except (OSError, ValueError):  # a half-written or foreign JSON file is not a result
            continue
        if isinstance(report, dict) and report.get("schema_version") == SCHEMA_VERSION:
            yield path, report


def device_tag(report: dict[str, Any]) -> str:
    """``cpu``, or the GPU's name as a file-name part (``h100_80gb_hbm3``)."""
    gpu = report["environment"].get("gpu")
    if gpu:
        return gpu["name"].replace("NVIDIA ", "").replace(" ", "_").lower()
    return "cpu"


def is_tiny(report: dict[str, Any]) -> bool:
    """Whether the run used a tiny random-weight demo checkpoint (its numbers check the harness only)."""
    ckpt = report.get("settings", {}).get("checkpoint") or ""
    return "tiny-" in Path(ckpt).name


def runtime_label(entry: dict[str, Any]) -> str:
    """A runtime entry's name: ``torch``, or ``torch [fast]`` for torch with optimizations."""
    opts = entry.get("optimizations")
    return f"{entry['runtime']} [{opts}]" if opts else entry["runtime"]


def stage_names(runtimes: list[dict[str, Any]]) -> list[str]:
    """The stages timed by any of ``runtimes``, in first-seen order."""
    names: list[str] = []
    for r in runtimes:
        names += [n for n in r.get("stages", {}) if n not in names]
    return names
