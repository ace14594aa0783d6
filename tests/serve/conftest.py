"""A tiny preprocessed Criteo-format dataset shared by the serving tests."""

from __future__ import annotations

import pytest

from embcompress.data import preprocess_criteo, write_synthetic_tsv


@pytest.fixture(scope="session")
def criteo_tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "train.tsv"
    write_synthetic_tsv(path, 700, scale=0.0005, seed=3, progress=False)
    return path


@pytest.fixture(scope="session")
def criteo_dir(tmp_path_factory, criteo_tsv):
    out = tmp_path_factory.mktemp("data") / "ds"
    preprocess_criteo(criteo_tsv, out, progress=False)
    return out
