"""embcompress sweep: the cell plan, a tiny sweep end to end, resume after an interruption, refused mixes."""

from __future__ import annotations

import csv
import json

import pytest

from embcompress.cli import main
from embcompress.sweep import Cell, plan_cells
from embcompress.sweep.results import markdown, paired
from embcompress.train import loop

# 2 methods x 2 reachable ratios x 1 seed, plus one ratio no method can reach on this data (skipped cells).
ARGS = ["sweep", "--rows", "2000", "--fields", "4", "--scale", "0.001", "--methods", "hash,qr",
        "--compression", "10,100,1e7", "--seeds", "1", "--batch-size", "512", "--no-progress"]  # fmt: skip
TRAINED = 4
# Columns that depend on the machine's speed and load; everything else must match exactly.
TIMING = {"train_samples_per_s", "eval_samples_per_s", "train_seconds", "load_before", "load_after"}


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def deterministic(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def uninterrupted(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "whole"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_plan_runs_full_once_per_seed_and_each_ratio_per_method():
    cells = plan_cells(["full", "hash"], [100, 10], [0, 1])
    assert cells == [Cell(0, "full", 1.0), Cell(0, "hash", 10.0), Cell(0, "hash", 100.0),
                     Cell(1, "full", 1.0), Cell(1, "hash", 10.0), Cell(1, "hash", 100.0)]


def test_sweep_writes_cells_csv_markdown_and_plots(uninterrupted):
    out = uninterrupted
    assert len(list((out / "cells").glob("*.json"))) == 6
    rows = read_csv(out / "results.csv")
    assert [(r["method"], float(r["ratio"]), r["status"]) for r in rows] == [
        ("hash", 10.0, "done"), ("hash", 100.0, "done"), ("hash", 1e7, "skipped"),
        ("qr", 10.0, "done"), ("qr", 100.0, "done"), ("qr", 1e7, "skipped")]
    for r in rows:
        if r["status"] == "done":
            assert 0.0 < float(r["test_auc"]) <= 1.0
            assert float(r["compression_actual"]) <= float(r["ratio"]) * 1.15  # lands near, not far above
            assert float(r["train_samples_per_s"]) > 0
        else:
            assert "cannot reach" in r["reason"] and "reachable ratios" in r["reason"]
    md = (out / "results.md").read_text()
    assert "| hash | 10x | 1/1 |" in md and "| qr | 100x | 1/1 |" in md
    assert "`hash-1e+07x-seed0` skipped: method 'hash' cannot reach" in md
    # qr against the default baseline (hash), paired by seed, at the two ratios both reached
    auc = {(r["method"], float(r["ratio"])): float(r["test_auc"]) for r in rows if r["status"] == "done"}
    assert "## Test AUC against `hash`, paired by seed" in md
    for ratio, target in ((10.0, "10x"), (100.0, "100x")):
        diff = auc[("qr", ratio)] - auc[("hash", ratio)]
        assert f"| qr | {target} | {diff:+.4f} |" in md and f"0: {diff:+.4f}" in md
    for name in ("auc_vs_compression.png", "train_speed_vs_compression.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_then_resumed_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = loop.run_training
    calls: list[str] = []

    def interrupt_second(cfg, dataset=None):
        calls.append(f"{cfg.method}-{cfg.compression:g}")
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second cell
        return real(cfg, dataset=dataset)

    monkeypatch.setattr(loop, "run_training", interrupt_second)
    assert main([*ARGS, "--out", str(out)]) == 130
    assert [p.name for p in (out / "cells").glob("*.json")] == ["hash-10x-seed0.json"]
    assert not (out / "results.csv").exists()

    calls.clear()

    def counting(cfg, dataset=None):
        calls.append(f"{cfg.method}-{cfg.compression:g}")
        return real(cfg, dataset=dataset)

    monkeypatch.setattr(loop, "run_training", counting)
    assert main([*ARGS, "--out", str(out)]) == 0
    assert "hash-10" not in calls and len(calls) == 5  # the finished cell is not redone
    assert deterministic(read_csv(out / "results.csv")) == deterministic(read_csv(uninterrupted / "results.csv"))

    # A finished sweep reruns nothing and rewrites the same results.
    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("a finished cell was run again"))
    before = (out / "results.csv").read_text()
    assert main([*ARGS, "--out", str(out)]) == 0
    assert (out / "results.csv").read_text() == before


def test_resume_with_other_settings_is_refused(uninterrupted, capsys, monkeypatch):
    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("must refuse before training"))
    assert main([*ARGS, "--out", str(uninterrupted), "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "new --out" in err
    settings = json.loads((uninterrupted / "sweep.json").read_text())["settings"]
    assert settings["train"]["lr"] == 0.05  # the saved settings were not overwritten


def test_unknown_method_is_a_one_line_error(tmp_path, capsys):
    assert main(["sweep", "--methods", "hash,nope", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_a_crashing_cell_is_reported_not_saved_and_retried(tmp_path, monkeypatch, capsys):
    out = tmp_path / "crash"

    def crash(cfg, dataset=None):
        raise RuntimeError(f"bug in {cfg.method}")

    monkeypatch.setattr(loop, "run_training", crash)
    assert main([*ARGS, "--out", str(out)]) == 1  # the other cells still ran; the exit status says not all
    assert not list((out / "cells").glob("*.json"))  # errors are not finished cells: the next run retries
    md = (out / "results.md").read_text()
    assert "`hash-10x-seed0` error: RuntimeError: bug in hash" in md
    assert "6 errors" in capsys.readouterr().out


def _done(method: str, ratio: float, seed: int, auc: float) -> dict:
    return {"cell": {"method": method, "ratio": ratio, "seed": seed}, "key": f"{method}-{ratio:g}x-seed{seed}",
            "status": "done", "reason": None, "summary": {"test_auc": auc}}


def test_paired_differences_use_only_seeds_both_methods_finished():
    records = [_done("hash", 10.0, 0, 0.70), _done("hash", 10.0, 1, 0.60), _done("hash", 10.0, 2, 0.80),
               _done("cafe", 10.0, 0, 0.72), _done("cafe", 10.0, 1, 0.59), _done("cafe", 10.0, 2, 0.83),
               _done("cafe", 10.0, 3, 0.99),  # no hash on seed 3: not paired
               _done("cafe", 100.0, 0, 0.50),  # no hash at 100x at all
               {"cell": {"method": "hash", "ratio": 100.0, "seed": 0}, "key": "hash-100x-seed0",
                "status": "skipped", "reason": "cannot reach"}]
    (row,) = paired(records, "hash")
    assert (row["method"], row["ratio"], row["seeds"]) == ("cafe", 10.0, [0, 1, 2])
    assert row["diffs"] == pytest.approx([0.02, -0.01, 0.03])
    assert row["mean"] == pytest.approx(0.04 / 3)
    assert row["se"] == pytest.approx(0.020816659994661 / 3**0.5)  # sample std of the diffs / sqrt(3)
    assert row["relative"] == pytest.approx((0.04 / 3) / 0.70)
    assert row["wins"] == 2
    settings = {"data": "synthetic", "data_options": {}, "data_seed": None, "train": {}, "method_options": {}}
    md = markdown(records, settings, baseline="hash")
    assert "| cafe | 10x | +0.0133 ± 0.0120 | +1.90% | 2/3 | 0: +0.0200 / 1: -0.0100 / 2: +0.0300 |" in md
    assert "paired by seed" not in markdown(records, settings, baseline=None)
    assert "No method has a result" in markdown(records, settings, baseline="tt")
