"""The full-size end-to-end command's wiring, on the tiny checkpoints: export, Triton, HTTP, the JSON."""

from __future__ import annotations

import json

import pytest

from diffserve.benchmarks.full_size_e2e import main


pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


def test_full_size_e2e_wiring_on_the_tiny_models(tmp_path, diffserve_home):
    out = tmp_path / "e2e.json"
    assert main(["--tiny", "--slugs", "sd1.5-scifi,sd1.5-img2img", "--work-dir", str(tmp_path / "work"),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["repository"]["components"] == []  # the deployment default: fused only
    assert report["repository"]["pipelines"] == ["sd1.5-img2img", "sd1.5-scifi"]
    assert report["export_s"] > 0 and report["export_peak_rss_gib"] > 0.1
    # one checkpoint's weight files, counted once for the two slugs that share it
    assert 0 < report["weights_gib"] < 0.1 and report["export_peak_rss_over_weights"] > 1
    assert report["environment"]["machine"]["cpu_count"] and len(report["load_average"]["start"]) == 3
    assert report["triton_ready_s"] > 0 and report["serving_peak_rss_gib"] > 0.1
    for slug in ("sd1.5-scifi", "sd1.5-img2img"):
        r = report["requests"][slug]
        assert r["shape"] == [512, 512, 3] and r["finite"] and r["not_uniform"] and r["latency_s"] > 0
