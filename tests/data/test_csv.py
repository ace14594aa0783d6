"""Generic CSV preprocessing on a small crafted file."""

from __future__ import annotations

import numpy as np
import pytest

from embcompress.data import DataError, load_dataset, open_dataset, preprocess_csv

CSV = 'click,site,app,x\n1,a,b,3.5\n0,,b,\n0,"a,b",c,-1\n1,a,b,1e3\n'


def test_csv_with_header(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(CSV)
    preprocess_csv(p, tmp_path / "o", label="click", categorical=["site", "app"], numeric=["x"], progress=False)
    ds = open_dataset(tmp_path / "o")
    np.testing.assert_array_equal(ds.labels, [1, 0, 0, 1])
    # site values sorted: "" -> 1, "a" -> 2, "a,b" -> 3; app: "b" -> 1, "c" -> 2.
    np.testing.assert_array_equal(ds.sparse, [[2, 1], [1, 1], [3, 2], [2, 1]])
    assert ds.field_sizes == [4, 3]
    np.testing.assert_allclose(ds.dense[:, 0], [np.log1p(3.5), 0, 0, np.log1p(1000)], rtol=1e-6)


def test_csv_without_header_no_numeric_and_min_count(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("1\tx\n0\ty\n1\tx\n")
    preprocess_csv(p, tmp_path / "o", label=0, categorical=[1], delimiter="\t", header=False, min_count=2,
                   progress=False)  # fmt: skip
    ds = open_dataset(tmp_path / "o")
    assert ds.dense.shape == (3, 0) and ds.field_sizes == [2]
    np.testing.assert_array_equal(ds.sparse[:, 0], [1, 0, 1])  # y seen once -> OOV


def test_csv_bad_lines(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("click,site,x\n1,a,2\n0,b,zz\n3,c,1\n1,d\n")
    with pytest.raises(DataError, match="a.csv, line 3: column 'x'"):
        preprocess_csv(p, tmp_path / "o", label="click", categorical=["site"], numeric=["x"], progress=False)
    stats = preprocess_csv(p, tmp_path / "o", label="click", categorical=["site"], numeric=["x"],
                           skip_bad_lines=True, progress=False)  # fmt: skip
    assert stats["bad_lines"] == 3 and [b[0] for b in stats["bad_examples"]] == [3, 4, 5]
    assert open_dataset(tmp_path / "o").num_rows == 1
    with pytest.raises(DataError, match="not in the file's header"):
        preprocess_csv(p, tmp_path / "o2", label="nope", categorical=["site"], progress=False)


def test_load_dataset_specs(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(CSV)
    ds = load_dataset(f"csv:{p}", label="click", categorical=["site", "app"], cache_dir=tmp_path / "cache",
                      progress=False)  # fmt: skip
    assert ds.num_rows == 4 and ds.num_dense == 0
    assert load_dataset(str(next((tmp_path / "cache").iterdir()))).num_rows == 4
    for spec in ("nonsense", f"csv:{tmp_path}/missing.csv", f"criteo:{tmp_path}/missing.tsv", str(p)):
        with pytest.raises(DataError):
            load_dataset(spec)
    with pytest.raises(DataError, match="Unknown option"):
        load_dataset("synthetic", rows=10, colour="red")
