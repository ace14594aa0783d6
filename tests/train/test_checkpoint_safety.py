"""Loading never executes code from a file: crafted checkpoints whose pickle would run a payload are
refused with a clear CheckpointError, by load_checkpoint and by ``embcompress train --resume``."""

import os
import pickle

import pytest
import torch

from embcompress.cli import main
from embcompress.train import CheckpointError, load_checkpoint
from embcompress.train.checkpoint import find_resume_checkpoint


class SystemPayload:
    """Unpickling calls os.system(...), which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpenPayload:
    """Unpickling calls open(marker, "w"), which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _craft(path, payload, fmt):
    state = {"model": {"w": torch.zeros(2)}, "step": 10, "evil": payload}
    if fmt == "torch":  # a real torch zip checkpoint with the payload in its data.pkl
        torch.save(state, path)
    else:  # a bare pickle, the legacy format torch.load also reads (no tensor: the payload is met first)
        with open(path, "wb") as f:
            pickle.dump({"model": {}, "step": 10, "evil": payload}, f, protocol=2)


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("payload", [SystemPayload, OpenPayload])
def test_malicious_checkpoint_does_not_run_its_payload(tmp_path, payload, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    _craft(path, payload(marker), fmt)
    # the unsafe way really would run it: proof that the file is armed
    if fmt == "torch" and payload is OpenPayload:
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    refused = r"cannot be loaded safely: UnpicklingError: it refers to .*(system|open).*not executed"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_refuses_a_malicious_checkpoint(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    _craft(run / "checkpoint-00000010.pt", SystemPayload(marker), "torch")
    with pytest.raises(CheckpointError, match=r"checkpoint-00000010\.pt cannot be loaded safely"):
        find_resume_checkpoint(run)
    assert not marker.exists()

    _craft(run / "checkpoint-00000010.pt", SystemPayload(marker), "torch")
    rc = main(["train", "--rows", "2000", "--fields", "4", "--scale", "0.001", "--method", "hash",
               "--compression", "10", "--no-progress", "--resume", str(run)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "embcompress: error: no usable checkpoint" in err and "cannot be loaded safely" in err
    assert not marker.exists()
