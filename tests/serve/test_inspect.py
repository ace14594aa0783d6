"""inspect: what a trained table holds per field, in raw values, checked against the table's own routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embcompress.cli import main
from embcompress.data import load_vocabularies, open_dataset
from embcompress.serve import load_model
from embcompress.serve.inspect import format_report, inspect_run
from embcompress.train.loop import TrainConfig, embedding_tables, train_model


def _train(criteo_dir, out, method, ratio, **options):
    train_model(TrainConfig(data=str(criteo_dir), method=method, compression=ratio, batch_size=16, warmup_steps=5,
                            out=str(out), progress=False, method_options=options))
    return out


@pytest.mark.parametrize("method,ratio,options", [("cafe", 3.0, {}), ("cafe-ml", 3.0, {}), ("mpcache", 3.0, {}),
                                                  ("tt", 3.0, {"refresh_every": 5}),
                                                  ("cafe-tt", 3.0, {"threshold": 2.0})])
def test_held_ids_and_served_share_match_the_table(tmp_path, criteo_dir, criteo_tsv, method, ratio, options):
    run = _train(criteo_dir, tmp_path / method, method, ratio, **options)
    report = inspect_run(run, top=5, data=str(criteo_tsv))
    table = embedding_tables(load_model(run))[0]
    ds = open_dataset(criteo_dir)
    starts = np.concatenate([[0], np.cumsum(ds.field_sizes)[:-1]])
    ids = torch.as_tensor(np.asarray(ds.sparse, dtype=np.int64) + starts)
    if method.startswith("cafe"):
        served = (table.sketch.query(ids.reshape(-1))[0] >= 0).reshape(ids.shape)  # the table's own routing
    elif method == "mpcache":
        served = torch.isin(ids, table.cache_ids)
    else:
        served = table._cache_find(ids.reshape(-1))[0].reshape(ids.shape)
    vocabs = load_vocabularies(run)
    assert sum(f["serving"] for f in report["fields"]) > 0
    for f in report["fields"]:
        i = f["field"]
        assert f["served_share"] == pytest.approx(served[:, i].float().mean().item())
        scores = [e["score"] for e in f["top"]]
        assert scores == sorted(scores, reverse=True) and len(f["top"]) == min(5, f["held"])
        for e in f["top"]:
            key = vocabs[i][e["id"] - 1]
            assert e["value"] == ("" if key < 0 else f"{key:08x}")
    assert "holds:" in format_report(report)


def test_stateless_method_and_cli(tmp_path, criteo_dir, capsys):
    run = _train(criteo_dir, tmp_path / "hash", "hash", 3.0)
    assert main(["inspect", "--run", str(run), "--json", "--field", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["holds"] is None and "no per-id state" in report["note"] and len(report["fields"]) == 1
    assert main(["inspect", "--run", str(run), "--field", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
