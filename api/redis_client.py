"""The one Redis connection recipe and the one mapping of Redis faults to :class:`StoreUnavailable`.

Every Redis-backed part (the job store, credits, rate limits) connects through :func:`connect` and
wraps its commands in :func:`guarded`, so "Redis cannot serve" means the same thing everywhere and
the API answers it with one 503. Lua scripts live as ``api/lua/*.lua`` files (package data) and
are read once per process by :func:`lua`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from diffserve.api.secret_files import read_secret_file

__all__ = ["StoreUnavailable", "connect", "describe", "guarded", "lua", "read_password_file"]

_T = TypeVar("_T")

_REFUSING: Final = (redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError,
                    redis.exceptions.ClusterDownError, redis.exceptions.OutOfMemoryError)
"""Replies redis-py gives a class of its own that mean Redis cannot do the work now, not that the
command was wrong: a replica refusing writes, a replica without its primary, a full Redis under
``maxmemory-policy noeviction`` (OOM)."""

_REFUSING_CODES: Final = ("MISCONF", "NOREPLICAS")
"""The same for replies redis-py leaves as a plain ResponseError (their message keeps the code):
a failed RDB/AOF write, too few replicas acknowledging."""


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached, is loading its data or refuses writes; the API answers 503."""


def connect(url: str, *, password: str | None = None, timeout_s: float = 2.0) -> redis.Redis:
    """A client for ``url`` that fails fast (``timeout_s``) and never retries a command by itself.

    ``url`` may carry credentials (``redis://:PASSWORD@host:6379/0``, or ``USER:PASSWORD@`` for an
    ACL user; percent-encode reserved characters) and ``rediss://`` for TLS; ``password`` (read from
    a secret file) applies when the URL carries none. The socket timeout leaves room for the 1 s blocking reads
    of the job store's claim; the health check pings a pooled connection idle for a second before
    reuse, so the first call after a Redis restart does not fail on a dead socket.
    """
    extra = {} if password is None else {"password": password}
    return redis.Redis.from_url(
        url, **extra, socket_connect_timeout=timeout_s, socket_timeout=timeout_s + 2.0,
        retry=Retry(NoBackoff(), 0), health_check_interval=1,
    )


def read_password_file(path: Path | None) -> str | None:
    """The password in ``path`` (a mounted Docker or Kubernetes secret), without its final newline."""
    if path is None:
        return None
    return read_secret_file(path, "Redis password", strip=lambda text: text.rstrip("\r\n"))


def describe(client: redis.Redis) -> str:
    """``host:port`` of ``client``, for messages (never the password)."""
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def guarded(what: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Decorate a method of an object with a ``_redis`` client: Redis faults raise StoreUnavailable
    naming ``what`` ("the job store") and the server's address; other errors pass through."""

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> _T:
            try:
                return method(self, *args, **kwargs)
            except redis.AuthenticationError as exc:  # NOAUTH, WRONGPASS: before its base class below
                raise StoreUnavailable(f"{what} (Redis at {describe(self._redis)}) refused the credentials: {exc}; "
                                       "set the password in the Redis URL or DIFFSERVE_REDIS_PASSWORD_FILE") from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # also LOADING (BusyLoadingError)
                raise StoreUnavailable(f"{what} (Redis at {describe(self._redis)}) is unreachable: {exc}") from exc
            except redis.ResponseError as exc:
                if isinstance(exc, _REFUSING) or str(exc).startswith(_REFUSING_CODES):
                    raise StoreUnavailable(f"{what} (Redis at {describe(self._redis)}) refuses work: {exc}") from exc
                raise
        return wrapper

    return decorate


@functools.cache
def lua(name: str) -> str:
    """The source of ``api/lua/<name>.lua`` (read once per process)."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
