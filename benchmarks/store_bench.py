"""``diffserve bench store``: what a durable submission costs on this disk.

Times :meth:`api.jobs.JobStore.create` (one job row committed, as a ``POST /v2`` does before its
200) with SQLite ``synchronous=FULL`` and ``NORMAL`` in a fresh database each, one writer, and
prints the median and p95 per mode. The difference is the fsync of the WAL at every commit that
FULL adds; it depends on the disk (and its write cache), so measure where you deploy.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from api.jobs import JobStore

MODES = ("FULL", "NORMAL")


def submit_latency_ms(directory: Path, synchronous: str, jobs: int) -> list[float]:
    """Milliseconds of each of ``jobs`` consecutive creates in a new store under ``directory``."""
    data = directory / synchronous.lower()
    store = JobStore(data / "jobs.sqlite3", outputs_dir=data / "outputs", synchronous=synchronous)
    params = {"prompt": "a lighthouse at dusk", "steps": 20, "seed": 42}
    latencies = []
    try:
        for _ in range(jobs):
            started = time.perf_counter()
            store.create("sd1.5-scifi", params)
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        store.close()
    return latencies


def run(jobs: int, directory: Path | None) -> str:
    """The markdown table for both modes (``directory``: where the databases go; default a temp dir
    under the system's, which may be a tmpfs: pass the disk the data directory will live on)."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        rows = []
        for mode in MODES:
            ms = sorted(submit_latency_ms(Path(tmp), mode, jobs))
            p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
            rows.append(f"| {mode} | {jobs} | {statistics.median(ms):.3f} | {p95:.3f} |")
    return "\n".join(["| synchronous | jobs | median ms | p95 ms |", "|---|---|---|---|", *rows])
