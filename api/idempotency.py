"""``Idempotency-Key`` on ``POST /v2/{slug}``: a retried submission gets the original request id.

This module owns the key records and the rule (draft-ietf-httpapi-idempotency-key-header): the
first request with a key reserves it, and the reservation draws the request id the job will be
created under (``JobQueue.create(job_id=...)``); the request then submits under that id and marks
the key accepted. A later request from the same API key with the same key

* and the same body (same slug, same JSON, whatever its formatting or key order) is answered with
  the original request id and ``Idempotent-Replayed: true``: no second job, so no second charge
  (credits are reserved per job by the runner);
* and a different body is refused with **422** (the draft's answer to a key reused for another
  payload: the request is well-formed but cannot be processed as given);
* while the first is still being submitted is refused with **409** and ``Retry-After`` (the
  draft's answer to a concurrent duplicate).

A reservation not marked accepted within :data:`IN_FLIGHT_S` has lapsed (its submitter died or
stalled). Because the reservation names the request id before any job exists, a retry after the
lapse can tell what happened: if a job has that id, the submitter created it and died before
marking the key, and the retry is answered with that id (replayed); if none has, the retry takes
the reservation over (same id, a fresh in-flight period) and creates the job itself. A stalled
submitter and a taker racing to create the same id meet in ``DuplicateJob``: exactly one job, and
the one refused answers with its id. So a process killed between creating the job and recording
it under the key no longer makes a retry create a second job. A submission refused after
reserving (no credits, a bad image, a full queue) frees the key so a corrected retry can use it;
a refused takeover keeps the key reserved (the first submitter may still be creating the job),
and once a reservation was taken over its first submitter's refusal no longer frees it. The job
is looked up in the job store, so one already past the job retention when the retry comes looks
never created (and is made again).

A key is remembered for ``Settings.idempotency_retention_s`` from its reservation, and again from
its acceptance. Keys are scoped
by API key (owner), so two clients never see each other's. Two stores, chosen by
``diffserve.api.queue.open_stores``: :class:`SqliteIdempotencyStore` (a table in its own file: survives
restarts) and :class:`RedisIdempotencyStore` (``SET NX`` of the body's fingerprint and the request
id: holds across API replicas).
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

from diffserve.api.jobs import DuplicateJob, new_job_id
from diffserve.api.redis_client import guarded, lua

__all__ = ["HEADER", "REPLAYED_HEADER", "IdempotencyConflict", "IdempotencyStore", "RedisIdempotencyStore",
           "SqliteIdempotencyStore", "check_key", "fingerprint", "requested_key", "submit_once"]

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
IN_FLIGHT_S = 120.0
"""How long a reservation is left to its submitter before a retry may look for its job (and take
the reservation over if there is none): longer than a submission takes (image fetches included),
short enough that a key whose submitter crashed becomes usable again."""


class IdempotencyConflict(Exception):
    """The key cannot be used for this request now; ``status`` is the HTTP answer (422 or 409)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Recorded:
    """What a key holds: the fingerprint of its body, the request id its reservation drew, whether
    that request was accepted, and (in flight) when it was reserved."""

    fingerprint: str
    job_id: str | None
    """None only for an in-flight record written before reservations drew the id."""
    accepted: bool = False
    reserved_at: float | None = None
    lapsed: bool = False
    """In flight for :data:`IN_FLIGHT_S` or longer, by the store's clock."""
    taken_over: bool = False
    """In flight for a retry that took the reservation over (its first submitter can no longer release it)."""


def fingerprint(slug: str, payload: dict) -> str:
    """SHA-256 of the slug and the body as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{slug}\n{canonical}".encode()).hexdigest()


def _scope(owner: str | None) -> str:
    return owner or "-"  # an open server: one scope for everyone


@runtime_checkable
class IdempotencyStore(Protocol):
    def reserve(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> Recorded | None:
        """None: the caller now holds ``key`` for a request with id ``job_id`` (then ``complete`` or
        ``release`` it); else what the key holds."""

    def take_over(self, owner: str | None, key: str, held: Recorded) -> bool:
        """Start a new in-flight period of the lapsed reservation ``held`` (same id), for this
        caller; False if the key no longer holds exactly ``held`` (another retry took it)."""

    def complete(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        """Mark the key's request ``job_id`` accepted (kept for the retention)."""

    def release(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        """Drop the reservation of ``job_id`` while still in flight and not taken over (its
        submission was refused: the key may be retried)."""

    def close(self) -> None: ...


def _lapsed(reserved_at: float | None, now: float) -> bool:
    return reserved_at is not None and now - reserved_at >= IN_FLIGHT_S


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
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(idempotency_keys)")}
        # Rows written before reservations drew the id: job_id set means accepted, NULL in flight.
        if "accepted" not in columns:
            self._db.execute("ALTER TABLE idempotency_keys ADD COLUMN accepted INTEGER NOT NULL DEFAULT 1")
            self._db.execute("UPDATE idempotency_keys SET accepted = 0 WHERE job_id IS NULL")
        if "reserved_at" not in columns:
            self._db.execute("ALTER TABLE idempotency_keys ADD COLUMN reserved_at REAL")
        if "taken_over" not in columns:
            self._db.execute("ALTER TABLE idempotency_keys ADD COLUMN taken_over INTEGER NOT NULL DEFAULT 0")
        self._db.execute("CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency_keys (expires_at)")

    def _expires(self, now: float) -> float:
        return now + max(self.retention_s, IN_FLIGHT_S)

    def reserve(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> Recorded | None:
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO idempotency_keys (scope, key, fingerprint, job_id, accepted, reserved_at, "
                    "expires_at) VALUES (?, ?, ?, ?, 0, ?, ?)",
                    (_scope(owner), key, fingerprint, job_id, now, self._expires(now))).rowcount
                row = None if inserted else self._db.execute(
                    "SELECT fingerprint, job_id, accepted, reserved_at, taken_over FROM idempotency_keys "
                    "WHERE scope = ? AND key = ?", (_scope(owner), key)).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if row is None:
            return None
        held_fp, held_id, accepted, reserved_at, taken_over = row
        return Recorded(held_fp, held_id, bool(accepted), reserved_at, not accepted and _lapsed(reserved_at, now),
                        bool(taken_over))

    def take_over(self, owner: str | None, key: str, held: Recorded) -> bool:
        now = self._clock()
        with self._lock:
            return self._db.execute(
                "UPDATE idempotency_keys SET reserved_at = ?, expires_at = ?, taken_over = 1 "
                "WHERE scope = ? AND key = ? AND fingerprint = ? AND job_id = ? AND accepted = 0 AND reserved_at = ?",
                (now, self._expires(now), _scope(owner), key, held.fingerprint, held.job_id,
                 held.reserved_at)).rowcount == 1

    def complete(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE idempotency_keys SET job_id = ?, accepted = 1, expires_at = ? "
                             "WHERE scope = ? AND key = ? AND fingerprint = ?",
                             (job_id, self._clock() + self.retention_s, _scope(owner), key, fingerprint))

    def release(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND fingerprint = ? "
                             "AND job_id = ? AND accepted = 0 AND taken_over = 0",
                             (_scope(owner), key, fingerprint, job_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisIdempotencyStore:
    """Key records on the shared Redis: ``<ns>:idem:<owner>:<sha256 of the key>`` holds
    ``<fingerprint>:<request id>:<reserved at>`` while in flight (``SET NX``; ``:taken`` appended
    once a retry took it over) and
    ``<fingerprint>:<request id>`` once accepted, each for the retention. Takeover and release
    are compare-and-set scripts (``idempotency_swap.lua``)."""

    def __init__(self, client: Any, namespace: str, retention_s: float, *,
                 clock: Callable[[], float] = time.time):
        self._redis = client
        self._prefix = f"{namespace}:idem:"
        self.retention_s = retention_s
        self._clock = clock
        self._swap = client.register_script(lua("idempotency_swap"))

    def _key(self, owner: str | None, key: str) -> str:
        return f"{self._prefix}{_scope(owner)}:{hashlib.sha256(key.encode()).hexdigest()}"

    def _ttl_ms(self) -> int:
        return int(max(self.retention_s, IN_FLIGHT_S) * 1000)

    @staticmethod
    def _in_flight(fingerprint: str, job_id: str, reserved_at: float, taken_over: bool = False) -> str:
        return f"{fingerprint}:{job_id}:{reserved_at!r}" + (":taken" if taken_over else "")

    @guarded("the idempotency keys")
    def reserve(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> Recorded | None:
        name = self._key(owner, key)
        while True:
            now = self._clock()
            if self._redis.set(name, self._in_flight(fingerprint, job_id, now), nx=True, px=self._ttl_ms()):
                return None
            held = self._redis.get(name)
            if held is None:  # it expired between the two commands: try again
                continue
            parts = held.decode().split(":")
            if len(parts) >= 3:
                reserved_at = float(parts[2])
                return Recorded(parts[0], parts[1], False, reserved_at, _lapsed(reserved_at, now), len(parts) > 3)
            # "<fingerprint>:<request id>" accepted, or "<fingerprint>:" (in flight, written before
            # reservations drew the id; it lapses by its own TTL).
            return Recorded(parts[0], parts[1] or None, bool(parts[1]))

    @guarded("the idempotency keys")
    def take_over(self, owner: str | None, key: str, held: Recorded) -> bool:
        old = self._in_flight(held.fingerprint, held.job_id, held.reserved_at, held.taken_over)
        new = self._in_flight(held.fingerprint, held.job_id, self._clock(), True)
        return bool(self._swap(keys=[self._key(owner, key)], args=[old, 1, new, self._ttl_ms()]))

    @guarded("the idempotency keys")
    def complete(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        self._redis.set(self._key(owner, key), f"{fingerprint}:{job_id}", px=int(self.retention_s * 1000))

    @guarded("the idempotency keys")
    def release(self, owner: str | None, key: str, fingerprint: str, job_id: str) -> None:
        self._swap(keys=[self._key(owner, key)], args=[f"{fingerprint}:{job_id}:", 0, "", 0])

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


def _in_flight() -> IdempotencyConflict:
    return IdempotencyConflict(409, f"a request with this {HEADER} is still being submitted; retry shortly")


async def submit_once(store: IdempotencyStore, owner: str | None, key: str | None, body_fingerprint: str,
                      submit: Callable[[str | None], Awaitable[str]],
                      adopt: Callable[[str], Awaitable[bool]]) -> tuple[str, bool]:
    """Submit a request at most once per ``key`` of ``owner``: returns (request id, replayed).

    ``submit(job_id)`` creates the job under ``job_id`` (None without a key: the store draws one)
    and whatever goes with it, and returns its id; it raises ``diffserve.api.jobs.DuplicateJob`` when a job
    has that id already. ``adopt(job_id)`` says whether that job exists and, if it does, records
    again what goes with it (a no-op where already recorded): the answer for a lapsed reservation
    whose submitter created the job and died. Raises IdempotencyConflict (422, 409).
    """
    if key is None:
        return await submit(None), False
    job_id = new_job_id()
    held = await asyncio.to_thread(store.reserve, owner, key, body_fingerprint, job_id)
    if held is not None:
        if held.fingerprint != body_fingerprint:
            raise IdempotencyConflict(422, f"this {HEADER} was used for a different request body; use a new key "
                                           "for a new request")
        if held.accepted:
            return held.job_id, True
        if held.job_id is None or not held.lapsed:
            raise _in_flight()
        job_id = held.job_id
        if not await adopt(job_id):
            if not await asyncio.to_thread(store.take_over, owner, key, held):
                raise _in_flight()  # another retry took it over first
            return await _create(store, owner, key, body_fingerprint, job_id, submit, adopt, free_on_refusal=False)
        await asyncio.to_thread(store.complete, owner, key, body_fingerprint, job_id)
        return job_id, True
    return await _create(store, owner, key, body_fingerprint, job_id, submit, adopt, free_on_refusal=True)


async def _create(store: IdempotencyStore, owner: str | None, key: str, body_fingerprint: str, job_id: str,
                  submit: Callable[[str | None], Awaitable[str]], adopt: Callable[[str], Awaitable[bool]], *,
                  free_on_refusal: bool) -> tuple[str, bool]:
    """Submit under the reserved ``job_id`` and mark the key accepted; a job created under that id
    by another submitter meanwhile is adopted (replayed)."""
    replayed = False
    try:
        await submit(job_id)
    except DuplicateJob:
        await adopt(job_id)
        replayed = True
    except BaseException:
        if free_on_refusal:
            await asyncio.to_thread(store.release, owner, key, body_fingerprint, job_id)
        raise
    await asyncio.to_thread(store.complete, owner, key, body_fingerprint, job_id)
    return job_id, replayed
