"""Compiled torch component models see only bucket-sized batches, all compiled at load."""

from __future__ import annotations

import pytest
import torch

from diffserve.engine.batch_buckets import BucketedModule, batch_buckets


def test_buckets_cover_every_batch_the_batcher_can_form():
    assert batch_buckets(1, 8) == [1, 2, 4, 8]
    assert batch_buckets(1, 6) == [1, 2, 4, 6]
    assert batch_buckets(2, 2) == [2]
    with pytest.raises(ValueError):
        batch_buckets(3, 2)


def test_padded_calls_return_what_the_unpadded_call_returns_and_only_buckets_are_seen():
    seen = []
    linear = torch.nn.Linear(4, 3)

    def module(x, t):
        seen.append(x.shape[0])
        return linear(x) * t[:, None], x.sum(dim=1)

    bucketed = BucketedModule(module, batch_buckets(1, 8))
    assert bucketed.warm_up(lambda b: (torch.zeros(b, 4), torch.zeros(b))) == [1, 2, 4, 8]
    seen.clear()
    for batch in range(1, 9):
        x, t = torch.randn(batch, 4), torch.rand(batch)
        a, b = bucketed(x, t)
        want_a, want_b = linear(x) * t[:, None], x.sum(dim=1)
        assert a.shape == (batch, 3) and torch.allclose(a, want_a) and torch.allclose(b, want_b)
    assert set(seen) == {1, 2, 4, 8}
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucketed(torch.zeros(9, 4), torch.zeros(9))
