"""The capacity planner's queueing model, and the open-loop run that checks it against a server.

The model is checked against closed forms where they exist (M/M/1's sojourn-time tail, Erlang C
for M/M/c, Pollaczek-Khinchine for M/D/1); the open-loop run against a real ``diffserve serve``
on Triton is checked for what it reports (predicted and measured p95 per rate), never for how
close the two are on this shared machine.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffserve.benchmarks import capacity


pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


@pytest.fixture(scope="module")
def exponential_service_s() -> np.ndarray:
    return np.random.default_rng(1).exponential(1.0, 50_000)  # mean 1 s


def test_simulation_matches_mm1_and_mmc_closed_forms(exponential_service_s):
    # M/M/1, lambda 0.5, mu 1: the sojourn time is exponential with rate mu - lambda.
    mm1 = capacity.simulate_queue(exponential_service_s, 0.5, 1, customers=200_000)
    assert mm1["p95"] == pytest.approx(math.log(20) / 0.5, rel=0.06)
    assert mm1["mean"] == pytest.approx(1 / 0.5, rel=0.06)
    # M/M/2 at lambda 1.5: the mean wait is Erlang C / (c mu - lambda).
    mm2 = capacity.simulate_queue(exponential_service_s, 1.5, 2, customers=200_000)
    exact = capacity.erlang_c(2, 1.5) / (2 - 1.5)
    assert capacity.erlang_c(2, 1.5) == pytest.approx(0.642857, rel=1e-5)  # 2 rho^2 / (1 + rho), rho = 0.75
    assert mm2["mean_wait"] == pytest.approx(exact, rel=0.08)
    assert mm2["p_wait"] == pytest.approx(capacity.erlang_c(2, 1.5), rel=0.05)
    assert capacity.allen_cunneen_wait_s(exponential_service_s, 1.5, 2) == pytest.approx(exact, rel=0.03)


def test_simulation_matches_pollaczek_khinchine_for_deterministic_service():
    # M/D/1 at rho 0.6: W_q = rho / (2 mu (1 - rho)); Allen-Cunneen is exact for M/G/1.
    md1 = capacity.simulate_queue([1.0], 0.6, 1, customers=200_000)
    assert md1["mean_wait"] == pytest.approx(0.6 / (2 * 0.4), rel=0.05)
    assert capacity.allen_cunneen_wait_s([1.0, 1.0], 0.6, 1) == pytest.approx(0.75)
    # Light load on many servers: nobody waits, the p95 is the service time's own.
    light = capacity.simulate_queue([1.0, 2.0], 0.1, 8, customers=5_000)
    assert light["p_wait"] < 0.01 and light["p95"] == pytest.approx(2.0)


def test_predictions_unstable_queues_and_the_fewest_gpus():
    service_ms = [800.0] * 9 + [1200.0]  # mean 840 ms: one GPU serves at most 1.19 req/s
    p = capacity.predict_latency(service_ms, 1.0, 1, customers=20_000)
    assert p["utilisation"] == pytest.approx(0.84) and p["reason"] is None
    assert 1200 <= p["p95_ms"] and p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
    assert p["mean_wait_ms_allen_cunneen"] > 0 and 0 < p["p_wait"] <= 1
    two = capacity.predict_latency(service_ms, 1.0, 2, customers=20_000)
    assert two["p95_ms"] < p["p95_ms"]  # a second GPU shortens the queue
    unstable = capacity.predict_latency(service_ms, 2.5, 2, customers=20_000)
    assert unstable["p95_ms"] is None and "unstable" in unstable["reason"]
    sized = capacity.fewest_gpus(service_ms, 5.0, 1500.0, customers=20_000)
    assert sized["gpus"] >= 5 and sized["p95_ms"] <= 1500 and sized["reason"] is None  # 5 req/s x 0.84 s > 4 GPUs
    fewer = capacity.predict_latency(service_ms, 5.0, sized["gpus"] - 1, customers=20_000)
    assert fewer["p95_ms"] is None or fewer["p95_ms"] > 1500
    impossible = capacity.fewest_gpus(service_ms, 1.0, 1000.0, customers=20_000)
    assert "infeasible" in impossible["reason"]  # the 1.2 s requests alone miss it
    with pytest.raises(ValueError):
        capacity.QueueingInputs(arrival_rates=(1.0,))  # neither GPUs nor an objective


def test_capacity_cli_predicts_from_a_closed_loop_report(tmp_path, capsys):
    from diffserve.benchmarks.cli import main

    report = {"kind": "serve", "schema_version": 1, "created_utc": "2025-01-01T00:00:00+00:00",
              "environment": {"gpu": None}, "settings": {"loop": "closed"},
              "series": [{"slug": "sd1.5-scifi", "target": "api", "endpoint": "sync", "images_per_request": 1,
                          "levels": [{"level": 1, "throughput_rps": 1.2, "requests": 10, "errors": 0,
                                      "latency": {"p95_ms": 1200.0}, "samples_ms": [800.0] * 9 + [1200.0]}]}]}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(report))
    assert main(["capacity", "--report", str(path), "--arrival-rate", "0.5,1", "--gpus", "1,2",
                 "--customers", "5000", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Predicted latency (queueing model)" in out and "closed-loop level 1" in out
    stored = json.loads(next(tmp_path.glob("capacity-*.json")).read_text())
    assert [(q["arrival_rate"], q["gpus"]) for q in stored["queueing"]] == [(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]
    assert all(q["p95_ms"] > 0 for q in stored["queueing"]) and stored["plans"] == []
    # Both at once: the plan from the measured curve and the model's sizing for the objective.
    assert main(["capacity", "--report", str(path), "--arrival-rate", "3", "--slo-p95-ms", "2000",
                 "--target-rps", "3", "--gpu-hour-usd", "2", "--customers", "5000", "--out", str(tmp_path),
                 "--name", "both", "--no-plots"]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["plans"][0]["gpus_needed"] == 3 and both["queueing"][0]["gpus"] >= 3
    assert main(["capacity", "--report", str(path)]) == 2  # no plan inputs and no arrival rate


def test_open_loop_run_reports_predicted_and_measured_p95(tiny_checkpoints, tmp_path):
    """A real `diffserve serve` on Triton (fused), Poisson arrivals at two rates (under the Triton lock)."""
    import asyncio

    from diffserve.benchmarks.report import render_markdown
    from diffserve.benchmarks.serve_bench import ServeBenchConfig, run_serve_bench

    # img2img at strength 0.1 runs 2 denoising steps: a short service time, so low rates stay stable.
    cfg = ServeBenchConfig(slugs=("sd1.5-img2img",), start_server=True, server_backend="triton", endpoints=("sync",),
                           loop="open", levels=(0.4, 0.8), requests_per_level=3, params={"strength": 0.1},
                           predict=True, service_requests=4, modes=("fused",), triton_runtime="torch",
                           triton_pipeline_instances=1, engine_baseline="none", work_dir=tmp_path, threads=1)
    report = asyncio.run(run_serve_bench(cfg))
    (series,) = report["series"]
    assert series["service"]["ok"] == 4 and len(series["service"]["samples_ms"]) == 4
    rows = series["queueing"]
    assert [q["arrival_rate"] for q in rows] == [0.4, 0.8]
    for q, lv in zip(rows, series["levels"]):
        assert q["measured_p95_ms"] == lv["latency"]["p95_ms"] and q["measured_p95_ms"] > 0
        assert q["servers"] == 1 and q["reason"] is None and q["predicted_p95_ms"] > 0
        assert q["predicted_p50_ms"] <= q["predicted_p95_ms"] and 0 < q["utilisation"] < 1
    assert report["settings"]["queueing"] == {"service_requests": 4, "servers": 1}
    md = render_markdown(report)
    section = md.split("## Queueing model: predicted vs measured p95 (open loop)", 1)[1].split("\n\n")[1]
    assert section.count("| sd1.5-img2img | api | sync | 0.") == 2
    with pytest.raises(ValueError, match="open-loop"):
        ServeBenchConfig(start_server=True, predict=True)
