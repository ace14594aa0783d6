"""Shared fixtures: small synthetic datasets and the path of the real Criteo sample."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo_kaggle_sample_10k.tsv"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP
    spinning made training runs up to 17x slower with two (measured: 82 s vs 4.7 s for one CAFE run)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_synthetic():
    from embcompress.data import make_synthetic
    return make_synthetic(rows=40_000, fields=8, scale=0.002, seed=0)


@pytest.fixture
def criteo_sample() -> Path:
    if not CRITEO_SAMPLE.is_file():
        pytest.skip(f"the Criteo sample is not at {CRITEO_SAMPLE} (it ships in the project's shared/ folder)")
    return CRITEO_SAMPLE
