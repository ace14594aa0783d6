"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends bitwise equal to an uninterrupted one;
a truncated or corrupted newest checkpoint is reported and the previous good one is used."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embcompress.data import make_synthetic
from embcompress.train import CheckpointError, TrainConfig, load_checkpoint
from embcompress.train.checkpoint import MANIFEST, find_resume_checkpoint, save_run_checkpoint
from embcompress.train.loop import train_model

REPO = Path(__file__).resolve().parents[2]

# 9000 rows, time split: 7714 training rows = 121 batches of 64. The killed run dies in step 56, after
# its step-40 checkpoint, so the resumed run redoes steps 41..121.
TRAIN_ARGS = ["train", "--data", "synthetic", "--rows", "9000", "--fields", "8", "--scale", "0.002",
              "--method", "mpcache", "--compression", "3", "--batch-size", "64", "--checkpoint-every", "40",
              "--no-progress", "--deterministic", "--json"]

# Runs the CLI; with KILL_AT_STEP=k the process SIGKILLs itself inside training step k (in its forward).
WRAPPER = """
import os, signal, sys
import torch.nn.functional as F
kill_at, calls, bce = int(os.environ.get("KILL_AT_STEP", "0")), [0], F.binary_cross_entropy_with_logits
def counting_bce(*a, **k):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return bce(*a, **k)
F.binary_cross_entropy_with_logits = counting_bce
from embcompress.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _launch(args, kill_at=0):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               KILL_AT_STEP=str(kill_at))
    return subprocess.Popen([sys.executable, "-c", WRAPPER, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def _assert_same_model(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    whole = _launch([*TRAIN_ARGS, "--out", str(ref)])
    killed = _launch([*TRAIN_ARGS, "--out", str(run)], kill_at=56)
    rc, out, err = _finish(killed)
    assert rc == -9, (rc, err[-2000:])
    assert not (run / "summary.json").exists()
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 40  # the last checkpoint before the kill

    rc, out, err = _finish(_launch([*TRAIN_ARGS, "--resume", str(run)]))
    assert rc == 0, err[-2000:]
    assert "resumed from" in err and "step 40" in err
    resumed = json.loads(out.strip().splitlines()[-1])
    rc, out, err = _finish(whole)
    assert rc == 0, err[-2000:]
    uninterrupted = json.loads(out.strip().splitlines()[-1])

    assert resumed["steps"] == uninterrupted["steps"] == 121
    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    _assert_same_model(a["model"], b["model"])  # parameters, quantised codes, cache and sketch
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        for key, sa in oa["state"].items():
            for name, t in sa.items():
                assert torch.equal(t, ob["state"][key][name]), f"optimizer state {key}.{name} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert resumed["test_auc"] == uninterrupted["test_auc"]
    assert resumed["train_loss"] == uninterrupted["train_loss"]  # the epoch's loss sum was checkpointed too
    # metric rows the killed run logged after step 40 were dropped, not duplicated
    steps = [json.loads(l).get("step") for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    # the last two checkpoints are kept, plus the manifest and the link
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == ["checkpoint-00000120.pt", "checkpoint-00000121.pt"]
    assert (run / "checkpoint.pt").is_symlink() and (run / MANIFEST).is_file()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def small():
    return make_synthetic(rows=6000, fields=8, scale=0.002, seed=3)


def _cfg(out, **kw):
    # 5143 training rows = 81 batches of 64; checkpoints at 20, 40, 60, 80 and 81 (end of the epoch)
    base = dict(method="cafe", compression=10, batch_size=64, progress=False, out=str(out),
                checkpoint_every=20, keep_checkpoints=3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_latest_falls_back_to_previous_good(tmp_path, small, caplog, damage):
    summary, model = train_model(_cfg(tmp_path / "run"), dataset=small)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == [
        "checkpoint-00000060.pt", "checkpoint-00000080.pt", "checkpoint-00000081.pt"]
    latest = run / "checkpoint-00000081.pt"
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    else:  # one flipped byte deep inside a tensor: torch's zip reader would not notice
        data[len(data) // 2] ^= 0xFF
        latest.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        again, model2 = train_model(_cfg(run, resume=True), dataset=small)
    text = caplog.text
    assert "checkpoint-00000081.pt" in text and ("truncated" in text if damage == "truncate" else "corrupted" in text)
    assert "resumed from" in text and "checkpoint-00000080.pt" in text
    assert (run / "checkpoint-00000081.pt.unusable").exists()
    _assert_same_model(final, model2.state_dict())
    assert again["test_auc"] == summary["test_auc"]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 81


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-00000010.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*checkpoint-00000010\.pt"):
        find_resume_checkpoint(run)


def test_resume_refuses_different_settings(tmp_path, small):
    train_model(_cfg(tmp_path / "run", max_steps=20), dataset=small)
    with pytest.raises(CheckpointError, match=r"different settings: compression=10"):
        train_model(_cfg(tmp_path / "run", compression=20, resume=True), dataset=small)


def test_resume_of_a_cafe_checkpoint_with_8_byte_sketch_ids_names_the_option(tmp_path, small):
    """A checkpoint from before 4-byte sketch ids became the default: same settings, other table shape."""
    train_model(_cfg(tmp_path / "run", max_steps=20, method_options={"key_dtype": "int64"}), dataset=small)
    state, _ = find_resume_checkpoint(tmp_path / "run")
    state["config"]["method_options"] = {}  # what such a run recorded
    save_run_checkpoint(tmp_path / "run", state, step=21)
    with pytest.raises(CheckpointError, match=r"(?s)does not fit.*--option key_dtype=int64.*size mismatch"):
        train_model(_cfg(tmp_path / "run", resume=True), dataset=small)
    s, _ = train_model(_cfg(tmp_path / "run", resume=True, max_steps=25, method_options={"key_dtype": "int64"}),
                       dataset=small)  # the option the message names: accepted though the checkpoint lacks it
    assert s["steps"] == 25
    with pytest.raises(CheckpointError, match="different settings: method_options"):  # other options are not
        train_model(_cfg(tmp_path / "run", resume=True, method_options={"key_dtype": "int64", "threshold": 9}),
                    dataset=small)


def test_resume_without_checkpoint_starts_afresh(tmp_path, small):
    s, _ = train_model(_cfg(tmp_path / "new", resume=True, max_steps=5), dataset=small)
    assert s["steps"] == 5


def _train_rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"}


def test_first_logged_window_after_resume_averages_the_steps_it_covers(tmp_path, small):
    # uninterrupted, logged every 5 steps: the row at step 20 is the mean loss of steps 16..20
    same = dict(deterministic=True, warmup_steps=0)  # no warm-up: its length would depend on max_steps
    train_model(_cfg(tmp_path / "a", max_steps=20, log_every=5, **same), dataset=small)
    # stopped at 15, resumed with rows every 10 steps: its first row (step 20) covers steps 16..20 only
    train_model(_cfg(tmp_path / "b", max_steps=15, log_every=10, **same), dataset=small)
    train_model(_cfg(tmp_path / "b", max_steps=20, log_every=10, resume=True, **same), dataset=small)
    a, b = _train_rows(tmp_path / "a"), _train_rows(tmp_path / "b")
    assert sorted(b) == [10, 20]
    assert b[20]["loss"] == pytest.approx(a[20]["loss"], rel=1e-5)
    assert a[20]["steps"] == b[20]["steps"] == 5  # loss and samples/s cover the 5 steps since the last row
