"""Dataset save/open, splits and batch iteration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embcompress.data import (DataError, Dataset, iterate_batches, make_synthetic, num_batches, open_dataset,
                              save_dataset, split_dataset)  # fmt: skip


def _tiny(n: int = 103) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(dense=rng.random((n, 2), dtype=np.float32), sparse=np.arange(n * 3).reshape(n, 3) % 7,
                   labels=(np.arange(n) % 2).astype(np.float32), field_sizes=[7, 7, 7], meta={"source": "test"})  # fmt: skip


def test_save_open_round_trip(tmp_path):
    ds = make_synthetic(rows=1000, fields=4, dense=3)
    save_dataset(ds, tmp_path / "d")
    back = open_dataset(tmp_path / "d")
    assert isinstance(back.sparse, np.memmap) and back.field_sizes == ds.field_sizes
    for name in ("dense", "sparse", "labels", "probs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
    assert back.meta["rows"] == 1000 and back.meta["source"] == "synthetic"
    save_dataset(_tiny(), tmp_path / "d")  # overwriting an earlier dataset is allowed
    assert open_dataset(tmp_path / "d").num_rows == 103 and open_dataset(tmp_path / "d").probs is None


def test_incomplete_directories(tmp_path):
    save_dataset(_tiny(), tmp_path / "d")
    (tmp_path / "d" / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json is missing"):
        open_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    save_dataset(_tiny(), tmp_path / "e")
    (tmp_path / "e" / "sparse.npy").unlink()
    with pytest.raises(DataError, match="sparse.npy is missing"):
        open_dataset(tmp_path / "e")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="Refusing to overwrite"):
        save_dataset(_tiny(), tmp_path / "f")
    assert (tmp_path / "f" / "precious.txt").exists()
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    assert meta["field_sizes"] == [7, 7, 7] and meta["format_version"] == 1


def test_time_and_random_split():
    ds = _tiny(700)
    tr, te = split_dataset(ds, "time")
    assert (tr.num_rows, te.num_rows) == (600, 100)
    np.testing.assert_array_equal(np.concatenate([tr.labels, te.labels]), ds.labels)
    rtr, rte = split_dataset(ds, "random", seed=1)
    assert (rtr.num_rows, rte.num_rows) == (600, 100)
    np.testing.assert_array_equal(np.sort(np.concatenate([rtr.index, rte.index])), np.arange(700))
    assert not np.array_equal(rtr.index, np.arange(600))
    np.testing.assert_array_equal(split_dataset(ds, "random", seed=1)[0].index, rtr.index)
    with pytest.raises(ValueError):
        split_dataset(ds, "sideways")


def _rows_seen(batches) -> np.ndarray:
    # Row r of _tiny has sparse[r, 0] == (3r) % 7 -- not unique; use dense[:, 0], which is.
    return np.concatenate([b.dense[:, 0].numpy() for b in batches]) if batches else np.empty(0)


@pytest.mark.parametrize("how", ["time", "random"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_row_once(how, shuffle):
    ds = _tiny(103)
    view = split_dataset(ds, how, test_fraction=0.2)[0]
    expected = np.sort(view._rows(ds.dense)[:, 0])
    batches = list(iterate_batches(view, 10, shuffle=shuffle, seed=5))
    assert len(batches) == num_batches(view, 10) == 9
    b = batches[0]
    assert b.dense.dtype == torch.float32 and b.sparse.dtype == torch.int64 and b.labels.dtype == torch.float32
    assert b.sparse.shape == (10, 3) and b.dense.shape == (10, 2)
    np.testing.assert_array_equal(np.sort(_rows_seen(batches)), expected)
    unshuffled = _rows_seen(list(iterate_batches(view, 10)))
    np.testing.assert_array_equal(unshuffled, view._rows(ds.dense)[:, 0])  # order kept without shuffle
    if shuffle:
        assert not np.array_equal(_rows_seen(batches), unshuffled)


def test_drop_last_start_batch_and_ranks():
    ds = _tiny(103)
    assert len(list(iterate_batches(ds, 10, drop_last=True))) == num_batches(ds, 10, drop_last=True) == 10
    full = list(iterate_batches(ds, 10, shuffle=True, seed=2))
    resumed = list(iterate_batches(ds, 10, shuffle=True, seed=2, start_batch=4))
    np.testing.assert_array_equal(_rows_seen(resumed), _rows_seen(full[4:]))
    per_rank = [list(iterate_batches(ds, 10, shuffle=True, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in per_rank] == [num_batches(ds, 10, world_size=3, rank=r) for r in range(3)] == [4, 4, 3]
    seen = np.concatenate([_rows_seen(p) for p in per_rank])
    assert len(seen) == 103 and len(np.unique(seen)) == 103  # disjoint and complete
    with pytest.raises(ValueError):
        next(iterate_batches(ds, 10, rank=3, world_size=3))
