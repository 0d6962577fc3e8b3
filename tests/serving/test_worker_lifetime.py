"""A Triton server started by ``diffserve worker`` lives and dies with it: real processes only.

The worker half of what tests/serving/test_triton_lifetime.py checks for ``serve``. One
``diffserve worker`` without ``--triton-url`` (so it starts and supervises its own Triton on a
one-slug fused repository) on a real ``redis-server``, and one ``diffserve serve --role api``
replica that queues jobs for it. In order: kill -9 of the worker's tritonserver (a new one is
started in a new lifeline group of the worker, ``/readyz`` is back to 200 by itself, a job
submitted through the replica completes, ``diffserve_triton_restarts_total`` is 1 on the worker's
``/metrics``); then kill -9 of the worker itself, after which no process of its Triton's process
group (server, stubs, watchdog) is alive. Processes are found through /proc by parentage and
process group, never by name globally: other tests may run their own Triton.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton (ships tritonserver) is not installed")

from diffserve.engine.processes import ChildProcess  # noqa: E402
from tests.redis_server import redis_server  # noqa: E402, F401
from tests.serving.processes import start_cli  # noqa: E402
from tests.serving.test_triton_lifetime import (  # noqa: E402
    BACKOFF_S,
    REQUEST,
    SLUG,
    alive,
    assert_kill_9_leaves_nothing,
    restarts,
    server_pid,
    wait_for,
)
from tests.triton_processes import proc_stat, triton_of  # noqa: E402



pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


def start(args: list[str], log: Path, marker: str, url_after: str,
          env: dict[str, str]) -> tuple[ChildProcess, str]:
    """A ``diffserve`` sub-command as a process and the URL it printed once ready."""
    return start_cli(args, log, env=env, ready=marker, url_after=url_after)


def stop(proc: ChildProcess) -> None:
    proc.stop(60)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    from diffserve.export.repository import build_demo_repository

    root = tmp_path_factory.mktemp("worker-lifetime")
    return build_demo_repository(root / "repo", slugs=(SLUG,), modes=("fused",)).repository


@pytest.fixture(scope="module")
def store_url(redis_server) -> str:  # noqa: F811 - the session fixture imported above
    """The session Redis, running and emptied once for this module (the worker outlives one test)."""
    import redis

    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="module")
def worker(repository, store_url, tmp_path_factory):
    """A ``diffserve worker`` that starts its own Triton; yields (process, httpx client of its health port)."""
    data_dir = tmp_path_factory.mktemp("worker-lifetime-data")
    proc, url = start(["worker", "--repository", str(repository), "--redis-url", store_url, "--health-port", "0",
                       "--data-dir", str(data_dir)], data_dir / "worker.log", "diffserve worker ready",
                      "health at", {"DIFFSERVE_TRITON_RESTART_BACKOFF_S": str(BACKOFF_S)})
    client = httpx.Client(base_url=url, timeout=60)
    try:
        yield proc, client
    finally:
        client.close()
        stop(proc)


@pytest.fixture(scope="module")
def api(store_url, tmp_path_factory):
    """A ``diffserve serve --role api`` replica on the same Redis: it queues, the worker runs."""
    data_dir = tmp_path_factory.mktemp("worker-lifetime-api")
    proc, url = start(["serve", "--role", "api", "--redis-url", store_url, "--port", "0", "--data-dir",
                       str(data_dir)], data_dir / "api.log", "ready at", "ready at", {})
    client = httpx.Client(base_url=url, timeout=180)
    try:
        yield client
    finally:
        client.close()
        stop(proc)


def test_killed_triton_of_a_worker_is_restarted_and_runs_jobs_again(worker, api):
    proc, health = worker
    wait_for(lambda: health.get("/readyz").status_code == 200, 120, "the worker's /readyz 200")
    assert restarts(health) == 0
    server, stubs = triton_of(proc.pid)
    assert stubs, "the repository's python models run in stubs under tritonserver"
    old_group = proc_stat(server)[3]

    os.kill(server, signal.SIGKILL)
    new_server = wait_for(lambda: server_pid(proc.pid) not in (None, server) and server_pid(proc.pid), 60,
                          "a new tritonserver")
    wait_for(lambda: health.get("/readyz").status_code == 200, 120, "the worker's /readyz back to 200")
    assert not any(alive(p) for p in [server, *stubs]), "old server or stubs survive"
    # The new server runs in a new lifeline group: its leader is a watchdog the worker started.
    new_group = proc_stat(new_server)[3]
    assert new_group not in (old_group, os.getpgid(proc.pid))
    assert proc_stat(new_group) is not None and proc_stat(new_group)[2] == proc.pid, "group leader is not the worker's"
    assert not alive(old_group), "the old lifeline's watchdog survives"

    response = api.post(f"/v1/{SLUG}", json=REQUEST)  # sync: queued in Redis, run by the worker
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/")
    assert restarts(health) == 1
    assert health.get("/healthz").status_code == 200


def test_kill_9_of_worker_leaves_no_triton_or_stub(worker):
    proc, health = worker
    wait_for(lambda: health.get("/readyz").status_code == 200, 120, "a ready worker to kill")
    assert_kill_9_leaves_nothing(proc, "worker")
