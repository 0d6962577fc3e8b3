"""``diffserve bench store``: both durability modes timed, and the modes really differ in SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from diffserve.benchmarks.store_bench import run, submit_latency_ms


def test_store_bench_times_both_modes(tmp_path: Path) -> None:
    table = run(5, tmp_path).splitlines()
    assert table[0] == "| synchronous | jobs | median ms | p95 ms |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["FULL", "NORMAL"]
    assert all(float(row.split("|")[3]) > 0 for row in table[2:])


def test_each_mode_commits_every_row(tmp_path: Path) -> None:
    for mode in ("FULL", "NORMAL"):
        path = tmp_path / f"{mode}.sqlite3"
        assert len(submit_latency_ms(path, mode, 7)) == 7
        assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 7
