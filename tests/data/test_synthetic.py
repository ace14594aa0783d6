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

    spec = SyntheticSpec(rows=10, cardinalities=[5, 7], skew=[1.1, 1.1], drift=0.0, seed=0, dense=2)
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


def test_per_field_skew_and_the_criteo_sample_preset():
    from embcompress.data.synthetic import CRITEO_SAMPLE_SKEW, resolve_skews

    assert resolve_skews(3, 1.2) == [1.2] * 3 and resolve_skews(2, "0.9") == [0.9, 0.9]
    assert resolve_skews(3, [1.0, 1.5, 2.0]) == [1.0, 1.5, 2.0]
    assert resolve_skews(28, "criteo-sample") == CRITEO_SAMPLE_SKEW + CRITEO_SAMPLE_SKEW[:2]  # cycled
    assert len(CRITEO_SAMPLE_SKEW) == 26
    for bad in ([1.0], [1.0, 0.0, 1.0], "zipf", -1.0):
        with pytest.raises(ValueError):
            resolve_skews(3, bad)
    # a scalar and the same value per field give the same rows, bit for bit
    a = make_synthetic(rows=5_000, fields=3, scale=0.01, skew=1.1, dense=2)
    b = make_synthetic(rows=5_000, fields=3, scale=0.01, skew=[1.1, 1.1, 1.1], dense=2)
    np.testing.assert_array_equal(a.sparse, b.sparse)
    np.testing.assert_array_equal(a.probs, b.probs)
    # each field follows its own exponent: the steeper field's most frequent id takes a larger share
    ds = make_synthetic(rows=50_000, fields=2, cardinalities=[1000, 1000], skew=[0.8, 2.0], dense=1)
    top1 = [np.bincount(ds.sparse[:, f].astype(np.int64)).max() / 50_000 for f in range(2)]
    assert top1[0] < 0.1 and top1[1] > 0.3


def test_criteo_sample_preset_matches_the_sample_concentration():
    """The preset's mid-size fields (100-3,000 values) are as concentrated as the real sample's (10 most
    frequent values: 82% of lookups in the sample), unlike one exponent of 1.1 (46%)."""
    import collections
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "criteo_kaggle_sample_10k.tsv"
    if not sample.is_file():
        pytest.skip("the Criteo sample is not beside the checkout")
    rows = [line.rstrip("\n").split("\t") for line in sample.open()]
    mid = [f for f, n in enumerate(KAGGLE_CARDINALITIES) if 30 < n <= 3000]

    def top10(values) -> float:
        return sum(c for _, c in collections.Counter(values).most_common(10)) / len(values)

    real = np.mean([top10([r[14 + f] for r in rows if r[14 + f]]) for f in mid])
    shares = {}
    for skew in (1.1, "criteo-sample"):
        ds = make_synthetic(rows=len(rows), scale=1.0, skew=skew)
        shares[skew] = np.mean([top10(ds.sparse[:, f].tolist()) for f in mid])
    assert abs(shares["criteo-sample"] - real) < 0.05 < real - shares[1.1]
