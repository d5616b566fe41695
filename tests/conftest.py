"""Shared test settings: a private cache folder per run unless the caller set one, few torch threads, and Triton's
interpreter (CI has no GPU; the paged-attention kernels run on CPU through it)."""

import os

# Before anything imports triton (transformers and torch may, in any test): its jit reads this when a kernel is
# defined, and a kernel defined without it cannot run on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
