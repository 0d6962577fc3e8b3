"""The job-store contract fixtures: ``kind`` runs a test on each store, ``queue`` is that store.

``queue`` is a fresh :class:`diffserve.api.queue.JobQueue`: SQLite in a temp dir, or Redis (a real
``redis-server``, tests/redis_server.py) under a namespace of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from diffserve.api.jobs import Job, JobStore
from diffserve.api.queue import JobQueue
from tests.redis_server import redis_server, redis_url  # noqa: F401

KINDS = ("sqlite", "redis")


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def namespace() -> str:
    """The Redis key namespace of this test's stores (and credits)."""
    return f"contract-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_queue(kind: str, namespace: str, tmp_path, request: pytest.FixtureRequest) -> Iterator:
    """``make_queue(**kw)``: a store of this test's kind; every one made shares its data (a second
    handle is a second process's view of the same jobs)."""
    stores: list[JobQueue] = []

    def make(**kw) -> JobQueue:
        if kind == "sqlite":
            store = JobStore(tmp_path / "jobs.sqlite3", outputs_dir=tmp_path / "outputs", **kw)
        else:
            from diffserve.api.redis_jobs import RedisJobStore

            store = RedisJobStore(request.getfixturevalue("redis_url"), namespace=namespace, **kw)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def queue(make_queue) -> JobQueue:
    return make_queue()


def take(store: JobQueue, slug: str) -> Job | None:
    """Lease the next job of ``slug`` without waiting (the job, or None)."""
    claim = store.claim("contract-worker", [slug])
    return None if claim is None else claim.job
