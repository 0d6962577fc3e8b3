"""The credit ledger and the rate limiter as plain logic (``diffserve.api.quotas``): no server, a fake clock."""

from __future__ import annotations

import threading

import pytest

from diffserve.api.quotas import CreditLedger, InsufficientCredits, RateLimiter, retry_after_header


# -- credits ---------------------------------------------------------------------------------------


def test_no_allowance_means_unlimited_and_no_file(tmp_path):
    ledger = CreditLedger(tmp_path / "credits.sqlite", None, {})
    assert not ledger.enabled and ledger.remaining("anyone") is None
    ledger.reserve("anyone", 10**9)
    ledger.debit("anyone", 10**9, job_id="j0")
    assert ledger.remaining("anyone") is None
    assert not (tmp_path / "credits.sqlite").exists()


def test_an_open_server_caller_is_never_charged(tmp_path):
    ledger = CreditLedger(None, 1, {})
    assert ledger.allowance(None) is None and ledger.remaining(None) is None
    ledger.reserve(None, 5)  # no owner: nothing to count against
    assert ledger.remaining("someone") == 1


def test_reserve_release_debit(tmp_path):
    ledger = CreditLedger(tmp_path / "credits.sqlite", 10, {"rich": 100})
    assert ledger.remaining("a") == 10 and ledger.remaining("rich") == 100
    ledger.reserve("a", 4)
    assert ledger.remaining("a") == 6
    ledger.release("a", 4)  # a failed job costs nothing
    assert ledger.remaining("a") == 10
    ledger.reserve("a", 4)
    assert ledger.debit("a", 4, job_id="j1")  # the reservation becomes the debit, not both
    assert ledger.remaining("a") == 6
    assert not ledger.debit("a", 4, job_id="j1") and not ledger.release("a", 4, job_id="j1")  # once per job
    assert ledger.remaining("a") == 6
    ledger.debit("a", 2, job_id="j2")  # a job whose reservation was lost
    assert ledger.remaining("a") == 4
    assert ledger.remaining("rich") == 100  # owners are counted apart
    ledger.close()


def test_insufficient_credits_names_cost_and_what_remains(tmp_path):
    ledger = CreditLedger(None, 3, {})
    ledger.reserve("a", 2)
    with pytest.raises(InsufficientCredits) as info:
        ledger.reserve("a", 2)
    assert (info.value.remaining, info.value.cost) == (1, 2)
    assert str(info.value) == "insufficient credits: this request needs 2 credits (one per image) and 1 remains"
    assert ledger.remaining("a") == 1  # the refused reservation took nothing
    ledger.reserve("a", 1)
    with pytest.raises(InsufficientCredits, match="needs 1 credit \\(one per image\\) and 0 remain$"):
        ledger.reserve("a", 1)


def test_remaining_and_reservations_never_go_negative(tmp_path):
    ledger = CreditLedger(None, 2, {})
    ledger.release("a", 5)  # releasing more than was reserved does not create credit
    assert ledger.remaining("a") == 2
    ledger.debit("a", 5, job_id="j1")  # a debit past the allowance (allowance lowered at restart)
    assert ledger.remaining("a") == 0


def test_spent_credits_survive_a_restart_and_the_allowance_comes_from_settings(tmp_path):
    path = tmp_path / "credits.sqlite"
    ledger = CreditLedger(path, 10, {})
    ledger.reserve("a", 3)
    ledger.debit("a", 3, job_id="j1")
    ledger.reserve("a", 5)  # a job still queued at the restart keeps its reservation
    ledger.close()
    again = CreditLedger(path, 10, {})
    assert again.remaining("a") == 2
    assert not again.debit("a", 3, job_id="j1")  # settled before the restart: not charged twice
    assert again.release("a", 5, job_id="j2") and again.remaining("a") == 7
    again.close()
    raised = CreditLedger(path, 20, {})  # the allowance was raised in the settings
    assert raised.remaining("a") == 17
    raised.close()


def test_concurrent_reservations_cannot_overspend():
    ledger = CreditLedger(None, 10, {})
    won: list[bool] = []
    barrier = threading.Barrier(25)

    def reserve() -> None:
        barrier.wait()
        try:
            ledger.reserve("a", 1)
            won.append(True)
        except InsufficientCredits:
            won.append(False)

    threads = [threading.Thread(target=reserve) for _ in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won.count(True) == 10 and ledger.remaining("a") == 0


# -- rate limits -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_zero_means_no_limit():
    limiter = RateLimiter(0, {}, clock=Clock())
    assert all(limiter.check("k", "owner") is None for _ in range(1000))


def test_token_bucket_allows_a_burst_then_one_per_interval():
    clock = Clock()
    limiter = RateLimiter(2, {}, clock=clock)  # 2 a minute: one token every 30 s
    assert limiter.check("k", "o") is None
    assert limiter.check("k", "o") is None
    assert limiter.check("k", "o") == pytest.approx(30.0)
    clock.now += 10
    assert limiter.check("k", "o") == pytest.approx(20.0)  # a refused check takes no token
    clock.now += 20
    assert limiter.check("k", "o") is None
    assert limiter.check("k", "o") == pytest.approx(30.0)
    clock.now += 3600  # a long idle time refills to the capacity, no more
    assert [limiter.check("k", "o") is None for _ in range(3)] == [True, True, False]


def test_per_owner_limits_and_separate_buckets():
    clock = Clock()
    limiter = RateLimiter(1, {"vip": 3}, clock=clock)
    assert limiter.limit("vip") == 3 and limiter.limit("other") == 1 and limiter.limit(None) == 1
    assert [limiter.check("vip", "vip") is None for _ in range(4)] == [True, True, True, False]
    assert limiter.check("address:10.0.0.1", None) is None  # other buckets are untouched
    assert limiter.check("address:10.0.0.2", None) is None
    assert limiter.check("address:10.0.0.1", None) == pytest.approx(60.0)


def test_idle_buckets_are_forgotten_past_the_cap(monkeypatch):
    clock = Clock()
    limiter = RateLimiter(1, {}, clock=clock)
    monkeypatch.setattr(RateLimiter, "_MAX_BUCKETS", 10)
    for i in range(10):
        limiter.check(f"k{i}", None)
    clock.now += 61
    limiter.check("fresh", None)  # the 11th bucket: the idle ten are pruned
    assert set(limiter._buckets) == {"fresh"}
    assert limiter.check("k0", None) is None  # a forgotten bucket is a full one


@pytest.mark.parametrize(("seconds", "header"), [(0.001, "1"), (0.2, "1"), (1.0, "1"), (1.5, "2"), (30.0, "30")])
def test_retry_after_is_whole_seconds_rounded_up(seconds, header):
    assert retry_after_header(seconds) == header
