"""Per-key credits and rate limits.

Credits: one credit is one generated image. A submission reserves its cost up front (so that
concurrent submissions cannot overspend); the reservation becomes a debit when the job
completes and is released when it fails or is cancelled, so failed jobs cost nothing. Settling
a job (debit or release) names the job: the first settlement of a job is the only one, recorded
in the same transaction as the change of the balance, so a runner that settles a job again (a
sweep after a crash between storing the outcome and charging it) charges nothing twice. What
each owner has spent and holds reserved is kept in a small SQLite file next to the job
database, so a restart neither refills anyone nor forgets a queued job's reservation; the
allowance itself comes from the settings, so raising it there takes effect at the next start.
Owners are ``owner_from_api_key`` hashes: keys are never stored.

Rate limits: a token bucket per key (capacity = the per-minute limit, refilled continuously),
kept in memory.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from diffserve.api.jobs import immediate_transaction

SETTLED_MARKER_TTL_S: Final = 7 * 24 * 3600
"""How long the record that a job was settled is kept; longer than any job stays queued or kept."""


class InsufficientCredits(Exception):
    def __init__(self, remaining: int, cost: int):
        self.remaining = remaining
        self.cost = cost
        super().__init__(
            f"insufficient credits: this request needs {cost} credit{'s' if cost != 1 else ''} "
            f"(one per image) and {remaining} remain{'s' if remaining == 1 else ''}"
        )


class CreditLedger:
    """Credits in SQLite at ``path`` (in memory without one); every change is one transaction, so
    several handles on one file (threads or processes) never overspend or settle a job twice."""

    def __init__(self, path: Path | None, default: int | None, per_owner: dict[str, int],
                 clock: Callable[[], float] = time.time):
        """``default`` applies to every owner without an entry in ``per_owner``; None: unlimited."""
        self._default = default
        self._per_owner = dict(per_owner)
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if not self.enabled:
            return
        self._db = sqlite3.connect(":memory:" if path is None else str(path), timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction() as db:
            for table in ("spent", "reserved"):
                db.execute(f"CREATE TABLE IF NOT EXISTS {table} (owner TEXT PRIMARY KEY, credits INTEGER NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS settled (job_id TEXT PRIMARY KEY, at REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS settled_at ON settled (at)")
            db.execute("DELETE FROM settled WHERE at < ?", (self._clock() - SETTLED_MARKER_TTL_S,))

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise RuntimeError("CreditLedger is closed")
            with immediate_transaction(self._db) as db:
                yield db

    @staticmethod
    def _balance(db: sqlite3.Connection, table: str, owner: str) -> int:
        row = db.execute(f"SELECT credits FROM {table} WHERE owner = ?", (owner,)).fetchone()
        return int(row[0]) if row is not None else 0

    @staticmethod
    def _set(db: sqlite3.Connection, table: str, owner: str, credits: int) -> None:
        db.execute(f"INSERT INTO {table} (owner, credits) VALUES (?, ?) "
                   "ON CONFLICT(owner) DO UPDATE SET credits = excluded.credits", (owner, credits))

    @property
    def enabled(self) -> bool:
        return self._default is not None or bool(self._per_owner)

    def allowance(self, owner: str | None) -> int | None:
        if owner is None:
            return None
        return self._per_owner.get(owner, self._default)

    def remaining(self, owner: str | None) -> int | None:
        """Credits left after debits and reservations (never negative); None: unlimited."""
        allowance = self.allowance(owner)
        if allowance is None:
            return None
        with self._transaction() as db:
            return max(0, allowance - self._balance(db, "spent", owner) - self._balance(db, "reserved", owner))

    def reserve(self, owner: str | None, cost: int) -> None:
        """Hold ``cost`` credits for a submission; raises InsufficientCredits when they are not there."""
        allowance = self.allowance(owner)
        if allowance is None:
            return
        with self._transaction() as db:
            reserved = self._balance(db, "reserved", owner)
            left = allowance - self._balance(db, "spent", owner) - reserved
            if left < cost:
                raise InsufficientCredits(max(0, left), cost)
            self._set(db, "reserved", owner, reserved + cost)

    def release(self, owner: str | None, cost: int, *, job_id: str | None = None) -> bool:
        """Give back a failed or cancelled job's reservation; with ``job_id`` at most once per job."""
        return self._settle(owner, cost, debit=False, job_id=job_id)

    def debit(self, owner: str | None, cost: int, *, job_id: str | None = None) -> bool:
        """Charge a completed job (turning its reservation into a debit); with ``job_id`` once per job.

        Returns False when nothing was charged: unlimited owner, or this job was settled already.
        """
        return self._settle(owner, cost, debit=True, job_id=job_id)

    def _settle(self, owner: str | None, cost: int, *, debit: bool, job_id: str | None) -> bool:
        if self.allowance(owner) is None:
            return False
        with self._transaction() as db:
            if job_id is not None and db.execute("INSERT OR IGNORE INTO settled (job_id, at) VALUES (?, ?)",
                                                 (job_id, self._clock())).rowcount != 1:
                return False
            # A job whose reservation was lost is charged all the same, never below zero reserved.
            self._set(db, "reserved", owner, max(0, self._balance(db, "reserved", owner) - cost))
            if debit:
                self._set(db, "spent", owner, self._balance(db, "spent", owner) + cost)
            return True

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class RateLimiter:
    """Token buckets keyed by caller; ``check`` consumes one token or says how long to wait."""

    _MAX_BUCKETS = 10_000

    def __init__(self, default_per_minute: int, per_owner: dict[str, int],
                 clock: Callable[[], float] = time.monotonic):
        self._default = default_per_minute
        self._per_owner = dict(per_owner)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def limit(self, owner: str | None) -> int:
        if owner is not None and owner in self._per_owner:
            return self._per_owner[owner]
        return self._default

    def check(self, bucket_key: str, owner: str | None) -> float | None:
        """None if allowed (a token is taken), else the seconds until the next token."""
        per_minute = self.limit(owner)
        if per_minute <= 0:
            return None
        rate = per_minute / 60.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(bucket_key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[bucket_key] = (tokens - 1.0, now)
                allowed = True
            else:
                self._buckets[bucket_key] = (tokens, now)
                allowed = False
            if len(self._buckets) > self._MAX_BUCKETS:
                self._prune(now)
        return None if allowed else max(0.001, (1.0 - tokens) / rate)

    def _prune(self, now: float) -> None:
        # A bucket idle for a minute is full again: forgetting it changes nothing.
        for key, (_tokens, last) in list(self._buckets.items()):
            if now - last > 60.0:
                del self._buckets[key]


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
