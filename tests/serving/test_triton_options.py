"""Engine options travel with the artifacts: a real Triton server on a one-model repository built with a
non-default option, and the stub runs what the repository says (not what the environment says)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from diffserve.api.backend_triton import TritonBackend
from diffserve.engine.catalog import validate
from diffserve.export.repository import Deployment, RepositoryOptions, build_repository


pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


@pytest.fixture(scope="module")
def cached_ominicontrol(tmp_path_factory, tiny_checkpoints, monkeypatch_module):
    from diffserve.triton_serving.server import TritonServer, TritonServerConfig

    # The environment says joint (the variable the engine used to read); the repository says cached.
    monkeypatch_module.setenv("DIFFSERVE_OMINICONTROL_CONDITION", "joint")
    root = tmp_path_factory.mktemp("options-repo")
    build_repository(root / "repo", [Deployment("ominicontrol", tiny_checkpoints["ominicontrol"])],
                     RepositoryOptions(runtime="torch", fused_runtime="torch", modes=("fused",), pipeline_instances=1,
                                       ominicontrol_condition="cached"))
    server = TritonServer(TritonServerConfig(repository=root / "repo", log_file=root / "triton.log",
                                             startup_timeout_s=600, exit_timeout_s=5))
    server.start()
    yield TritonBackend.from_repository(server.grpc_url, root / "repo")
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_condition_mode_in_the_repository_reaches_the_stub(cached_ominicontrol):
    image = np.full((64, 64, 3), 128, np.uint8)
    image[16:48, 16:48] = (200, 40, 40)
    params = validate("ominicontrol", {"image": "<decoded>", "prompt": "a red square on a table",
                                       "steps": 4, "seed": 5}) | {"image": image}
    out = asyncio.run(cached_ominicontrol.infer("ominicontrol", params, request_id="options"))
    assert out.info["condition_mode"] == "cached"
    assert "condition_kv" in out.info["timings"]  # the cached mode ran: condition K/V computed once
    assert out.images.shape[-1] == 3 and out.images.std() > 0
