"""A Triton server started by ``diffserve serve`` lives and dies with it: real processes only.

One ``diffserve serve --backend triton`` process on a one-slug repository (four models, four
python stubs) runs through, in order: kill -9 of its tritonserver (restarted by itself, ``/readyz``
back to 200, a new request succeeds, ``diffserve_triton_restarts_total`` is 1); a Triton that
cannot come back (its repository moved away) turning ``/healthz`` 503 after
``triton_unhealthy_after_s``, and healthy again once it can; and kill -9 of ``serve`` itself,
after which no process of its Triton's process group (server, stubs, watchdog) is alive.
Processes are found through /proc by parentage and process group, never by name globally: other
tests may run their own Triton.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.processes import start_cli
from tests.triton_processes import all_processes, descendants, proc_stat, triton_of

pytest.importorskip("pytriton", reason="nvidia-pytriton (ships tritonserver) is not installed")

pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


SLUG = "sd1.5-scifi"
BACKOFF_S = 0.5
UNHEALTHY_AFTER_S = 3.0
REQUEST = {"prompt": "a lighthouse", "num_inference_steps": 20, "seed": 3, "img_width": 512, "img_height": 512}


def server_pid(serve_pid: int) -> int | None:
    """The one tritonserver under a serve process, None while there is none."""
    servers = [pid for pid, info in descendants(serve_pid).items() if info[0] == "tritonserver"]
    return servers[0] if len(servers) == 1 else None


def alive(pid: int) -> bool:
    info = proc_stat(pid)
    return info is not None and info[1] not in ("Z", "X")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def restarts(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("diffserve_triton_restarts_total "):
            return float(line.split()[1])
    raise AssertionError("diffserve_triton_restarts_total is not exported")


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    from diffserve.export.repository import build_demo_repository

    root = tmp_path_factory.mktemp("lifetime")
    return build_demo_repository(root / "repo", slugs=(SLUG,), modes=("fused",)).repository


@pytest.fixture(scope="module")
def serve(repository, tmp_path_factory):
    """A ``diffserve serve`` that starts its own Triton; yields (process, httpx client)."""
    data_dir = tmp_path_factory.mktemp("lifetime-data")
    log = data_dir / "serve.log"
    proc, url = start_cli(["serve", "--backend", "triton", "--repository", str(repository), "--port", "0",
                           "--data-dir", str(data_dir)], log,
                          env={"DIFFSERVE_TRITON_RESTART_BACKOFF_S": str(BACKOFF_S),
                               "DIFFSERVE_TRITON_UNHEALTHY_AFTER_S": str(UNHEALTHY_AFTER_S)})
    client = httpx.Client(base_url=url, timeout=120)
    try:
        yield proc, client
    finally:
        client.close()
        proc.stop(60)


def test_killed_triton_is_restarted_and_serves_again(serve):
    proc, client = serve
    assert client.get("/readyz").status_code == 200
    assert restarts(client) == 0
    server, stubs = triton_of(proc.pid)
    assert stubs, "the repository's python models run in stubs under tritonserver"

    os.kill(server, signal.SIGKILL)
    new_server = wait_for(lambda: server_pid(proc.pid) not in (None, server) and server_pid(proc.pid), 60,
                          "a new tritonserver")
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, "/readyz back to 200")
    assert new_server != server and not any(alive(p) for p in [server, *stubs]), "old server or stubs survive"
    response = client.post(f"/v1/{SLUG}", json=REQUEST)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/")
    assert restarts(client) == 1
    assert client.get("/healthz").status_code == 200


def test_triton_that_cannot_come_back_turns_healthz_unhealthy(serve, repository):
    proc, client = serve
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, "a ready server to start from")
    before = restarts(client)
    server, _ = triton_of(proc.pid)
    away = repository.with_name(repository.name + ".away")
    repository.rename(away)
    try:
        os.kill(server, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: client.get("/readyz").status_code == 503, 30, "/readyz 503")
        assert client.get("/healthz").status_code == 200 or time.monotonic() - killed >= UNHEALTHY_AFTER_S
        unhealthy = wait_for(lambda: (r := client.get("/healthz")).status_code == 503 and r, 30, "/healthz 503")
        assert time.monotonic() - killed >= UNHEALTHY_AFTER_S - 0.5  # not before the configured time
        body = unhealthy.json()
        assert body["status"] == "unhealthy"
        assert "Triton server this process started has been down" in body["reason"]
        assert "not a directory" in body["reason"]  # the failed restart's cause
        assert restarts(client) > before
    finally:
        away.rename(repository)
    # It can come back now: the next attempt (backoff doubling from 0.5 s) brings it up.
    wait_for(lambda: client.get("/readyz").status_code == 200, 180, "/readyz 200 after the repository returned")
    # /readyz asks Triton itself; /healthz follows the supervisor, which marks Triton up when its start
    # returns, a poll after Triton first answers ready: a moment later.
    wait_for(lambda: client.get("/healthz").json() == {"status": "ok"}, 30, "/healthz ok again")
    assert client.post(f"/v1/{SLUG}", json=REQUEST).status_code == 200


def assert_kill_9_leaves_nothing(proc, what: str) -> None:
    """kill -9 of a process that started Triton: within 5 s nothing of its tree or Triton's group is alive."""
    own_group = os.getpgid(proc.pid)
    tree = descendants(proc.pid)
    names = {info[0] for info in tree.values()}
    assert "tritonserver" in names and any(n.startswith("triton_python") for n in names), names
    groups = {info[3] for info in tree.values()} - {own_group}
    assert groups, "Triton runs in a process group of its own"

    proc.signal(signal.SIGKILL)
    proc.wait(10)

    def leftovers() -> dict[int, tuple]:
        return {pid: info for pid, info in all_processes().items() if pid in tree or info[3] in groups}

    deadline = time.monotonic() + 5
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of the killed {what} still alive: {left}"


def test_kill_9_of_serve_leaves_no_triton_or_stub(serve):
    proc, client = serve
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, "a ready server to kill")
    assert_kill_9_leaves_nothing(proc, "serve")
