"""The command line: train with --json, the run directory, and one-line errors with non-zero exits."""

import json
import subprocess
import sys

import pytest

from embcompress.cli import main, parse_options


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embcompress", *args], capture_output=True, text=True, timeout=300)


def test_train_json_last_line_and_run_dir(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--rows", "20000", "--fields", "6", "--scale", "0.002", "--method", "hash",
                "--compression", "10", "--batch-size", "512", "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("method", "compression_target", "compression_actual", "embedding_bytes", "full_embedding_bytes",
                "test_auc", "test_logloss", "train_samples_per_s", "eval_samples_per_s", "rows_train", "rows_test",
                "epochs"):
        assert key in summary
    assert summary["method"] == "hash" and summary["compression_target"] == 10
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"}


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "nope", "--compression", "10"], "unknown method 'nope'"),
    (["train", "--method", "hash", "--compression", "1e12", "--rows", "1000"], "cannot reach"),
    (["train", "--method", "full", "--compression", "10", "--rows", "1000"], "reachable ratios are 1x to 1x"),
    (["train", "--data", "criteo:/no/such/file.tsv", "--method", "full"], "/no/such/file.tsv"),
    (["train", "--data", "weird", "--method", "full"], "weird"),
    (["train", "--method", "hash", "--rows", "1000"], "needs a compression ratio"),
    (["train", "--method", "hash", "--compression", "10", "--option", "oops"], "KEY=VALUE"),
])
def test_user_errors_are_one_line_and_nonzero(args, message, capsys):
    code = main([*args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("embcompress: error:") and message in err and "\n" not in err


def test_parse_options():
    assert parse_options(["threshold=500", "hash_rate=0.3", "importance=frequency", "shapes=[2,3]"]) == {
        "threshold": 500, "hash_rate": 0.3, "importance": "frequency", "shapes": [2, 3]}


def test_skew_takes_a_number_or_a_preset(capsys):
    from embcompress.cli import build_parser, data_options

    parser = build_parser()
    for text, value in (("1.3", 1.3), ("criteo-sample", "criteo-sample")):
        args = parser.parse_args(["train", "--method", "full", "--skew", text])
        assert data_options(args)["skew"] == value
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--method", "full", "--skew", "steep"])
    assert "criteo-sample" in capsys.readouterr().err
