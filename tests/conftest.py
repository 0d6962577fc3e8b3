"""Shared fixtures: tiny random-weight checkpoints built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import devices


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="device the engine tests compute on (fp32); see tests/devices.py")


def pytest_configure(config):
    devices.DEVICE = config.getoption("--device")
    if devices.DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: no CUDA device is visible to torch here")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: they are skipped, with the reason, where none is.

    Under pytest-xdist (``make test``: ``--dist loadgroup``) a test module is one unit of work, so
    its module-scoped servers start once, and every test marked ``triton_server`` joins one unit:
    a Triton server with the demo repository is ~35 python stubs of up to 0.7 GB each, and two at
    once on two workers ran a 24 GiB machine out of memory (the kernel killed a worker).
    """
    for item in items:
        group = "triton_server" if item.get_closest_marker("triton_server") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def diffserve_home(tmp_path_factory) -> Path:
    """A DIFFSERVE_HOME for the session; CLI subprocesses started by tests inherit it."""
    home = tmp_path_factory.mktemp("diffserve-home")
    os.environ["DIFFSERVE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_checkpoints(diffserve_home) -> dict[str, Path]:
    from diffserve.engine.tiny.demo import build_demo_checkpoints

    return build_demo_checkpoints(diffserve_home / "checkpoints")


@pytest.fixture(scope="session")
def sd15_dir(tiny_checkpoints) -> Path:
    return tiny_checkpoints["sd1.5-scifi"]


@pytest.fixture(scope="session")
def sdxl_dir(tiny_checkpoints) -> Path:
    return tiny_checkpoints["segmind-vega"]


@pytest.fixture(scope="session")
def sd15(sd15_dir):
    return devices.torch_components(sd15_dir)


@pytest.fixture(scope="session")
def sdxl(sdxl_dir):
    return devices.torch_components(sdxl_dir)


@pytest.fixture(scope="session")
def input_image():
    """A deterministic 64x64 RGB test picture."""
    import numpy as np

    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1)
    return (base + rng.randint(0, 32, size=(64, 64, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory, tiny_checkpoints):
    """The demo repository: every slug's tiny checkpoint exported for Triton, both modes.

    One pipeline instance per model keeps the server to ~35 python stubs on a 2-core CI machine;
    tests that need two concurrent pipelines reload a model with a second instance.
    """
    from diffserve.export.repository import build_demo_repository, default_demo_repository

    # Where `diffserve serve --demo` looks, so the demo test finds its exports done.
    return build_demo_repository(default_demo_repository())


@pytest.fixture(scope="session")
def triton(demo_repository, tmp_path_factory):
    """One real Triton server on the demo repository for every module that serves through Triton.

    Explicit model control, so tests can unload a component (a real failure) or reload a model
    with another config; its ports are fixed at construction, so a test that stops it can start
    it again on the same addresses. Tests leave it as they found it.
    """
    from diffserve.triton_serving.server import TritonServer, TritonServerConfig

    log = tmp_path_factory.mktemp("triton-log") / "triton.log"
    # Triton's python backend now and then never finalizes one decoupled pipeline instance (gdb: its
    # stub idles in Stub::PopMessage, never sent the finalize; an open Triton bug of the same shape:
    # triton-inference-server/server#8755), which holds a stopping server for its whole exit
    # timeout; the tests have nothing in flight at the end, so 5 s is plenty.
    server = TritonServer(TritonServerConfig(repository=demo_repository.repository, model_control_mode="explicit",
                                             load_models=["*"], log_file=log, startup_timeout_s=900,
                                             exit_timeout_s=5))
    server.start()
    yield server
    server.stop()
