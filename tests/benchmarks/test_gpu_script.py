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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
PIPELINE_STEPS = ("sd1.5-scifi-512x512", "sd1.5-scifi-512x768", "segmind-vega-1024x1024")
NETWORK_STEPS = ("ominicontrol-512x512", "omni-zero-1024x1024")


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                "DIFFSERVE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=1200)


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_dry_run_writes_every_step(tmp_path):
    proc = _run(tmp_path, BUDGET_S="1100")  # generous: a loaded CPU must not trip the time guard
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8  # the device tool brings back at most 8 files from $OUT
    assert {"run.log", "summary.json", "summary.md"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["budget_s"] == 1100
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [*PIPELINE_STEPS, *NETWORK_STEPS]  # the plan's order
    for name, step in steps.items():
        assert step["status"] == "ok", (name, step.get("reason"))
        assert step["json"] in files and step["json"].startswith(f"dryrun-engine-{step['slug']}-{step['resolution']}-cpu-")
        assert step["floor_ms"] > 0
        report = json.loads((out / step["json"]).read_text())
        assert report["gpu_run"]["step"] == name and report["settings"]["full_size"]
        assert report["full_size"]["configs"].endswith("configs/tiny")
    for name in PIPELINE_STEPS:
        entries = steps[name]["entries"]
        labels = [e["entry"] for e in entries]
        assert labels[0].startswith("diffusers ") and labels[1] == "torch eager"
        assert labels[2] == "torch [fuse_qkv,channels_last,device_scheduler]"  # `fast` less compile on the CPU
        for e in entries:
            assert e["status"] == "ok" and e["median_ms"] > 0 and e["p90_ms"] >= e["median_ms"]
            assert e["ratio_vs_diffusers"] > 0 and e["speedup_vs_diffusers"] == pytest.approx(
                1 / e["ratio_vs_diffusers"], rel=1e-2)
            assert "fraction_of_floor" in e and e["fraction_of_floor"] is None  # GPU only
            assert e["max_abs_diff_vs_fp32"] is not None and e["max_abs_diff_vs_fp32"] < 1e-2
        for e in entries[1:]:
            assert e["denoise_its"] > 0 and e["denoiser_its"] > 0
            assert {"encode_text", "denoise", "decode"} <= set(e["stage_split_ms"])
            assert "unet_step" in e["stages_ms"] and "first_run_excess_s" in e
        assert entries[2]["within_tolerance_vs_eager"] is True  # README tolerance, fp32
        assert steps[name]["steps_run"] == 20  # the catalog's fewest for SD1.5 and Vega
    for name in NETWORK_STEPS:
        (e,) = steps[name]["entries"]
        assert e["status"] == "ok" and e["estimated_ms"] > 0 and e["denoiser_its"] > 0
    cc = steps["ominicontrol-512x512"]["entries"][0]["condition_cache"]
    assert cc["condition_tokens"] == 1024 and cc["steps"] == 4
    assert cc["cached_estimate_ms"] > 0 and cc["joint_estimate_ms"] > 0 and cc["cached_vs_joint"] > 0
    md = (out / "summary.md").read_text()
    assert "ominicontrol-512x512, the condition (1024 tokens, 4 steps" in md
    assert "DRY RUN" in md and "| step | entry | median | p90 | ours / diffusers |" in md
    for name in steps:
        assert f"| {name} |" in md
    assert md.count("# Engine benchmark:") == len(steps)  # every step's own markdown follows the table
    assert "step segmind-vega-1024x1024: starting" in (out / "run.log").read_text()


def test_time_guard_skips_what_cannot_finish(tmp_path):
    proc = _run(tmp_path, BUDGET_S="0.001", STEPS="sd1.5-scifi,ominicontrol-512x512")
    assert proc.returncode == 1  # nothing measured
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["sd1.5-scifi-512x512", "sd1.5-scifi-512x768",
                                                      "ominicontrol-512x512"]
    for s in summary["steps"]:
        assert s["status"] == "skipped" and s["reason"].startswith("time guard: needs ~")
    assert "skipped: time guard" in (tmp_path / "out" / "summary.md").read_text()


def test_unknown_step_is_refused():
    from benchmarks.gpu.runner import PLAN, select_steps

    assert select_steps(None) == PLAN and select_steps("segmind-vega") == (PLAN[2],)
    with pytest.raises(SystemExit, match="unknown step"):
        select_steps("sdxl-turbo")
