"""load_model rebuilds every method's trained model from its run directory alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from embcompress import load_model, methods
from embcompress.data import DataError, iterate_batches, open_dataset
from embcompress.train.loop import TrainConfig, train_model


def _train(data_dir, out, method, **kw):
    cfg = TrainConfig(data=str(data_dir), method=method, compression=None if method == "full" else 3.0,
                      batch_size=64, warmup_steps=5, epochs=1, out=str(out), progress=False, **kw)
    return train_model(cfg)


@pytest.mark.parametrize("method", methods())
def test_round_trip_after_the_data_is_deleted(tmp_path, criteo_dir, method):
    data = tmp_path / "data"
    shutil.copytree(criteo_dir, data)
    _, trained = _train(data, tmp_path / "run", method)
    batch = next(iterate_batches(open_dataset(data), 256))
    shutil.rmtree(data)  # no dataset read from here on
    trained.eval()
    with torch.no_grad():
        expected = trained(batch.dense, batch.sparse)
        got = load_model(tmp_path / "run")(batch.dense, batch.sparse)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_round_trip_dcn_and_relative_paths(tmp_path, criteo_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, trained = _train(criteo_dir, "run", "hash", model="dcn")
    moved = shutil.move(tmp_path / "run", tmp_path / "elsewhere")  # a run directory can move
    batch = next(iterate_batches(open_dataset(criteo_dir), 128))
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(moved)(batch.dense, batch.sparse), trained(batch.dense, batch.sparse))


def test_not_a_run(tmp_path):
    with pytest.raises(DataError, match="not a run directory"):
        load_model(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"method": "full"}))
    with pytest.raises(DataError, match="no checkpoint"):
        load_model(tmp_path)


def test_compressed_run_loads_and_carries_the_source_features(tmp_path, criteo_dir):
    from embcompress.cli import main

    _train(criteo_dir, tmp_path / "run", "hash")
    assert main(["compress-lowrank", "--run", str(tmp_path / "run"), "--ratio", "2", "--out", str(tmp_path / "c"),
                 "--calibration-batches", "2", "--timing-batches", "1"]) == 0
    source, compressed = load_model(tmp_path / "run"), load_model(tmp_path / "c")
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in source.parameters())
    assert (tmp_path / "c" / "features.json").is_file()  # compress-lowrank carries the source's feature map
    batch = next(iterate_batches(open_dataset(criteo_dir), 64))
    with torch.no_grad():
        expected = compressed(batch.dense, batch.sparse)
        shutil.rmtree(tmp_path / "run")
        torch.testing.assert_close(load_model(tmp_path / "c")(batch.dense, batch.sparse), expected)
