"""compare: one table of run directories and sweep directories."""

from __future__ import annotations

import json

import pytest

from embcompress.cli import main
from embcompress.serve.compare import collect_runs, format_table
from embcompress.train.loop import TrainConfig, run_training


@pytest.fixture(scope="module")
def runs(tmp_path_factory, criteo_dir):
    root = tmp_path_factory.mktemp("cmp")
    out = []
    for method, ratio in (("full", None), ("hash", 4.0)):
        s = run_training(TrainConfig(data=str(criteo_dir), method=method, compression=ratio, batch_size=64,
                                     warmup_steps=5, out=str(root / method), progress=False))
        out.append((root / method, s))
    # a sweep with one trained cell and one a method cannot reach
    assert main(["sweep", "--data", str(criteo_dir), "--methods", "hash", "--compression", "4,100000", "--out",
                 str(root / "sweep"), "--batch-size", "64", "--warmup-steps", "5", "--no-progress"]) == 0
    return root, out


def test_rows_follow_the_summaries(runs):
    root, trained = runs
    rows = collect_runs([root / "full", root / "hash", root / "sweep"])
    for row, (_, s) in zip(rows, trained):
        assert row["method"] == s["method"] and row["auc"] == s["test_auc"] and row["bytes"] == s["embedding_bytes"]
        assert row["ratio"] == s["compression_actual"] and row["status"] == "done"
    cells = rows[2:]
    assert {r["method"] for r in cells} == {"hash"} and len(cells) == 2
    assert "skipped" in {r["status"] for r in cells} and "done" in {r["status"] for r in cells}
    cell_files = sorted((root / "sweep" / "cells").glob("*.json"))
    recorded = {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in cell_files}
    for r in cells:
        rec = recorded[r["run"].rsplit("/", 1)[1]]
        assert r["status"] == rec["status"]
        if rec["status"] == "done":
            assert r["auc"] == rec["summary"]["test_auc"]
    text = format_table(rows)
    assert text.splitlines()[0].split()[:2] == ["run", "method"] and len(text.splitlines()) == 1 + len(rows)
    md = format_table(rows, markdown=True)
    assert md.startswith("| run | method |") and f"{trained[1][1]['test_auc']:.4f}" in md


def test_cli_json_and_errors(runs, tmp_path, capsys):
    root, trained = runs
    assert main(["compare", str(root / "full"), str(root / "hash"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["full", "hash"]
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embcompress: error:") and "neither a run directory" in err and err.count("\n") == 1
