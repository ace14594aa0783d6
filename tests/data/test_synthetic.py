"""The synthetic generator: determinism, cardinalities, skew, label model."""

from __future__ import annotations

import numpy as np
import pytest

from embcompress.data import KAGGLE_CARDINALITIES, bayes_auc, make_synthetic
from embcompress.data.synthetic import generate_block, resolve_cardinalities


def test_kaggle_cardinalities():
    assert len(KAGGLE_CARDINALITIES) == 26 and sum(KAGGLE_CARDINALITIES) == 33_762_577
    assert sum(resolve_cardinalities(26, 1.0, None)) == 33_762_577
    assert min(resolve_cardinalities(26, 1e-6, None)) == 2


def test_deterministic_and_prefix_stable():
    a = make_synthetic(rows=70_000, seed=3)
    b = make_synthetic(rows=70_000, seed=3)
    c = make_synthetic(rows=70_000, seed=4)
    for name in ("dense", "sparse", "labels", "probs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.sparse, c.sparse)
    d = make_synthetic(rows=1000, seed=3)  # rows are generated in seeded blocks: a prefix is the same
    np.testing.assert_array_equal(d.sparse, a.sparse[:1000])


def test_shapes_ranges_and_skew():
    ds = make_synthetic(rows=100_000, fields=5, scale=0.01, skew=1.1, dense=3)
    assert ds.dense.shape == (100_000, 3) and ds.sparse.shape == (100_000, 5) and ds.sparse.dtype == np.int32
    assert ds.field_sizes == [15, 6, 101312, 22026, 3]
    assert (ds.sparse >= 0).all() and (ds.sparse < np.array(ds.field_sizes)).all()
    col = ds.sparse[:, 2]
    counts = np.sort(np.bincount(col, minlength=ds.field_sizes[2]))[::-1]
    head_share = counts[:100].sum() / counts.sum()  # top 0.1% of ids
    assert 0.3 < head_share < 0.8, head_share
    assert counts[0] != np.bincount(col)[0] or np.argmax(np.bincount(col)) != 0  # popularity != id order
    flat = make_synthetic(rows=100_000, fields=5, skew=0.3, dense=3)
    assert np.sort(np.bincount(flat.sparse[:, 2]))[::-1][:100].sum() / 100_000 < head_share / 3


def test_label_model_defaults():
    ds = make_synthetic(rows=200_000)
    assert 0.2 <= ds.labels.mean() <= 0.3
    assert 0.75 <= bayes_auc(ds) <= 0.85
    assert abs(ds.probs.mean() - ds.labels.mean()) < 0.01


def test_drift_changes_popularity():
    ds = make_synthetic(rows=80_000, fields=3, drift=1.0, dense=1)
    first, last = ds.sparse[:10_000, 2], ds.sparse[-10_000:, 2]
    assert np.argmax(np.bincount(first)) != np.argmax(np.bincount(last))
    still = make_synthetic(rows=80_000, fields=3, drift=0.0, dense=1).sparse[:, 2]
    assert np.argmax(np.bincount(still[:10_000])) == np.argmax(np.bincount(still[-10_000:]))


def test_block_generator_matches():
    from embcompress.data.synthetic import SyntheticSpec, _HiddenModel

    spec = SyntheticSpec(rows=10, cardinalities=[5, 7], skew=1.1, drift=0.0, seed=0, dense=2)
    out = generate_block(_HiddenModel(spec), 0)
    assert out["ids"].shape == (10, 2) and out["probs"].shape == (10,)


def test_drift_stages_one_change_halfway():
    kw = dict(rows=80_000, fields=3, drift=1.0, dense=1)
    ds = make_synthetic(**kw, drift_stages=2)
    col, half = ds.sparse[:, 2], 40_000

    def top(x: np.ndarray) -> set[int]:
        return set(np.argsort(np.bincount(x, minlength=ds.field_sizes[2]))[::-1][:20].tolist())

    # one popularity order per half: the two quarters of a half agree, the halves do not
    assert len(top(col[:20_000]) & top(col[20_000:half])) >= 15
    assert len(top(col[half:60_000]) & top(col[60_000:])) >= 15
    assert len(top(col[:half]) & top(col[half:])) <= 2
    # the first half is stage 0 of the default (8 stages) too; the default is unchanged by the option
    np.testing.assert_array_equal(ds.sparse[:10_000], make_synthetic(**kw).sparse[:10_000])
    np.testing.assert_array_equal(make_synthetic(**kw).sparse, make_synthetic(**kw, drift_stages=8).sparse)
    assert "drift_stages" not in make_synthetic(**kw).meta["options"]
    with pytest.raises(ValueError):
        make_synthetic(rows=10, drift_stages=9)
