"""Real-server tests for diffserve.triton_serving.server (no mocks): the tritonserver from the pytriton wheel.

Start-up policy under test: with model_control_mode="none", a model whose initialize() raises makes
Triton exit, and TritonServer.start() raises TritonLaunchError containing the model's error text.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # also work under a bare `pytest` invocation
    sys.path.insert(0, str(ROOT))

from diffserve.triton_serving.distribution import find_libpython  # noqa: E402
from diffserve.triton_serving.server import TritonLaunchError, TritonServer, TritonServerConfig, find_free_port  # noqa: E402

pytest.importorskip("pytriton", reason="nvidia-pytriton (ships tritonserver) is not installed")

CONFIG_TEMPLATE = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

ADD_ONE = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

# Imports torch + math (stdlib C extension: needs the matching libpython), the project package
# `engine` (project root on the path) and a helper from extra_pythonpath.
TORCH_MODEL = """\
import math

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import diffserve.engine  # noqa: F401  (project root importable)
import ds_test_helper


class TritonPythonModel:
    def initialize(self, args):
        self.factor = ds_test_helper.FACTOR * math.floor(1.5)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy())
            y = (x * self.factor).numpy().astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
"""

BROKEN = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("kaboom-initialize-error from the broken test model")

    def execute(self, requests):
        return []
"""


def add_model(repo: Path, name: str, source: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG_TEMPLATE.format(name=name))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(source))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def group_gone(pgid: int) -> bool:
    """No process of group ``pgid`` is left (zombies aside: they are reaped by their parents)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("triton")
    repo = base / "repo"
    add_model(repo, "add_one", ADD_ONE)
    add_model(repo, "torch_scale", TORCH_MODEL)
    helper_dir = base / "helpers"
    helper_dir.mkdir()
    (helper_dir / "ds_test_helper.py").write_text("FACTOR = 2.0\n")
    config = TritonServerConfig(
        repository=repo,
        extra_pythonpath=[helper_dir],
        log_file=base / "triton.log",
        startup_timeout_s=90,
    )
    srv = TritonServer(config)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_server_is_ready_with_distinct_ports(server: TritonServer) -> None:
    assert server.is_alive()
    assert server.is_ready()
    ports = {server.http_port, server.grpc_port, server.metrics_port}
    assert len(ports) == 3
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
    assert server.http_url == f"127.0.0.1:{server.http_port}"


def test_infer_grpc(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        assert client.is_model_ready("add_one")
        x = np.array([1.0, 2.5, -3.0], dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("add_one", [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), x + 1)
    finally:
        client.close()


def test_infer_http(server: TritonServer) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.http_url)
    try:
        assert client.is_server_ready()
        x = np.arange(5, dtype=np.float32)
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("add_one", [inp])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), x + 1)
    finally:
        client.close()


def test_model_importing_torch_and_project_packages(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        x = np.array([1.0, -2.0, 0.5], dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("torch_scale", [inp])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), x * 2.0)
    finally:
        client.close()


def test_server_output_goes_to_log_file(server: TritonServer) -> None:
    text = server.config.log_file.read_text()  # type: ignore[union-attr]
    assert "Started GRPCInferenceService" in text
    assert any("HTTPService" in line for line in server.log_tail()) or "HTTPService" in text


def test_stop_releases_process_group_and_ports(tmp_path: Path, caplog) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "add_one", ADD_ONE)
    caplog.set_level(logging.DEBUG, logger="diffserve.triton")
    with TritonServer(TritonServerConfig(repository=repo, startup_timeout_s=60)) as srv:
        assert srv.is_ready()
        pid, group = srv.pid, srv.process_group
        assert pid is not None and group is not None and os.getpgid(pid) == group
        ports = (srv.http_port, srv.grpc_port, srv.metrics_port)
        shm_prefix = srv._shm_prefix
        assert list(Path("/dev/shm").glob(shm_prefix + "*")), "python backend shm region expected"
    assert srv.pid is None and not srv.is_alive() and not srv.is_ready()
    assert process_gone(pid)
    assert group_gone(group), "python-backend stubs survived the server"
    for port in ports:
        assert port_is_free(port), f"port {port} still bound"
    assert not list(Path("/dev/shm").glob(shm_prefix + "*"))
    # streamed to the "diffserve.triton" logger as well: Triton's INFO lines at DEBUG, so only its
    # warnings and errors reach a console at the default level
    server_records = [r for r in caplog.records if r.name == "diffserve.triton"]
    assert any("Started HTTPService" in r.getMessage() and r.levelno == logging.DEBUG for r in server_records)
    assert not [r.getMessage() for r in server_records if r.levelno >= logging.INFO and r.getMessage()[:1] == "I"]
    assert srv.stop() == srv.stop()  # idempotent


def test_broken_model_fails_startup_with_model_error(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "add_one", ADD_ONE)
    add_model(repo, "broken", BROKEN)
    srv = TritonServer(TritonServerConfig(repository=repo, startup_timeout_s=60))
    with pytest.raises(TritonLaunchError) as excinfo:
        srv.start()
    message = str(excinfo.value)
    assert "exited during start-up" in message
    assert "kaboom-initialize-error" in message
    assert srv.pid is None and not srv.is_alive()
    assert port_is_free(srv.http_port)


def test_explicit_mode_loads_only_listed_models(tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    add_model(repo, "add_one", ADD_ONE)
    add_model(repo, "broken", BROKEN)
    config = TritonServerConfig(
        repository=repo, model_control_mode="explicit", load_models=["add_one"],
        startup_timeout_s=60,
    )
    with TritonServer(config) as srv:
        client = httpclient.InferenceServerClient(url=srv.http_url)
        try:
            assert client.is_model_ready("add_one")
            assert not client.is_model_ready("broken")
        finally:
            client.close()


def test_missing_stub_for_python_version(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    srv = TritonServer(TritonServerConfig(repository=tmp_path / "repo", python_version="3.99"))
    with pytest.raises(TritonLaunchError, match=r"no python-backend stub for Python 3\.99") as ei:
        srv.start()
    assert "available:" in str(ei.value)
    assert srv.pid is None


def test_missing_tritonserver_binary(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    fake_root = tmp_path / "site-packages" / "pytriton"
    fake_root.mkdir(parents=True)
    srv = TritonServer(TritonServerConfig(repository=tmp_path / "repo", pytriton_root=fake_root))
    with pytest.raises(TritonLaunchError, match="tritonserver binary not found"):
        srv.start()


def test_missing_repository_is_reported(tmp_path: Path) -> None:
    srv = TritonServer(TritonServerConfig(repository=tmp_path / "nope"))
    with pytest.raises(TritonLaunchError, match="not a directory"):
        srv.start()


def test_libpython_checks(tmp_path: Path) -> None:
    assert find_libpython().is_file()
    with pytest.raises(TritonLaunchError, match="statically linked"):
        find_libpython({"Py_ENABLE_SHARED": 0, "LIBDIR": str(tmp_path)})
    with pytest.raises(TritonLaunchError, match="libpython not found"):
        find_libpython({"Py_ENABLE_SHARED": 1, "LIBDIR": str(tmp_path),
                        "INSTSONAME": "libpython3.99.so.1.0"})


def test_config_validation_and_free_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="explicit"):
        TritonServerConfig(repository=tmp_path, load_models=["x"])
    with pytest.raises(ValueError, match="model_control_mode"):
        TritonServerConfig(repository=tmp_path, model_control_mode="poll-ish")
    port = find_free_port()
    assert 0 < port < 65536 and port_is_free(port)


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    import re
    import signal

    from diffserve.engine.processes import ChildNotReady, ChildProcess

    repo = tmp_path / "repo"
    add_model(repo, "add_one", ADD_ONE)
    grpc_port, log = find_free_port(), tmp_path / "triton.log"
    proc = ChildProcess(
        [sys.executable, "-m", "diffserve.api.cli", "triton", "--repository", str(repo), "--grpc-port", str(grpc_port),
         "--exit-timeout", "20", "--log-file", str(log), "--", "--log-info=true"],
        name="diffserve triton", cwd=ROOT, stderr=Path(os.devnull),
    ).start()
    try:
        try:
            grpc = proc.wait_ready(re.compile(r"^\s*grpc:"), 90).split()[-1]  # type: ignore[union-attr]
        except ChildNotReady as exc:  # exited early, or printed no URLs
            raise AssertionError(f"CLI printed no URLs: {exc}") from None
        host, port = grpc.rsplit(":", 1)
        assert int(port) == grpc_port and not port_is_free(int(port), host)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert port_is_free(int(port), host)
        assert "Started GRPCInferenceService" in log.read_text()
    finally:
        proc.stop(60)  # SIGTERM lets the CLI stop Triton (SIGKILL would orphan it); SIGKILL after 60 s


def test_readiness_timeout_reports_log_and_cleans_up(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "sleepy", "import time\n\n\nclass TritonPythonModel:\n"
              "    def initialize(self, args):\n        time.sleep(3600)\n\n"
              "    def execute(self, requests):\n        return []\n")
    srv = TritonServer(TritonServerConfig(repository=repo, startup_timeout_s=2))
    with pytest.raises(TritonLaunchError, match="did not become ready within 2 s") as excinfo:
        srv.start()
    assert "Last" in str(excinfo.value) and "sleepy" in str(excinfo.value)
    assert srv.pid is None and not srv.is_alive()
    assert port_is_free(srv.http_port)


def test_exit_timeout_bounds_a_model_that_never_unloads(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_model(repo, "stuck", ADD_ONE.replace("class TritonPythonModel:\n",
                                             "class TritonPythonModel:\n    def finalize(self):\n"
                                             "        import time\n        time.sleep(3600)\n\n"))
    log = tmp_path / "triton.log"
    srv = TritonServer(TritonServerConfig(repository=repo, log_file=log, startup_timeout_s=60, exit_timeout_s=2))
    srv.start()
    group = srv.process_group
    assert srv.stop() == 1  # Triton: "failed to stop server: Internal - Exit timeout expired"
    text = log.read_text()
    # Triton counted down from our 2 s with the model still live, then exited.
    assert '"Timeout 2: Found 1 live models' in text and '"Timeout 30:' not in text, text[-2000:]
    deadline = time.monotonic() + 30  # the killed stub is a zombie until init reaps it
    while not group_gone(group):
        assert time.monotonic() < deadline, "the stuck model's stub survived the server"
        time.sleep(0.1)
