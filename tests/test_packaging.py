"""ONNX Runtime comes from exactly one extra: `cpu` (make install, the default image) or `gpu` (in its place)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _names(requirements):
    return [re.split(r"[<>=\[ ;]", r, maxsplit=1)[0] for r in requirements]


def test_onnxruntime_builds_are_exclusive_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not {"onnxruntime", "onnxruntime-gpu"} & set(_names(project["dependencies"]))
    extras = project["optional-dependencies"]
    assert _names(extras["cpu"]) == ["onnxruntime"] and _names(extras["gpu"]) == ["onnxruntime-gpu"]
    assert not any("onnxruntime" in n for name, reqs in extras.items() if name not in ("cpu", "gpu")
                   for n in _names(reqs))


def test_make_install_and_the_image_get_one_onnxruntime():
    assert '-e ".[dev,cpu]"' in (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ARG EXTRAS="cpu"' in dockerfile and 'pip install "/tmp/src[${EXTRAS}]"' in dockerfile  # a plain install


def test_one_namespace_every_folder_installs_under_diffserve():
    """package-dir maps each top-level folder onto diffserve.<folder>; the console script follows."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = config["tool"]["setuptools"]["package-dir"]
    folders = ("engine", "triton_serving", "export", "benchmarks", "api")
    assert {f"diffserve.{f}": f for f in folders}.items() <= package_dir.items()
    assert package_dir["diffserve.templates"] == "model_repository/templates"
    assert config["project"]["scripts"] == {"diffserve": "diffserve.api.cli:main"}
