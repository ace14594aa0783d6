"""Feature maps (vocabularies) and the raw-input boundaries of preprocessing: compression, labels,
overwriting, clear errors, the per-user cache and rank 0 preprocessing under torchrun."""

from __future__ import annotations

import gzip
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embcompress.data import (DataError, default_cache_dir, load_dataset, load_vocabularies, open_dataset,
                              preprocess_criteo, preprocess_csv, read_feature_map, write_synthetic_tsv)  # fmt: skip
from embcompress.data import _preprocess_once
from embcompress.data.csv import label_of


def _criteo_line(label, ints, cats):
    return "\t".join([str(label), *[str(i) for i in ints], *cats])


def test_criteo_vocabulary_files_and_hex_case(tmp_path):
    ints = [1] * 13
    cats = ["0000abcd"] + ["00000001"] * 25
    rows = [_criteo_line(1, ints, cats), _criteo_line(0, ints, ["0000ABCD"] + cats[1:]),
            _criteo_line(0, ints, [""] + cats[1:]), _criteo_line(1, ints, ["0000000f"] + cats[1:])]
    (tmp_path / "a.tsv").write_text("\n".join(rows) + "\n")
    preprocess_criteo(tmp_path / "a.tsv", tmp_path / "d", progress=False)
    ds = open_dataset(tmp_path / "d")
    # upper and lower case name one value: C1 holds "", 0000000f and 0000abcd, plus the OOV id
    assert ds.field_sizes[0] == 4 and list(ds.sparse[:, 0]) == [3, 3, 1, 2]
    fmap = read_feature_map(tmp_path / "d")
    assert fmap["vocabulary"]["oov_id"] == 0 and fmap["vocabulary"]["min_count"] == 1
    assert fmap["input"]["format"] == "criteo" and fmap["field_names"][0] == "C1" and fmap["num_dense"] == 13
    table = pq.read_table(tmp_path / "d" / fmap["vocabulary"]["files"][0])
    assert table.column_names == ["key"] and table.column(0).to_pylist() == [-1, 0xF, 0xABCD]
    assert [v.tolist() for v in load_vocabularies(tmp_path / "d")][:2] == [[-1, 0xF, 0xABCD], [1]]


def test_csv_vocabulary_is_bytes_in_id_order(tmp_path):
    (tmp_path / "a.csv").write_text("y,s\n1,b\n0,\n1,a\n0,b\n1,c\n")
    preprocess_csv(tmp_path / "a.csv", tmp_path / "d", label="y", categorical=["s"], min_count=2, progress=False)
    fmap = read_feature_map(tmp_path / "d")
    assert fmap["vocabulary"]["min_count"] == 2 and fmap["input"]["columns"] == ["y", "s"]
    assert pq.read_table(tmp_path / "d" / "vocab/00.parquet").column("value").to_pylist() == [b"b"]
    assert list(open_dataset(tmp_path / "d").sparse[:, 0]) == [1, 0, 0, 1, 0]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_input_equals_plain(tmp_path, compression):
    tsv = tmp_path / "s.tsv"
    write_synthetic_tsv(tsv, 600, scale=0.0005, progress=False)
    packed = tmp_path / "s.tsv.packed"
    if compression == "gzip":
        packed.write_bytes(gzip.compress(tsv.read_bytes()))
    else:
        with pa.CompressedOutputStream(str(packed), "zstd") as out:
            out.write(tsv.read_bytes())
    preprocess_criteo(tsv, tmp_path / "plain", chunk_rows=100, progress=False)
    preprocess_criteo(packed, tmp_path / "packed", chunk_rows=100, progress=False)
    a, b = open_dataset(tmp_path / "plain"), open_dataset(tmp_path / "packed")
    for name in ("dense", "sparse", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    csv = tmp_path / "c.csv.gz"
    csv.write_bytes(gzip.compress(b"click,site\n1,a\n0,b\n"))
    preprocess_csv(csv, tmp_path / "c", label="click", categorical=["site"], progress=False)
    assert list(open_dataset(tmp_path / "c").labels) == [1, 0]
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(tsv.read_bytes())[:2000])
    with pytest.raises(DataError, match="not a valid gzip file"):
        preprocess_criteo(broken, tmp_path / "x", progress=False)


@pytest.mark.parametrize("neg,pos", [("-1", "1"), ("0.0", "1.0"), ("false", "true"), ("FALSE", " True "),
                                     ("0", "1")])
def test_csv_label_spellings(tmp_path, neg, pos):
    (tmp_path / "a.csv").write_text(f"y,s\n{pos},a\n{neg},b\n{neg},a\n")
    preprocess_csv(tmp_path / "a.csv", tmp_path / "d", label="y", categorical=["s"], progress=False)
    assert list(open_dataset(tmp_path / "d").labels) == [1, 0, 0]


def test_csv_ambiguous_and_bad_labels(tmp_path):
    assert label_of("-1") == (0, "-1") and label_of("0") == (0, "0") and label_of("2") is None
    (tmp_path / "a.csv").write_text("y,s\n1,a\n0,b\n-1,a\n")
    with pytest.raises(DataError, match="uses both 0 and -1"):
        preprocess_csv(tmp_path / "a.csv", tmp_path / "d", label="y", categorical=["s"], progress=False)
    (tmp_path / "b.csv").write_text("y,s\n1,a\nyes,b\n")
    with pytest.raises(DataError, match=r"b.csv, line 3: label 'y' must be 0/1, -1/1"):
        preprocess_csv(tmp_path / "b.csv", tmp_path / "d", label="y", categorical=["s"], progress=False)


def test_overwrite_is_refused_unless_asked(tmp_path):
    (tmp_path / "a.csv").write_text("y,s\n1,a\n0,b\n")
    (tmp_path / "b.csv").write_text("y,s\n1,a\n0,b\n1,c\n")
    kw = dict(label="y", categorical=["s"], progress=False)
    preprocess_csv(tmp_path / "a.csv", tmp_path / "d", **kw)
    with pytest.raises(DataError, match="already holds a dataset.*--overwrite"):
        preprocess_csv(tmp_path / "b.csv", tmp_path / "d", **kw)
    assert open_dataset(tmp_path / "d").num_rows == 2
    preprocess_csv(tmp_path / "b.csv", tmp_path / "d", overwrite=True, **kw)
    assert open_dataset(tmp_path / "d").num_rows == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="non-empty directory"):
        preprocess_csv(tmp_path / "a.csv", tmp_path / "other", **kw)


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="is a directory, not a file"):
        preprocess_criteo(tmp_path, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="is a directory, not a file"):
        load_dataset(f"criteo:{tmp_path}")
    big = _criteo_line(1, [12345678901234567890] + [1] * 12, ["00000001"] * 26)
    (tmp_path / "big.tsv").write_text(big + "\n")
    with pytest.raises(DataError, match="line 1: I1 value .* is too large"):
        preprocess_criteo(tmp_path / "big.tsv", tmp_path / "o", progress=False)
    (tmp_path / "ok.tsv").write_text(_criteo_line(1, [1] * 13, ["00000001"] * 26) + "\n")
    preprocess_criteo(tmp_path / "ok.tsv", tmp_path / "d", progress=False)
    sparse = tmp_path / "d" / "sparse.npy"
    sparse.write_bytes(sparse.read_bytes()[:-20])
    with pytest.raises(DataError, match="sparse.npy cannot be read"):
        open_dataset(tmp_path / "d")


def test_progress_false_is_silent(tmp_path, capfd):
    tsv = tmp_path / "s.tsv"
    write_synthetic_tsv(tsv, 300, scale=0.0005, progress=False)
    load_dataset(f"criteo:{tsv}", cache_dir=tmp_path / "cache", progress=False)
    assert capfd.readouterr().err == ""


def test_default_cache_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "embcompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "embcompress"
    (tmp_path / "a.csv").write_text("y,s\n1,a\n0,b\n")
    load_dataset(f"csv:{tmp_path / 'a.csv'}", label="y", categorical=["s"], progress=False)
    assert len(list((tmp_path / "home" / ".cache" / "embcompress").iterdir())) == 1


def test_only_rank_0_preprocesses(tmp_path, monkeypatch):
    (tmp_path / "a.csv").write_text("y,s\n1,a\n0,b\n")
    calls = []

    def fn(path, out, **kw):
        calls.append(out)
        preprocess_csv(path, out, label="y", categorical=["s"], **kw)

    out = tmp_path / "cache" / "a"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DataError, match="rank 1 waited"):
        _preprocess_once(fn, tmp_path / "a.csv", out, {"progress": False}, wait_s=0.3, poll_s=0.05)
    assert calls == []
    # rank 1 waits while "rank 0" (a thread here) preprocesses, then finds the finished dataset
    worker = threading.Thread(target=lambda: (time.sleep(0.2), fn(tmp_path / "a.csv", out, progress=False)))
    worker.start()
    _preprocess_once(fn, tmp_path / "a.csv", out, {"progress": False}, wait_s=30, poll_s=0.05)
    worker.join()
    assert open_dataset(out).num_rows == 2 and calls == [out]
    monkeypatch.setenv("RANK", "0")
    _preprocess_once(fn, tmp_path / "a.csv", out, {"progress": False})  # cached: not preprocessed again
    assert calls == [out]
    (out / "features.json").unlink()  # a cache entry from before datasets had a feature map is redone
    _preprocess_once(fn, tmp_path / "a.csv", out, {"progress": False})
    assert calls == [out, out] and read_feature_map(out)["vocabulary"] is not None
