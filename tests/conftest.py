"""Shared fixtures: local Minari datasets are built once per checkout into .cache/minari."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never touch the user's ~/.minari: every dataset they need is built locally, once.
os.environ.setdefault("MINARI_DATASETS_PATH", str(ROOT / ".cache" / "minari"))
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def local_dataset():
    """Return a builder `local_dataset(name) -> dataset_id` that builds the dataset if missing."""
    from benchmark import datasets

    return datasets.ensure


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Scripts' main() may set torch's thread count (a preset's `threads`); tests run in one
    process, so put it back after each test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of small networks: with two, a shared CPU
    oversubscribes and steps get many times slower (restored by the fixture above)."""
    import torch

    torch.set_num_threads(1)
