"""benchmarks/gpu/run.sh, the prepared one-call GPU run, checked on the CPU through DRY_RUN=1.

The dry run goes through the same plan, processes, engine benchmark and summary as the GPU run, on
tiny configs (benchmarks/configs/tiny), so the script cannot break unnoticed where no GPU is. No
network: the full-size path builds its networks and an offline tokenizer from configs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
PLAN_ORDER = ("segmind-vega-1024x1024", "sd1.5-scifi-512x768", "unet-batch-sweep", "batching-sweep",
              "ominicontrol-512x512", "omni-zero-1024x1024", "sd1.5-scifi-512x512")
DRY_STEPS = ("sd1.5-scifi-512x768", "unet-batch-sweep", "batching-sweep", "ominicontrol-512x512",
             "omni-zero-1024x1024")
"""The dry run's steps: one of each kind (an end-to-end pipeline, the batch sweep, the batching sweep, both
networks-only slugs). Vega runs the same code as SD1.5 at four times the pixels: left to the GPU run (the
batching sweep runs its Vega part too, at 128²: the SDXL inputs through the batcher)."""
NETWORK_STEPS = ("ominicontrol-512x512", "omni-zero-1024x1024")


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                "DIFFSERVE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=1200)


def _step_reports(out: Path) -> dict[str, dict]:
    with tarfile.open(out / "steps.tar") as tar:
        return {m.name: json.load(tar.extractfile(m)) for m in tar.getmembers()}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_plan_is_ordered_by_value():
    from diffserve.benchmarks.gpu.runner import PLAN

    assert tuple(s.name for s in PLAN) == PLAN_ORDER
    vega, sd15 = PLAN[0], PLAN[1]
    assert vega.params == {"img_width": 1024, "img_height": 1024, "num_inference_steps": 25, "scheduler": "UniPC",
                           "guidance_scale": 9}
    assert sd15.params["scheduler"] == "dpmpp_2m" and sd15.params["num_inference_steps"] == 30
    assert sd15.vae == "fp16" and vega.vae is None  # like for like: diffusers' SD1.5 pipeline decodes in fp16
    assert next(s for s in PLAN if s.slug == "ominicontrol").precision == "bf16"
    assert [s.fp32_reference for s in PLAN if s.kind == "engine"] == [True, True, False, False, False]
    from diffserve.benchmarks.gpu.runner import step_config

    gpu = step_config(vega, False, Path("/nonexistent"))  # the request counts that fit the plan into BUDGET_S
    assert (gpu.warmup, gpu.eager_warmup, gpu.repeats, gpu.stage_repeats) == (2, 1, 3, 5)
    assert step_config(vega, True, Path("/nonexistent")).eager_warmup is None  # dry run: warmup 0 for all
    batching = next(s for s in PLAN if s.kind == "batching-sweep")
    assert batching.precision == "fp16" and tuple(batching.params["concurrency"]) == (1, 2, 4, 8, 16)
    assert batching.params["slugs"]["sd1.5-scifi"]["num_inference_steps"] == 20
    assert batching.params["slugs"]["sd1.5-scifi"]["img_width"] == 512
    assert batching.params["slugs"]["segmind-vega"]["img_width"] == 1024
    assert batching.min_s <= batching.max_s and batching.optional


@pytest.mark.slow
def test_dry_run_writes_every_step(tmp_path):
    proc = _run(tmp_path, BUDGET_S="1100", STEPS=",".join(DRY_STEPS))  # generous: a loaded CPU must not trip the guard
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["run.log", "steps.tar", "summary.json", "summary.md"]  # the device tool brings back 8 at most
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["budget_s"] == 1100
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(DRY_STEPS)  # the plan's order
    reports = _step_reports(out)
    assert sorted(reports) == sorted(s["json"] for s in steps.values())
    for name, step in steps.items():
        assert step["status"] == "ok", (name, step.get("reason"))
        report = reports[step["json"]]
        assert report["gpu_run"]["step"] == name
        if step["kind"] == "engine":
            assert step["json"].startswith(f"dryrun-engine-{step['slug']}-{step['resolution']}-cpu-")
            assert step["floor_ms"] > 0 and report["settings"]["full_size"]
            assert report["full_size"]["configs"].endswith("configs/tiny")

    entries = steps["sd1.5-scifi-512x768"]["entries"]
    labels = [e["entry"] for e in entries]
    assert labels[0].startswith("diffusers ") and labels[1] == "torch eager"
    assert labels[2] == "torch [fuse_qkv,channels_last,device_scheduler,vae=fp16]"  # `fast` less compile on the CPU
    for e in entries:
        assert e["status"] == "ok" and e["median_ms"] > 0 and e["p90_ms"] >= e["median_ms"]
        assert e["ratio_vs_diffusers"] > 0 and e["speedup_vs_diffusers"] == pytest.approx(
            1 / e["ratio_vs_diffusers"], rel=1e-2)
        assert "fraction_of_floor" in e and e["fraction_of_floor"] is None  # GPU only
        assert e["max_abs_diff_vs_fp32"] is not None and e["max_abs_diff_vs_fp32"] < 1e-2
        assert e["image_check"]["ok"] and e["image_check"]["finite"] and e["image_check"]["std"] > 1e-3
        assert e["vae_dtype"] == "float32"  # vae=fp16 asked, but the CPU runs fp16 as fp32
    for e in entries[1:]:
        assert e["denoise_its"] > 0 and e["denoiser_its"] > 0
        assert {"encode_text", "denoise", "decode"} <= set(e["stage_split_ms"])
        assert "unet_step" in e["stages_ms"] and "first_run_excess_s" in e
    fast = entries[2]
    assert fast["within_tolerance_vs_eager"] is True  # README tolerance, fp32
    check = fast["denoiser_check"]
    assert check["ok"] and check["finite"] and check["outputs_follow_inputs"] and check["inputs"] == 2
    assert check["rel_l2"] < 1e-4  # fp32: fused QKV and channels-last only reorder sums
    assert fast["compile_counters"]["unique_graphs"] == 0  # nothing compiled in the dry run
    assert steps["sd1.5-scifi-512x768"]["steps_run"] == 20  # the catalog's fewest for SD1.5

    sweep = steps["unet-batch-sweep"]["entries"]
    assert [(e["entry"].split(" batch ")[0].split()[0], e["batch"]) for e in sweep] == [
        ("sd1.5-scifi", 1), ("sd1.5-scifi", 2), ("segmind-vega", 1), ("segmind-vega", 2)]
    for e in sweep:
        assert e["status"] == "ok" and e["finite"] and e["eager_ms"] > 0 and e["image_steps_per_s"] > 0
        assert "graph_ms" not in e  # no CUDA graphs off CUDA
    assert [e["throughput_vs_batch_1"] for e in sweep if e["batch"] == 1] == [1.0, 1.0]

    batching = steps["batching-sweep"]
    assert batching["json"].startswith("dryrun-batching-sweep-cpu-fp32-")
    assert [(e["slug"], e["concurrency"], e["mode"]) for e in batching["entries"]] == [
        (slug, c, mode) for slug in ("sd1.5-scifi", "segmind-vega") for c in (1, 2) for mode in ("unbatched", "batched")]
    for e in batching["entries"]:
        assert e["status"] == "ok" and e["images_per_s"] > 0 and e["p95_s"] >= e["p50_s"] > 0
        assert e["requests"] == e["concurrency"] and e["steps"] == 2 and e["resolution"] == "128x128"
        if e["mode"] == "batched":
            assert 2 <= e["mean_call_rows"] <= 2 * e["concurrency"]  # CFG: 2 rows per request
        else:
            assert e["mean_call_rows"] is None
            assert e["max_pixel_diff_vs_alone"] == 0.0  # the same request alone, in another thread
        assert e["max_pixel_diff_vs_alone"] < 1e-3  # fp32: batched rows only reorder sums
    report = reports[batching["json"]]
    assert [sw["settings"]["slug"] for sw in report["sweeps"]] == ["sd1.5-scifi", "segmind-vega"]
    assert report["settings"]["optimizations"] == "fuse_qkv,device_scheduler"

    for name in NETWORK_STEPS:
        (e,) = steps[name]["entries"]
        assert e["status"] == "ok" and e["estimated_ms"] > 0 and e["denoiser_its"] > 0
    cc = steps["ominicontrol-512x512"]["entries"][0]["condition_cache"]
    assert cc["condition_tokens"] == 1024 and cc["steps"] == 4
    assert cc["cached_estimate_ms"] > 0 and cc["joint_estimate_ms"] > 0 and cc["cached_vs_joint"] > 0
    md = (out / "summary.md").read_text()
    assert "ominicontrol-512x512, the condition (1024 tokens, 4 steps" in md
    assert "DRY RUN" in md and "| step | entry | median | p90 | ours / diffusers |" in md
    assert "| network | batch | eager | CUDA graph | image-steps/s |" in md
    assert "| network | steps | concurrency | mode | images/s | vs unbatched |" in md
    assert "| sd1.5-scifi 128x128 | 2 | 2 | batched |" in md
    assert "# Step-level batching at full size (cpu, fp32)" in md  # the step's own markdown
    for name in steps:
        assert f"| {name} |" in md
    assert md.count("# Engine benchmark:") == 3  # every engine step's own markdown follows the table
    assert "# Denoiser throughput against batch size" in md
    assert "step sd1.5-scifi-512x768: starting," in (out / "run.log").read_text()


@pytest.mark.slow
def test_a_step_killed_mid_way_keeps_the_entries_it_finished(tmp_path):
    from diffserve.benchmarks.gpu.runner import CRASH_AFTER_ENTRIES

    # The step dies (as at the deadline or on an out-of-memory kill) right after its first entry.
    proc = _run(tmp_path, BUDGET_S="1100", STEPS="sd1.5-scifi-512x768", **{CRASH_AFTER_ENTRIES: "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]  # something was measured
    out = tmp_path / "out"
    (step,) = json.loads((out / "summary.json").read_text())["steps"]
    assert step["status"] == "partial" and step["reason"].startswith("exit status 137")
    assert [e["entry"] for e in step["entries"]] == ["torch eager"]
    assert step["entries"][0]["median_ms"] > 0 and step["entries"][0]["image_check"]["ok"]
    (report,) = _step_reports(out).values()
    assert step["json"].endswith(".partial.json") and report["gpu_run"]["partial"] is True
    assert "partial: exit status 137" in (out / "summary.md").read_text()


def test_time_guard_skips_what_cannot_finish(tmp_path):
    proc = _run(tmp_path, BUDGET_S="0.001", STEPS="sd1.5-scifi,ominicontrol-512x512")
    assert proc.returncode == 1  # nothing measured
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["sd1.5-scifi-512x768", "unet-batch-sweep", "batching-sweep",
                                                      "ominicontrol-512x512", "sd1.5-scifi-512x512"]
    for s in summary["steps"]:
        assert s["status"] == "skipped" and s["reason"].startswith("time guard: needs ~")
    assert "skipped: time guard" in (tmp_path / "out" / "summary.md").read_text()


def test_batching_sweep_keeps_the_points_it_finished(tmp_path, monkeypatch):
    """The batching step writes its report after every point: a step stopped mid-way keeps them, and the
    summary renders them."""
    import types

    from diffserve.benchmarks import batching_bench, full_size
    from diffserve.benchmarks.gpu import runner

    point = {"concurrency": 1, "mode": "unbatched", "status": "ok", "requests": 1, "images_per_s": 2.0, "p50_s": 0.5,
             "p95_s": 0.5, "mean_call_rows": None, "max_pixel_diff_vs_alone": 0.0, "over_unbatched": 1.0}

    def fake_bench(*, slug, on_point, width, height, steps, **_):
        sweep = {"kind": "batching", "environment": {}, "settings": {"slug": slug, "width": width, "height": height,
                                                                      "steps": steps}, "points": [point]}
        on_point(sweep)
        raise SystemExit("killed after the first point")  # as the deadline or an out-of-memory kill

    monkeypatch.setattr(full_size, "full_size_setup", lambda *a, **k: types.SimpleNamespace(components=None))
    monkeypatch.setattr(batching_bench, "run_batching_bench", fake_bench)
    (step,) = runner.select_steps("batching-sweep")
    with pytest.raises(SystemExit):
        runner.run_step(step, tmp_path, dry_run=True)
    (partial,) = tmp_path.glob("dryrun-batching-sweep-cpu-fp32-*.partial.json")
    report = json.loads(partial.read_text())
    assert report["gpu_run"]["partial"] is True and report["kind"] == "batching-sweep"
    (row,) = runner.summarize_batching(report)
    assert row["entry"] == "sd1.5-scifi 128x128 c1 unbatched" and row["images_per_s"] == 2.0
    summary = {"dry_run": True, "device": "cpu", "started_utc": "now", "elapsed_s": 1, "budget_s": 10,
               "steps": [{"name": step.name, "kind": step.kind, "status": "partial", "reason": "stopped",
                          "entries": [row]}]}
    md = runner.render_summary(summary, {})
    assert "| batching-sweep | partial: stopped; see the batching table below |" in md
    assert "| sd1.5-scifi 128x128 | 2 | 1 | unbatched | 2.00 | 1.00x | 0.50 s | 0.50 s | — | 0.0e+00 | — |" in md


def test_unknown_step_is_refused():
    from diffserve.benchmarks.gpu.runner import PLAN, select_steps

    assert select_steps(None) == PLAN and select_steps("segmind-vega") == (PLAN[0],)
    with pytest.raises(SystemExit, match="unknown step"):
        select_steps("sdxl-turbo")


# -- the checks that give the GPU figures a meaning ------------------------------------------------------

def test_image_check_fails_nan_and_uniform_images():
    from diffserve.benchmarks.engine_bench import image_check

    rng = np.random.default_rng(0)
    assert image_check(rng.random((1, 8, 8, 3)))["ok"]
    black = np.zeros((1, 8, 8, 3))
    assert image_check(black) == {"finite": True, "std": 0.0, "ok": False}  # a NaN VAE's black image
    nan = rng.random((1, 8, 8, 3))
    nan[0, 0, 0, 0] = np.nan
    assert image_check(nan)["finite"] is False and not image_check(nan)["ok"]


def test_denoiser_check_fails_a_stale_replay_and_a_wrong_step():
    from diffserve.benchmarks.engine_bench import DENOISER_CHECK_REL_L2, denoiser_check

    rng = np.random.default_rng(0)
    eager = [rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2)]
    close = [e + 1e-4 * rng.standard_normal(e.shape).astype(np.float32) for e in eager]
    assert denoiser_check(close, eager)["ok"]
    stale = [close[0], close[0]]  # a graph replay that returns the previous output for the second input
    result = denoiser_check(stale, eager)
    assert not result["ok"] and not result["outputs_follow_inputs"]
    wrong = [e * (1 + 3 * DENOISER_CHECK_REL_L2) for e in eager]
    assert not denoiser_check(wrong, eager)["ok"]
    nan = [close[0].copy(), close[1]]
    nan[0][0, 0, 0, 0] = np.nan
    assert not denoiser_check(nan, eager)["ok"]


def test_compile_counters_see_graph_breaks_and_recompiles():
    import torch

    from diffserve.benchmarks.engine_bench import CompileCounters

    def f(x):
        y = x * 2
        print("a graph break")  # noqa: T201 - print is what dynamo cannot trace
        return y + 1

    compiled = torch.compile(f, backend="eager", dynamic=False)
    with CompileCounters() as counters:
        compiled(torch.ones(3))
        compiled(torch.ones(5))  # another static shape: a recompile
    result = counters.result
    assert result["graph_breaks"] >= 1 and result["unique_graphs"] >= 2 and result["recompiles"] >= 1
    with CompileCounters() as again:
        compiled(torch.ones(3))  # cached: nothing new
    assert again.result["unique_graphs"] == 0 and again.result["recompiles"] == 0
