"""The scale-out benchmark's pure parts: its settings checks and its images/s table (no servers)."""

import pytest

from diffserve.benchmarks.scale_out import ScaleOutConfig, scale_out_markdown, scale_out_rows


def _series(workers: int, ips: list[float]) -> dict:
    return {"workers": workers, "levels": [
        {"level": float(c), "ok": 8, "errors": 0, "images_per_s": v, "latency": {"p50_ms": 100.0 * c, "p95_ms": 150.0 * c}}
        for c, v in zip((1, 2), ips)]}


def test_rows_compare_each_concurrency_with_the_fewest_workers():
    rows = scale_out_rows([_series(1, [1.0, 1.2]), _series(2, [1.1, 1.8])])
    assert [(r["workers"], r["concurrency"], r["speedup"]) for r in rows] == [
        (1, 1, 1.0), (1, 2, 1.0), (2, 1, 1.1), (2, 2, 1.5)]
    assert rows[3]["p95_ms"] == 300.0
    table = scale_out_markdown(rows)
    assert table.splitlines()[0].startswith("| workers | concurrency |") and len(table.splitlines()) == 6


def test_a_level_without_throughput_has_no_ratio():
    rows = scale_out_rows([_series(1, [0.0, 1.0]), _series(2, [1.0, None])])
    assert rows[2]["speedup"] is None and rows[3]["speedup"] is None


@pytest.mark.parametrize("kwargs", [{"workers": (2, 1)}, {"workers": (0,)}, {"levels": ()},
                                    {"requests_per_level": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        ScaleOutConfig(**kwargs)
