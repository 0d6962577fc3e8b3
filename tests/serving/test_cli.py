"""`diffserve generate` and `diffserve demo` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest


pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


def diffserve(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFSERVE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "diffserve.api.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])


def test_generate_writes_images_and_reports_the_seed(tmp_path, tiny_checkpoints, diffserve_home):
    params = {"prompt": "a city", "samples": 2, "seed": 42, "img_width": 512, "img_height": 512}
    proc = diffserve("generate", "--slug", "sd1.5-scifi", "--params", json.dumps(params), "--out", str(tmp_path),
                     home=diffserve_home)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["seed"] == 42 and len(report["images"]) == 2
    for path in report["images"]:
        with PIL.Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (512, 512)


def test_generate_rejects_bad_parameters_naming_them(tmp_path, diffserve_home):
    proc = diffserve("generate", "--slug", "sd1.5-scifi", "--params", '{"prompt": "x", "samples": 9}',
                     "--out", str(tmp_path), home=diffserve_home)
    assert proc.returncode == 2
    assert "samples" in proc.stderr and not list(tmp_path.iterdir())


def test_generate_rejects_an_unknown_optimization_and_a_missing_gpu_in_one_line(tmp_path, tiny_checkpoints,
                                                                                diffserve_home):
    import torch

    args = ("generate", "--slug", "sd1.5-scifi", "--params", '{"prompt": "x"}', "--out", str(tmp_path))
    proc = diffserve(*args, "--optimize", "turbo", home=diffserve_home)
    assert proc.returncode == 2 and "unknown torch optimization 'turbo'" in proc.stderr
    assert "Traceback" not in proc.stderr
    if not torch.cuda.is_available():
        proc = diffserve(*args, "--device", "cuda", home=diffserve_home)
        assert proc.returncode == 2 and "use --device cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_demo_serves_through_triton_and_the_sdk_and_stops(demo_repository, diffserve_home):
    """`make demo`: starts `serve --demo` (which starts its own Triton on the demo repository),
    one seed example per slug through the official SDK, images saved, everything stopped."""
    from diffserve.engine.catalog import CATALOG, get_model

    proc = diffserve("demo", home=diffserve_home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (diffserve_home / "demo-serve.log").read_text()  # the server's whole output
    assert "diffserve API ready at" in proc.stdout and "Triton ready" in log
    # The terminal gets one line per stage and slug, not the server's log (Triton's, the runner's, warnings).
    assert "diffserve.api.runner" in log and "diffserve.api.runner" not in proc.stdout and "Warning" not in proc.stdout
    assert "diffserve.export.repository: models omni-zero: fused, bls" in proc.stdout
    assert "HTTP Request" not in proc.stdout + proc.stderr
    written = {p.name: p for p in (diffserve_home / "demo-outputs").iterdir()}
    for slug in list(CATALOG):
        [name] = [n for n in written if n.startswith(slug + "-")]
        with PIL.Image.open(written[name]) as im:
            assert im.format.lower() == {"png": "png", "jpeg": "jpeg"}[get_model(slug).output_format], slug
    assert "Triton stopped" in (diffserve_home / "demo-serve.log").read_text()  # it took its Triton down with it
