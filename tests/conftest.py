"""Shared test settings: a private cache folder per run unless the caller set one, and few torch threads."""

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
