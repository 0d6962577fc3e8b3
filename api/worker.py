"""``diffserve worker``: one job-running process per Triton server, on the shared Redis store.

A worker takes from Redis only the jobs of the slugs its Triton serves (read from the Triton
repository's manifest with ``--repository``, else from the server's model index: every model
named like a catalog slug is that slug's default pipeline, as ``diffserve export`` names them), runs them through that Triton, heartbeats while each runs, and stores
the outcome; API replicas (``diffserve serve --role api``) answer the clients. It is the app of
``diffserve.api.app.create_app(..., role="worker")``: the same job runner as ``serve``, with only the
health routes, served on ``--health-port``: ``/healthz``, ``/readyz`` (Redis and its Triton)
and ``/metrics``. Without ``--triton-url`` it starts its own Triton on ``--repository``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def worker_settings(args: argparse.Namespace):
    from pydantic import ValidationError as SettingsError

    from diffserve.api.settings import Settings

    overrides: dict[str, Any] = {}
    for name, field in (("host", "host"), ("health_port", "port"), ("data_dir", "data_dir"),
                        ("repository", "repository"), ("triton_url", "triton_url"), ("redis_url", "redis_url"),
                        ("concurrency", "max_concurrent_jobs")):
        if getattr(args, name, None) is not None:
            overrides[field] = getattr(args, name)
    try:
        settings = Settings(**overrides)
    except SettingsError as exc:
        problems = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                    for e in exc.errors(include_input=False, include_url=False)]
        raise SystemExit("invalid settings:\n" + "\n".join(problems)) from None
    if settings.redis_url is None:
        raise SystemExit("diffserve worker needs the shared store: --redis-url redis://HOST:PORT/0 "
                         "(or DIFFSERVE_REDIS_URL)")
    if settings.repository is None and settings.triton_url is None:
        raise SystemExit("diffserve worker needs --triton-url HOST:PORT (a running Triton) or --repository DIR "
                         "(a Triton model repository to start Triton on)")
    return settings


def pipelines_from_server(grpc_url: str, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """Pipeline models of a running Triton, from its model index: models named like catalog slugs."""
    import time

    import tritonclient.grpc as grpcclient

    from diffserve.engine.catalog import CATALOG

    deadline = time.monotonic() + timeout_s
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        while True:
            try:
                index = client.get_model_repository_index(as_json=True).get("models", [])
                break
            except Exception as exc:  # noqa: BLE001 - Triton still starting or not there
                if time.monotonic() > deadline:
                    raise SystemExit(f"cannot read the model index of Triton at {grpc_url}: {exc}") from None
                time.sleep(1.0)
    finally:
        client.close()
    return {m["name"]: {"slug": m["name"], "default": True} for m in index if m.get("name") in CATALOG}


def cmd_worker(args: argparse.Namespace) -> int:
    from diffserve.api.app import create_app
    from diffserve.api.backend_triton import create_triton_backend
    from diffserve.api.server import run_until_stopped

    settings = worker_settings(args)
    if settings.repository is None:
        from diffserve.api.backend_triton import TritonBackend

        backend = TritonBackend(settings.triton_url, pipelines_from_server(settings.triton_url),
                                timeout_s=settings.triton_timeout_s or settings.job_timeout_s)
    else:
        backend = create_triton_backend(settings, demo=False)
    if not backend.slugs:
        raise SystemExit(f"Triton ({settings.triton_url or settings.repository}) serves no pipeline: nothing for "
                         "this worker to take")
    app = create_app(settings, backend, role="worker")
    return run_until_stopped(app, settings, access_log=args.verbose, ready_line=lambda url: (
        f"diffserve worker ready: takes {', '.join(sorted(backend.slugs))} from Redis; health at {url}/readyz"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="take jobs from the shared Redis queue and run them on one Triton server")
    worker.add_argument("--triton-url", help="gRPC host:port of this worker's Triton server (default: start one "
                                             "on --repository)")
    worker.add_argument("--repository", type=Path, help="Triton model repository: its manifest names the slugs "
                                                        "this worker takes (DIFFSERVE_REPOSITORY)")
    worker.add_argument("--redis-url", help="shared store, e.g. redis://redis:6379/0 (DIFFSERVE_REDIS_URL)")
    worker.add_argument("--health-port", type=int, help="port of /healthz, /readyz and /metrics "
                                                        "(DIFFSERVE_PORT; default 8000; 0 picks a free one)")
    worker.add_argument("--host", help="interface of the health port (default 127.0.0.1)")
    worker.add_argument("--data-dir", type=Path, help="logs of a Triton this worker starts (default var/api)")
    worker.add_argument("--concurrency", type=int, help="jobs run at once (DIFFSERVE_MAX_CONCURRENT_JOBS; default: the backend's batch capacity, 1 without batching)")
    worker.set_defaults(func=cmd_worker)
