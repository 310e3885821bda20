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


@pytest.fixture
def twin(monkeypatch):
    """Return `twin(dataset_id) -> dataset_id` for a REAL Minari id (tests/twins.py TWINS).

    Builds the schema twin once per checkout into .cache/twins/<hash of tests/twins.py> (a
    cheap no-op when present) and points MINARI_DATASETS_PATH there for this test, so the
    scripts' `minari.load_dataset(dataset_id)` finds it (Minari reads the variable at each
    call). Skips the test when the twin's environment cannot be built here."""
    import twins

    root = twins.cache_root(ROOT)

    def make(dataset_id: str) -> str:
        try:
            twins.build_twin(dataset_id, root)
        except twins.TwinUnavailable as err:
            pytest.skip(str(err))
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
        return dataset_id

    return make
