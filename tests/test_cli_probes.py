"""Every CLI boundary probe of issue 20: a user error exits with status 2 and one stderr line
``embcompress: error: ...``, never a traceback. Probes run in-process through ``embcompress.cli.main``;
one runs as a subprocess to check the whole of stderr as a user sees it."""

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embcompress.cli import main

TINY = ["--rows", "2000", "--fields", "4", "--scale", "0.001", "--no-progress"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def check_user_error(capsys, args, message):
    rc = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("embcompress: error:")]
    assert rc == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert message in errors[0], errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small inputs the probes need: an existing file, a run directory, a raw pickle, Criteo TSV."""
    root = tmp_path_factory.mktemp("probes")
    (root / "a-file").write_text("x")
    run = root / "run-dir"
    run.mkdir()
    (run / "config.json").write_text("{}")
    for name in ("pickled", "pickled-run"):  # one each: a resume sets aside the checkpoints it cannot use
        pick = root / name
        pick.mkdir()
        with open(pick / "checkpoint-00000010.pt", "wb") as f:
            pickle.dump({"model": {"w": [1.0]}, "step": 10}, f, protocol=4)
        (pick / "checkpoint.pt").symlink_to("checkpoint-00000010.pt")
        (pick / "config.json").write_text(json.dumps({"method": "hash", "compression": 10}))
    rng = np.random.default_rng(0)
    lines = ["\t".join([str(int(rng.random() < 0.3))] + [str(rng.integers(0, 9)) for _ in range(13)]
                       + [f"{rng.integers(0, 50):08x}" for _ in range(26)]) for _ in range(300)]
    (root / "day.tsv").write_text("\n".join(lines) + "\n")
    with gzip.open(root / "day.tsv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    cols = lines[0].split("\t")
    (root / "huge.tsv").write_text("\t".join([cols[0], "9" * 30] + cols[2:]) + "\n" + "\n".join(lines[1:]) + "\n")
    return root


PROBES = [
    # method options (item 6)
    (["train", *TINY, "--method", "cafe", "--compression", "10", "--option", "foo=bar"],
     "method 'cafe' has no option 'foo'; valid options: threshold, hash_rate"),
    (["train", *TINY, "--method", "cafe", "--compression", "10", "--option", "threshold=abc"],
     "option threshold must be a number > 0, got abc"),
    (["train", *TINY, "--method", "cafe", "--compression", "10", "--option", "hash_rate=2"],
     "option hash_rate must be in (0, 1), got 2"),
    # values that ran and reported nonsense (item 7)
    (["train", "--rows", "0"], "argument --rows: must be >= 1, got 0"),
    (["train", "--rows", "3", "--fields", "4", "--scale", "0.001", "--no-progress"], "3 rows are too few"),
    (["train", "--max-steps", "-3"], "argument --max-steps: must be >= 1, got -3"),
    (["synth", "--rows", "-1", "--out", "x.tsv"], "argument --rows: must be >= 1, got -1"),
    (["demo", "--methods", "foo"], "unknown method 'foo'; known methods:"),
    (["train", "--min-count", "0"], "argument --min-count: must be >= 1, got 0"),
    (["train", "--min-count", "-3"], "argument --min-count: must be >= 1, got -3"),
    (["train", "--method", "hash", "--budget-bytes", "-1"], "argument --budget-bytes: must be >= 1, got -1"),
    (["train", "--val-fraction", "1"], "argument --val-fraction: must be <= 0.99"),
    # tracebacks that became errors
    pytest.param(["train", "--device", "cuda"], "torch finds no CUDA device on this machine", marks=NO_CUDA),
    pytest.param(["demo", "--device", "cuda"], "torch finds no CUDA device on this machine", marks=NO_CUDA),
    (["train", "--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["train", "--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--model", "nope"], "argument --model: invalid choice: 'nope'"),
]


@pytest.mark.parametrize("args, message", PROBES)
def test_probe(capsys, args, message):
    check_user_error(capsys, args, message)


@pytest.mark.parametrize("args, message", [
    (["train", *TINY, "--out", "{root}/a-file"], "a-file is an existing file; give a directory"),
    (["synth", "--rows", "10", "--out", "{root}"], "is a directory; give a file name"),
    (["train", *TINY, "--method", "hash", "--compression", "10", "--out", "{root}/run-dir"],
     "run-dir is not empty; pass --resume to continue the run in it, --overwrite to replace it"),
    (["train", *TINY, "--method", "hash", "--compression", "10", "--resume", "{root}/pickled"],
     "a plain pickle file (written with pickle.dump, not torch.save)"),
    (["compress-lowrank", "--run", "{root}/pickled-run", "--ratio", "2", "--out", "{root}/lowrank"],
     "a plain pickle file (written with pickle.dump, not torch.save)"),
])
def test_probe_with_files(capsys, files, args, message):
    check_user_error(capsys, [a.format(root=files) for a in args], message)


# Data-side probes: a directory given as the input file, an integer too large for the dense columns.
@pytest.mark.parametrize("args, message", [
    (["train", "--data", "criteo:{root}", "--method", "full", "--no-progress"], "is a directory"),
    (["train", "--data", "criteo:{root}/huge.tsv", "--method", "full", "--no-progress", "--cache-dir",
      "{root}/cache"], "huge.tsv"),
])
def test_data_probe(capsys, files, args, message):
    check_user_error(capsys, [a.format(root=files) for a in args], message)


def test_gzip_input_trains(capsys, files):
    rc = main(["train", "--data", f"criteo:{files}/day.tsv.gz", "--method", "full", "--no-progress",
               "--cache-dir", str(files / "cache"), "--json"])
    assert rc == 0, capsys.readouterr().err


def test_truncated_sparse_npy_names_the_file(capsys, files):
    data = files / "dataset"
    assert main(["preprocess", "criteo", str(files / "day.tsv"), "--out", str(data), "--no-progress"]) == 0
    sparse = data / "sparse.npy"
    sparse.write_bytes(sparse.read_bytes()[: sparse.stat().st_size // 2])
    capsys.readouterr()
    check_user_error(capsys, ["train", "--data", str(data), "--method", "full", "--no-progress"], "sparse.npy")
    check_user_error(capsys, ["preprocess", "criteo", str(files / "day.tsv"), "--out", str(data), "--no-progress"],
                     "dataset")


def test_a_user_error_shows_its_traceback_with_verbose(capsys):
    rc = main(["-v", "train", *TINY, "--method", "hash", "--compression", "1e12"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("embcompress: error:")


def test_an_internal_error_is_not_passed_off_as_a_user_error(monkeypatch):
    def broken(cfg, dataset=None):
        return np.zeros(3).reshape(2)  # a ValueError raised inside numpy: a bug, not the user's input

    monkeypatch.setattr("embcompress.cli.run_training", broken)
    with pytest.raises(ValueError, match="cannot reshape"):
        main(["train", *TINY])


def test_json_is_valid_when_every_label_is_zero(capsys, tmp_path):
    csv = tmp_path / "zeros.csv"
    csv.write_text("y,c\n" + "".join(f"0,{i % 7}\n" for i in range(700)))
    rc = main(["train", "--data", f"csv:{csv}", "--label", "y", "--categorical", "c", "--cache-dir",
               str(tmp_path / "cache"), "--no-progress", "--json"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0
    summary = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert summary["test_auc"] is None


def test_one_stderr_line_as_a_user_sees_it():
    r = subprocess.run([sys.executable, "-m", "embcompress", "train", "--device", "tpu"], capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("embcompress: error: argument --device:"), r.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "synthetic", "--label", "y"], "--label applies to csv: data only, not to --data synthetic"),
    (["train", "--data", "criteo:x.tsv", "--rows", "10"], "--rows applies to synthetic data only"),
    (["train", "--skip-bad-lines"], "--skip-bad-lines applies to criteo: and csv: data only"),
    (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["train", "--data-seed", "-1"], "argument --data-seed: must be >= 0"),
    (["train", "--checkpoint-every", "10"], "--checkpoint-every needs a run directory (--out DIR)"),
    (["train", "--out", "r", "--resume", "--overwrite"], "give one"),
    (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
])
def test_flags_that_would_be_ignored_or_crash_are_errors(capsys, args, message):
    check_user_error(capsys, args, message)
