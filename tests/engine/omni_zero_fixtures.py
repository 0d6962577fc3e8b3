"""Fixtures of the Omni-Zero test files (imported into each): its tiny checkpoint as torch components, one thread."""

from __future__ import annotations

import pytest
import torch

from tests.devices import torch_components


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks at ~1024 px are memory-bound; on a shared CPU two threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def omni_dir(tiny_checkpoints):
    return tiny_checkpoints["omni-zero"]


@pytest.fixture(scope="module")
def components(omni_dir):
    return torch_components(omni_dir)
