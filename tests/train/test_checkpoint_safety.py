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
    refused = (r"cannot be loaded safely: UnpicklingError: it refers to .*(system|open).*not executed" if fmt == "torch"
               else r"is not a torch checkpoint: a plain pickle file \(written with pickle.dump")  # never unpickled
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


@pytest.mark.parametrize("content, reason", [
    (lambda f: pickle.dump({"model": {"w": [1.0]}}, f, protocol=4), r"a plain pickle file \(written with pickle.dump"),
    (lambda f: f.write(b"hello, not a checkpoint"), r"neither a torch.save file \(zip\) nor a pickle"),
    (lambda f: None, r"the file is empty"),
])
def test_a_file_that_is_not_a_torch_checkpoint_says_what_it_is(tmp_path, content, reason):
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        content(f)
    with pytest.raises(CheckpointError, match=rf"{path} is not a torch checkpoint: .*{reason}"):
        load_checkpoint(path)
    torch.save({"model": {}}, path, _use_new_zipfile_serialization=False)  # torch's legacy format still loads
    assert load_checkpoint(path) == {"model": {}}
