"""Per-key credits and rate limits.

Credits: one credit is one generated image. A submission reserves its cost up front (so that
concurrent submissions cannot overspend); the reservation becomes a debit when the job
completes and is released when it fails or is cancelled, so failed jobs cost nothing. What
each owner has spent is kept in a small SQLite file next to the job database, so a restart
does not refill anyone; the allowance itself comes from the settings, so raising it there
takes effect at the next start. Owners are ``owner_from_api_key`` hashes: keys are never stored.

Rate limits: a token bucket per key (capacity = the per-minute limit, refilled continuously),
kept in memory.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path


class InsufficientCredits(Exception):
    def __init__(self, remaining: int, cost: int):
        self.remaining = remaining
        self.cost = cost
        super().__init__(
            f"insufficient credits: this request needs {cost} credit{'s' if cost != 1 else ''} "
            f"(one per image) and {remaining} remain{'s' if remaining == 1 else ''}"
        )


class CreditLedger:
    def __init__(self, path: Path | None, default: int | None, per_owner: dict[str, int]):
        """``default`` applies to every owner without an entry in ``per_owner``; None: unlimited."""
        self._default = default
        self._per_owner = dict(per_owner)
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self._spent: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None and self.enabled:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS spent (owner TEXT PRIMARY KEY, credits INTEGER NOT NULL)")
            self._spent = dict(self._db.execute("SELECT owner, credits FROM spent").fetchall())

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
        with self._lock:
            return max(0, allowance - self._spent.get(owner, 0) - self._reserved.get(owner, 0))

    def reserve(self, owner: str | None, cost: int) -> None:
        allowance = self.allowance(owner)
        if allowance is None:
            return
        with self._lock:
            left = allowance - self._spent.get(owner, 0) - self._reserved.get(owner, 0)
            if left < cost:
                raise InsufficientCredits(max(0, left), cost)
            self._reserved[owner] = self._reserved.get(owner, 0) + cost

    def release(self, owner: str | None, cost: int) -> None:
        if self.allowance(owner) is None:
            return
        with self._lock:
            self._reserved[owner] = max(0, self._reserved.get(owner, 0) - cost)

    def debit(self, owner: str | None, cost: int, *, reserved: bool) -> None:
        """Charge a completed job; ``reserved``: its cost was reserved by this process."""
        if self.allowance(owner) is None:
            return
        with self._lock:
            if reserved:
                self._reserved[owner] = max(0, self._reserved.get(owner, 0) - cost)
            spent = self._spent.get(owner, 0) + cost
            self._spent[owner] = spent
            if self._db is not None:
                self._db.execute(
                    "INSERT INTO spent (owner, credits) VALUES (?, ?) "
                    "ON CONFLICT(owner) DO UPDATE SET credits = excluded.credits",
                    (owner, spent),
                )

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
