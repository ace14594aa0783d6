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


def test_version(capsys):
    from embcompress import __version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"embcompress {__version__} (torch ")


def _option_actions(parser):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name in ("train", "demo", "methods", "preprocess", "synth", "sweep"):
                    yield from ((f"{name} {a.option_strings or a.dest}", a) for a in sub._actions)
        else:
            yield f"embcompress {action.option_strings}", action


def test_every_option_has_help_and_shows_its_default():
    from embcompress.cli import build_parser
    parser = build_parser()
    for where, action in _option_actions(parser):
        assert action.help, f"{where} has no help text"
    text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for shown in ("(default: dlrm)", "(default: adagrad)", "(default: 0.05)", "(default: 300)", "(default: cpu)",
                  "{dcn,deepfm,dlrm}", "{sgd,adagrad,adam}", "{cpu,cuda,cuda:N}", "(default: 1800.0)"):
        assert shown in " ".join(text.split()), shown


def test_methods_lists_every_option(capsys):
    assert main(["methods", "cafe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cafe: CAFE") and "hash_rate (float, in (0, 1), default auto" in out
    assert main(["methods", "nope"]) == 2 and "unknown method 'nope'" in capsys.readouterr().err


def test_demo_prints_a_readable_table_and_what_to_try_next(capsys):
    assert main(["demo", "--rows", "3000", "--methods", "full,hash", "--compression", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("method  "):out.index("What to try next:")].strip().splitlines()
    assert table[0].split() == ["method", "idea", "ratio", "table", "test", "AUC", "vs", "full", "train", "samples/s"]
    assert table[2].startswith("full ") and table[3].startswith("hash ") and " 10x " in table[3]
    assert "embcompress methods cafe" in out and "Bayes-optimal" in out


def test_the_result_line_says_when_the_warm_up_was_capped_or_outlasted_the_run(capsys):
    args = ["train", "--rows", "3000", "--fields", "4", "--scale", "0.001", "--no-progress"]
    assert main([*args, "--warmup-max-share", "0.1"]) == 0
    assert "warm-up 2 of 300 steps" in capsys.readouterr().out  # 2572 training rows: 21 steps of 128
    assert main(args) == 0
    assert "lr reached 7% of --lr" in capsys.readouterr().out


def test_warmup_max_share_sets_the_cap(capsys):
    args = ["train", "--rows", "3000", "--fields", "4", "--scale", "0.001", "--no-progress", "--json"]
    assert main([*args, "--warmup-max-share", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["warmup_steps_used"] == 10  # 21 steps
    assert main([*args, "--warmup-max-share", "1", "--warmup-steps", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["warmup_steps_used"] == 5


def test_preprocess_overwrite_replaces_an_existing_dataset(tmp_path, capsys):
    from embcompress.data.synthetic import write_synthetic_tsv

    raw = tmp_path / "raw.tsv"
    write_synthetic_tsv(raw, 300, scale=0.001)
    args = ["preprocess", "criteo", str(raw), "--out", str(tmp_path / "d"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_every_option_of_every_command_has_help_text():
    import argparse

    from embcompress.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in commands.items() for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing
