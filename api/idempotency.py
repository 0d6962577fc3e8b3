"""``Idempotency-Key`` on ``POST /v2/{slug}``: a retried submission gets the original request id.

This module owns the key records and the rule (draft-ietf-httpapi-idempotency-key-header): the
first request with a key reserves it (in flight), submits, then records its request id; a later
request from the same API key with the same key

* and the same body (same slug, same JSON, whatever its formatting or key order) is answered with
  the original request id and ``Idempotent-Replayed: true``: no second job, so no second charge
  (credits are reserved per job by the runner);
* and a different body is refused with **422** (the draft's answer to a key reused for another
  payload: the request is well-formed but cannot be processed as given);
* while the first is still being submitted is refused with **409** and ``Retry-After`` (the
  draft's answer to a concurrent duplicate).

A key is remembered for ``Settings.idempotency_retention_s`` after its request was accepted; a
reservation whose submitter died lapses after :data:`IN_FLIGHT_S` (a process killed between
creating the job and recording its id leaves a job the key does not name: a retry after the
lapse makes a second one). Keys are scoped by API key
(owner), so two clients never see each other's. Two stores, chosen by ``api.queue.open_stores``:
:class:`SqliteIdempotencyStore` (a table in its own file: survives restarts) and
:class:`RedisIdempotencyStore` (``SET NX`` of the body's fingerprint, then the request id: holds
across API replicas).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from api.redis_client import guarded, lua

__all__ = ["HEADER", "REPLAYED_HEADER", "IdempotencyConflict", "IdempotencyStore", "RedisIdempotencyStore",
           "SqliteIdempotencyStore", "check_key", "fingerprint", "requested_key", "submit_once"]

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
IN_FLIGHT_S = 120.0
"""How long a reservation holds without a request id: longer than a submission takes (image
fetches included), short enough that a key whose submitter crashed becomes usable again."""


class IdempotencyConflict(Exception):
    """The key cannot be used for this request now; ``status`` is the HTTP answer (422 or 409)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Recorded:
    """What a key already holds: the fingerprint of its body and, once accepted, its request id."""

    fingerprint: str
    job_id: str | None


def fingerprint(slug: str, payload: dict) -> str:
    """SHA-256 of the slug and the body as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{slug}\n{canonical}".encode()).hexdigest()


def _scope(owner: str | None) -> str:
    return owner or "-"  # an open server: one scope for everyone


@runtime_checkable
class IdempotencyStore(Protocol):
    def reserve(self, owner: str | None, key: str, fingerprint: str) -> Recorded | None:
        """None: the caller now holds ``key`` (then ``complete`` or ``release`` it); else what it holds."""

    def complete(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None: ...

    def release(self, owner: str | None, key: str, fingerprint: str) -> None:
        """Drop the caller's reservation (its submission was refused: the key may be retried)."""

    def close(self) -> None: ...


class SqliteIdempotencyStore:
    """Key records of the embedded store, in their own SQLite file (fsynced like the job store)."""

    def __init__(self, path: Path, retention_s: float, *, clock: Callable[[], float] = time.time):
        self.retention_s = retention_s
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS idempotency_keys (
            scope TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, job_id TEXT,
            expires_at REAL NOT NULL, PRIMARY KEY (scope, key))""")
        self._db.execute("CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency_keys (expires_at)")

    def reserve(self, owner: str | None, key: str, fingerprint: str) -> Recorded | None:
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO idempotency_keys (scope, key, fingerprint, job_id, expires_at) "
                    "VALUES (?, ?, ?, NULL, ?)", (_scope(owner), key, fingerprint, now + IN_FLIGHT_S)).rowcount
                row = None if inserted else self._db.execute(
                    "SELECT fingerprint, job_id FROM idempotency_keys WHERE scope = ? AND key = ?",
                    (_scope(owner), key)).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else Recorded(*row)

    def complete(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE idempotency_keys SET job_id = ?, expires_at = ? "
                             "WHERE scope = ? AND key = ? AND fingerprint = ?",
                             (job_id, self._clock() + self.retention_s, _scope(owner), key, fingerprint))

    def release(self, owner: str | None, key: str, fingerprint: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND fingerprint = ? "
                             "AND job_id IS NULL", (_scope(owner), key, fingerprint))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisIdempotencyStore:
    """Key records on the shared Redis: ``<ns>:idem:<owner>:<sha256 of the key>`` holds
    ``<fingerprint>:`` while in flight (``SET NX``, :data:`IN_FLIGHT_S`) and
    ``<fingerprint>:<request id>`` once accepted (for the retention)."""

    def __init__(self, client: Any, namespace: str, retention_s: float):
        self._redis = client
        self._prefix = f"{namespace}:idem:"
        self.retention_s = retention_s
        self._release = client.register_script(lua("idempotency_release"))

    def _key(self, owner: str | None, key: str) -> str:
        return f"{self._prefix}{_scope(owner)}:{hashlib.sha256(key.encode()).hexdigest()}"

    @guarded("the idempotency keys")
    def reserve(self, owner: str | None, key: str, fingerprint: str) -> Recorded | None:
        name = self._key(owner, key)
        while True:
            if self._redis.set(name, f"{fingerprint}:", nx=True, px=int(IN_FLIGHT_S * 1000)):
                return None
            held = self._redis.get(name)
            if held is not None:  # else it expired between the two commands: try again
                recorded_fp, _, job_id = held.decode().partition(":")
                return Recorded(recorded_fp, job_id or None)

    @guarded("the idempotency keys")
    def complete(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        self._redis.set(self._key(owner, key), f"{fingerprint}:{job_id}", px=int(self.retention_s * 1000))

    @guarded("the idempotency keys")
    def release(self, owner: str | None, key: str, fingerprint: str) -> None:
        self._release(keys=[self._key(owner, key)], args=[f"{fingerprint}:"])

    def close(self) -> None:
        pass  # the client is the job store's; it closes it


def check_key(key: str) -> str:
    """The header's value, or ValueError (a 400) for an empty or overlong one."""
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters")
    return key


def requested_key(headers: Mapping[str, str]) -> str | None:
    """The request's ``Idempotency-Key`` (checked), or None when it sent none."""
    key = headers.get(HEADER)
    return None if key is None else check_key(key)


async def submit_once(store: IdempotencyStore, owner: str | None, key: str | None, body_fingerprint: str,
                      submit: Callable[[], Awaitable[str]]) -> tuple[str, bool]:
    """Run ``submit`` (it returns the new request id) unless ``key`` already names a request of
    ``owner``: returns (request id, replayed). Without a key ``submit`` simply runs. Raises
    IdempotencyConflict (422, 409)."""
    if key is None:
        return await submit(), False
    recorded = await asyncio.to_thread(store.reserve, owner, key, body_fingerprint)
    if recorded is not None:
        if recorded.fingerprint != body_fingerprint:
            raise IdempotencyConflict(422, f"this {HEADER} was used for a different request body; use a new key "
                                           "for a new request")
        if recorded.job_id is None:
            raise IdempotencyConflict(409, f"a request with this {HEADER} is still being submitted; retry shortly")
        return recorded.job_id, True
    try:
        job_id = await submit()
    except BaseException:
        await asyncio.to_thread(store.release, owner, key, body_fingerprint)
        raise
    await asyncio.to_thread(store.complete, owner, key, body_fingerprint, job_id)
    return job_id, False
