"""``diffserve bench store``: what a durable submission costs on this disk.

A ``POST /v2`` answers after one SQLite transaction has committed the job's row (``diffserve.api.jobs``:
WAL journal, ``BEGIN IMMEDIATE``, one INSERT of the request's JSON). This times that commit,
one writer, in a fresh database per mode, with ``synchronous=FULL`` (the WAL fsynced at every
commit: an accepted job survives a power loss) and ``NORMAL`` (fsync only at checkpoints: a
power loss can roll back the last commits), and prints the median and p95. The difference is
the fsync; it depends on the disk and its write cache, so measure where you deploy. (The
benchmarks layer does not import ``api``; the statements mirror ``diffserve.api.jobs.JobStore.create``.)
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

MODES = ("FULL", "NORMAL")
_ROW = json.dumps({"prompt": "a lighthouse at dusk, volumetric light, 35 mm", "steps": 20, "seed": 42,
                   "negative_prompt": "blurry", "guidance_scale": 7.5, "scheduler": "dpmpp_2m"})


def submit_latency_ms(path: Path, synchronous: str, jobs: int) -> list[float]:
    """Milliseconds of each of ``jobs`` consecutive one-row commits into a new database at ``path``."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                   "params TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL)")
        latencies = []
        for _ in range(jobs):
            started = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO jobs (id, params, status, created_at) VALUES (?, ?, 'QUEUED', ?)",
                       (uuid.uuid4().hex, _ROW, time.time()))
            db.execute("COMMIT")
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        db.close()
    return latencies


def run(jobs: int, directory: Path | None) -> str:
    """The markdown table for both modes (``directory``: where the databases go; default the system's
    temp dir, which may be a tmpfs: pass the disk the data directory will live on)."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        rows = []
        for mode in MODES:
            ms = sorted(submit_latency_ms(Path(tmp) / f"{mode.lower()}.sqlite3", mode, jobs))
            p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
            rows.append(f"| {mode} | {jobs} | {statistics.median(ms):.3f} | {p95:.3f} |")
    return "\n".join(["| synchronous | jobs | median ms | p95 ms |", "|---|---|---|---|", *rows])
