"""Criteo reader and streaming preprocessing, checked against a naive pure-Python reference."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from embcompress.data import DataError, open_dataset, preprocess_criteo, write_synthetic_tsv


def naive_read(path: Path, min_count: int):
    """Reference: read every line with plain Python and build the dataset the obvious way."""
    labels, dense, cats = [], [], []
    with open(path, "rb") as fh:
        for line in fh.read().splitlines():
            f = line.split(b"\t")
            labels.append(float(f[0]))
            dense.append([np.log1p(np.float32(max(int(v), 0))) if v else 0.0 for v in f[1:14]])
            cats.append([int(v, 16) if v else -1 for v in f[14:]])
    ids, sizes = [], []
    for j in range(26):
        counts = Counter(row[j] for row in cats)
        kept = sorted(k for k, c in counts.items() if c >= min_count)
        pos = {k: i + 1 for i, k in enumerate(kept)}
        ids.append([pos.get(row[j], 0) for row in cats])
        sizes.append(len(kept) + 1)
    return (np.array(dense, np.float32), np.array(ids).T, np.array(labels, np.float32), sizes)


@pytest.mark.parametrize("min_count", [1, 2])
def test_matches_naive_reference(tmp_path, min_count):
    tsv = tmp_path / "s.tsv"
    write_synthetic_tsv(tsv, 2000, scale=0.001, progress=False)
    # Small chunks, so that counts and dictionaries are merged across several chunks.
    stats = preprocess_criteo(tsv, tmp_path / "out", min_count=min_count, chunk_rows=300, progress=False)
    assert stats["chunks"] > 3 and stats["rows"] == 2000
    ds = open_dataset(tmp_path / "out")
    dense, sparse, labels, sizes = naive_read(tsv, min_count)
    assert ds.field_sizes == sizes
    np.testing.assert_array_equal(ds.sparse, sparse)
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_allclose(ds.dense, dense, rtol=1e-6)
    if min_count == 2:
        assert (np.asarray(ds.sparse) == 0).any()  # some rare values became OOV


def _line(label="0", dense=None, cats=None) -> str:
    dense = dense if dense is not None else ["1", "", "-2", "3"] + [""] * 9
    cats = cats if cats is not None else ["68fd1e64", ""] + [f"{i:08x}" for i in range(24)]
    return "\t".join([label, *dense, *cats])


def _write(tmp_path, text: str | bytes) -> Path:
    p = tmp_path / "in.tsv"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def test_good_lines_crlf_and_missing_final_newline(tmp_path):
    text = _line("1") + "\r\n" + _line("0", cats=["ABCDEF01"] * 26) + "\r\n" + _line("1")
    preprocess_criteo(_write(tmp_path, text), tmp_path / "o", progress=False)
    ds = open_dataset(tmp_path / "o")
    assert ds.num_rows == 3 and ds.num_dense == 13 and ds.num_fields == 26
    np.testing.assert_array_equal(ds.labels, [1, 0, 1])
    np.testing.assert_allclose(ds.dense[0, :4], [np.log(2), 0, 0, np.log(4)], rtol=1e-6)  # empty and -2 -> 0
    # C2: empty in rows 0 and 2 (key -1, id 1), 0xabcdef01 in row 1 (id 2).
    np.testing.assert_array_equal(ds.sparse[:, 1], [1, 2, 1])
    assert ds.field_sizes[1] == 3


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("\t".join(["0"] * 39), "expected 40"),
        (_line(cats=["68fd1e6g"] + [""] * 25), "C1 must be an 8-digit hex"),
        (_line(cats=["68fd1e6"] + [""] * 25), "C1 must be an 8-digit hex"),
        (_line(dense=["1.5"] + [""] * 12), "I1 must be an integer"),
        (_line(dense=["abc"] + [""] * 12), "I1 must be an integer"),
        (_line(label="2"), "label must be 0 or 1"),
        (_line(label=""), "label must be 0 or 1"),
        ("", "expected 40"),
    ],
)
def test_bad_line_raises_with_line_number_or_is_skipped(tmp_path, bad, reason):
    text = "\n".join([_line(), _line(), bad, _line()]) + "\n"
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=rf"in.tsv, line 3: {reason}"):
        preprocess_criteo(path, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.tsv"]  # no partial output left behind
    stats = preprocess_criteo(path, tmp_path / "o", skip_bad_lines=True, progress=False)
    assert stats["bad_lines"] == 1 and stats["rows"] == 3 and stats["bad_examples"][0][0] == 3
    assert open_dataset(tmp_path / "o").num_rows == 3


def test_bad_line_numbers_across_chunks(tmp_path):
    lines = [_line()] * 500
    lines[321] = _line(label="x")
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 322:"):
        preprocess_criteo(path, tmp_path / "o", chunk_rows=50, progress=False)


def test_empty_file_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        preprocess_criteo(_write(tmp_path, ""), tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        preprocess_criteo(tmp_path / "nope.tsv", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_real_sample_if_present():
    sample = Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo_kaggle_sample_10k.tsv"
    if not sample.exists():
        pytest.skip("shared Criteo sample not available")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        stats = preprocess_criteo(sample, Path(d) / "o", progress=False)
        ds = open_dataset(Path(d) / "o")
        assert stats["rows"] == 9999 and abs(float(ds.labels.mean()) - 0.218) < 0.001
