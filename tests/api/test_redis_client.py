"""api/redis_client.py against a real password-protected redis-server: credentials in the URL or
from a secret file, the one mapping of Redis faults to StoreUnavailable (503), the Lua as package
data."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffserve.api.jobs import JobStatus
from diffserve.api.redis_client import StoreUnavailable, connect, lua, read_password_file
from diffserve.api.redis_jobs import RedisJobStore
from tests.redis_server import RedisServer

PASSWORD = "s3cret-for-the-test"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=PASSWORD)
    server.start()
    yield server
    server.stop()


def _store(url: str, password: str | None = None) -> RedisJobStore:
    return RedisJobStore(url, client=connect(url, password=password), namespace="auth-test")


def test_without_the_password_every_call_is_a_clear_store_unavailable(locked: RedisServer) -> None:
    store = _store(locked.url)
    with pytest.raises(StoreUnavailable, match="refused the credentials"):
        store.create("sd1.5-scifi", {"prompt": "x"})
    with pytest.raises(StoreUnavailable, match="refused the credentials"):
        _store(f"redis://:wrong@127.0.0.1:{locked.port}/0").ping()


def test_the_password_in_the_url_or_from_a_file(locked: RedisServer, tmp_path: Path) -> None:
    in_url = _store(f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0")
    job = in_url.create("sd1.5-scifi", {"prompt": "x"})
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")  # as `kubectl create secret --from-file` or an editor leaves it
    from_file = _store(locked.url, read_password_file(secret))
    assert from_file.get(job.id).status is JobStatus.QUEUED
    # An ACL user in the URL: the default user, named.
    assert _store(f"redis://default:{PASSWORD}@127.0.0.1:{locked.port}/0").get(job.id) is not None


def test_password_file_problems_are_named(tmp_path: Path) -> None:
    assert read_password_file(None) is None
    with pytest.raises(ValueError, match="cannot read the Redis password file"):
        read_password_file(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_password_file(tmp_path / "empty")


def test_a_full_redis_is_unavailable_not_an_internal_error(locked: RedisServer) -> None:
    client = connect(f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0")
    store = RedisJobStore("unused", client=client, namespace="oom-test")
    client.config_set("maxmemory", "1")  # noeviction (the server's policy): every write is refused with OOM
    try:
        with pytest.raises(StoreUnavailable, match="refuses work"):
            store.create("sd1.5-scifi", {"prompt": "x"})
    finally:
        client.config_set("maxmemory", "0")
    assert store.create("sd1.5-scifi", {"prompt": "x"}).status is JobStatus.QUEUED


def test_rediss_urls_make_tls_connections() -> None:
    client = connect("rediss://:pw@redis.example:6380/0")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("redis.example", 6380, "pw")


def test_the_lua_scripts_ship_as_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "lua/*.lua" in pyproject["tool"]["setuptools"]["package-data"]["diffserve.api"]
    names = ("jobs_prelude", "jobs_create", "jobs_claim", "jobs_heartbeat", "jobs_progress", "jobs_complete",
             "jobs_fail", "jobs_cancel", "quota_reserve", "quota_settle", "quota_take")
    assert all("redis.call" in lua(name) for name in names)
