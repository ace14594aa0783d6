"""predict/evaluate: raw rows scored with the run's vocabularies equal the model on preprocessed arrays."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from embcompress.cli import main
from embcompress.data import DataError, iterate_batches, load_vocabularies, open_dataset, preprocess_csv
from embcompress.serve import load_model
from embcompress.serve.predict import predict_file
from embcompress.train.loop import TrainConfig, train_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, criteo_dir):
    out = tmp_path_factory.mktemp("runs") / "cafe"
    train_model(TrainConfig(data=str(criteo_dir), method="cafe", compression=3.0, batch_size=64, warmup_steps=5,
                            out=str(out), progress=False))
    return out


def _model_probs(run_dir, dense, sparse):
    with torch.no_grad():
        return torch.sigmoid(load_model(run_dir)(torch.as_tensor(dense), torch.as_tensor(sparse))).numpy()


def _read(path):
    table = pq.read_table(path) if str(path).endswith(".parquet") else pacsv.read_csv(path)
    assert table.column_names == ["probability"]
    return table.column(0).to_numpy()


def test_raw_rows_equal_preprocessed_arrays_and_gzip(tmp_path, run_dir, criteo_tsv, criteo_dir):
    ds = open_dataset(criteo_dir)
    batch = next(iterate_batches(ds, ds.num_rows))
    expected = _model_probs(run_dir, batch.dense, batch.sparse)
    r = predict_file(run_dir, str(criteo_tsv), tmp_path / "p.csv", batch_size=100, chunk_rows=150, progress=False)
    assert r["rows"] == ds.num_rows and 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0
    np.testing.assert_allclose(_read(tmp_path / "p.csv"), expected, rtol=1e-5, atol=1e-6)
    gz = tmp_path / "rows.tsv.gz"
    gz.write_bytes(gzip.compress(criteo_tsv.read_bytes()))
    r2 = predict_file(run_dir, f"criteo:{gz}", tmp_path / "p.parquet", chunk_rows=1000, progress=False)
    np.testing.assert_allclose(_read(tmp_path / "p.parquet"), expected, rtol=1e-5, atol=1e-6)
    assert r2["auc"] == pytest.approx(r["auc"]) and r2["logloss"] == pytest.approx(r["logloss"], rel=1e-5)


def test_unseen_values_are_oov_and_hex_case_does_not_matter(tmp_path, run_dir, criteo_tsv):
    line = criteo_tsv.read_text().splitlines()[0].split("\t")
    vocabs = load_vocabularies(run_dir)
    unseen = [f"{next(k for k in range(0x7fff0000, 0x80000000) if k not in set(v.tolist())):08x}" for v in vocabs]
    rows = ["\t".join(line[:14] + unseen), "\t".join(line[:14] + [v.upper() for v in line[14:]]),
            "\t".join(line[1:])]  # the same row without its label
    (tmp_path / "x.tsv").write_text("\n".join(rows[:2]) + "\n")
    (tmp_path / "nolabel.tsv").write_text(rows[2] + "\n")
    predict_file(run_dir, str(tmp_path / "x.tsv"), tmp_path / "x.csv", progress=False)
    r = predict_file(run_dir, str(tmp_path / "nolabel.tsv"), tmp_path / "y.csv", progress=False)
    assert r["auc"] is None and r["logloss"] is None
    got = np.concatenate([_read(tmp_path / "x.csv"), _read(tmp_path / "y.csv")])
    own = np.array([[1 + int(np.searchsorted(v, int(x, 16) if x else -1)) for v, x in zip(vocabs, line[14:])]])
    dense = np.log1p(np.maximum([[int(x) if x else 0 for x in line[1:14]]], 0)).astype(np.float32)
    oov = _model_probs(run_dir, dense, np.zeros_like(own))
    same = _model_probs(run_dir, dense, own)
    np.testing.assert_allclose(got, [oov[0], same[0], same[0]], rtol=1e-5)


def test_csv_run_reads_reordered_columns_without_label(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    site, app = rng.choice(["a", "b", "c", "dd"], n), rng.choice(["x", "y"], n)
    y = (rng.random(n) < np.where(site == "a", 0.8, 0.2)).astype(int)
    lines = ["click,site,app,x"] + [f"{'1' if t else '-1'},{s},{a},{i % 7}" for t, s, a, i in zip(y, site, app, range(n))]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    preprocess_csv(tmp_path / "train.csv", tmp_path / "ds", label="click", categorical=["site", "app"], numeric=["x"],
                   progress=False)
    assert np.array_equal(open_dataset(tmp_path / "ds").labels, y)  # -1/1 labels read as 0/1
    train_model(TrainConfig(data=str(tmp_path / "ds"), method="hash", compression=1.5, batch_size=32,
                            warmup_steps=2, out=str(tmp_path / "run"), progress=False))
    # columns in another order, no label, an unseen site value
    (tmp_path / "new.csv").write_text("app,x,site\nx,3,a\ny,0,zzz\n")
    predict_file(tmp_path / "run", f"csv:{tmp_path / 'new.csv'}", tmp_path / "p.csv", progress=False)
    vocab = load_vocabularies(tmp_path / "run")
    ids = np.array([[1 + list(vocab[0]).index(b"a"), 1 + list(vocab[1]).index(b"x")], [0, 1 + list(vocab[1]).index(b"y")]])
    dense = np.log1p(np.array([[3.0], [0.0]], dtype=np.float32))
    np.testing.assert_allclose(_read(tmp_path / "p.csv"), _model_probs(tmp_path / "run", dense, ids), rtol=1e-5)
    (tmp_path / "bad.csv").write_text("site,x\na,1\n")
    with pytest.raises(DataError, match=r"lacks the run's column\(s\) \['app'\]"):
        predict_file(tmp_path / "run", str(tmp_path / "bad.csv"), tmp_path / "q.csv", progress=False)


def _cli_error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("embcompress: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_error_line(tmp_path, run_dir, criteo_tsv, capsys):
    short = tmp_path / "short.tsv"
    short.write_text("\n".join("\t".join(line.split("\t")[:30]) for line in criteo_tsv.read_text().splitlines()[:3]))
    assert "found 30" in _cli_error(["predict", "--run", str(run_dir), "--data", str(short), "--out",
                                     str(tmp_path / "o.csv"), "--no-progress"], capsys)
    assert "not a run directory" in _cli_error(["predict", "--run", str(tmp_path), "--data", str(criteo_tsv),
                                                "--out", str(tmp_path / "o.csv")], capsys)
    assert "is a directory" in _cli_error(["evaluate", "--run", str(run_dir), "--data", str(tmp_path)], capsys)
    mixed = tmp_path / "mixed.tsv"
    good = criteo_tsv.read_text().splitlines()[:2]
    mixed.write_text(good[0] + "\n" + "\t".join(good[1].split("\t")[:-1]) + "\n")
    assert "mixed.tsv, line 2" in _cli_error(["evaluate", "--run", str(run_dir), "--data", str(mixed),
                                              "--no-progress"], capsys)
    assert not (tmp_path / "o.csv").exists()


def test_evaluate_json(run_dir, criteo_tsv, capsys):
    import json

    assert main(["evaluate", "--run", str(run_dir), "--data", f"criteo:{criteo_tsv}", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["rows"] == 700 and 0 < r["auc"] < 1 and r["out"] is None


def test_headerless_csv_run_keeps_the_training_layout(tmp_path, capsys):
    rows = [f"{i % 2},{'ab'[i % 3 == 0]},{i % 5}" for i in range(120)]
    (tmp_path / "t.tsv").write_text("\n".join(r.replace(",", "\t") for r in rows) + "\n")
    preprocess_csv(tmp_path / "t.tsv", tmp_path / "ds", label=0, categorical=[1], numeric=[2], delimiter="\t",
                   header=False, progress=False)
    train_model(TrainConfig(data=str(tmp_path / "ds"), method="full", batch_size=16, warmup_steps=2,
                            out=str(tmp_path / "run"), progress=False))
    ds = open_dataset(tmp_path / "ds")
    expected = _model_probs(tmp_path / "run", np.array(ds.dense), np.array(ds.sparse, dtype=np.int64))
    predict_file(tmp_path / "run", str(tmp_path / "t.tsv"), tmp_path / "p.csv", progress=False)
    np.testing.assert_allclose(_read(tmp_path / "p.csv"), expected, rtol=1e-5)
    (tmp_path / "two.tsv").write_text("a\t1\n")
    assert "expected 3 fields as in training" in _cli_error(
        ["predict", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "two.tsv"), "--out",
         str(tmp_path / "q.csv")], capsys)


def test_a_run_without_vocabularies_says_why(tmp_path, capsys):
    train_model(TrainConfig(data="synthetic", data_options={"rows": 300, "scale": 0.0005}, method="full",
                            batch_size=64, warmup_steps=2, out=str(tmp_path / "run"), progress=False))
    (tmp_path / "x.tsv").write_text("1\t" * 39 + "1\n")
    err = _cli_error(["predict", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "x.tsv"), "--out",
                      str(tmp_path / "p.csv")], capsys)
    assert "no vocabularies" in err and "synthetic" in err
