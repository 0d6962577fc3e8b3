"""Pad a compiled network's batch to a few fixed sizes, compiled at load, never inside a request.

A Triton component model's dynamic batcher forms any batch from 1 to ``max_batch``; a graph compiled
with static shapes (``torch.compile(dynamic=False)``, CUDA graphs) would recompile on the first request
of every new size, inside that request (tens of seconds at full size). ``BucketedModule`` rounds the
batch up to the next bucket (powers of two up to ``max_batch``, and ``max_batch`` itself), zero-pads
the batched inputs, slices the outputs back, and ``warm_up`` compiles every bucket when the model loads.
Cost: at most ``log2(max_batch) + 2`` compilations at load, and up to 2x the batch's compute on a
padded call (a batch of 5 runs as 8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def batch_buckets(min_batch: int, max_batch: int) -> list[int]:
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch}, {max_batch}")
    buckets, size = [], 1
    while size < max_batch:
        if size >= min_batch:
            buckets.append(size)
        size *= 2
    return buckets + [max_batch]


class BucketedModule:
    """``module(*args)`` with the batch axis (dim 0 of every tensor argument) padded to a bucket."""

    def __init__(self, module: Callable[..., object], buckets: Sequence[int]):
        self.module = module
        self.buckets = sorted(buckets)

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} is larger than the largest bucket {self.buckets[-1]}")

    def __call__(self, *args: torch.Tensor | None):
        batch = next(a.shape[0] for a in args if a is not None)
        size = self.bucket(batch)
        if size != batch:
            args = tuple(None if a is None else torch.cat([a, a.new_zeros((size - batch, *a.shape[1:]))])
                         for a in args)
        outs = self.module(*args)
        if size == batch:
            return outs
        if isinstance(outs, tuple):
            return tuple(o[:batch] for o in outs)
        return outs[:batch]

    def warm_up(self, make_args: Callable[[int], Sequence[torch.Tensor | None]]) -> list[int]:
        """Run every bucket once (``make_args(batch)`` builds its inputs); returns the sizes compiled."""
        for size in self.buckets:
            self.module(*make_args(size))
        return list(self.buckets)
