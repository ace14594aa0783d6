"""``embcompress compress-lowrank`` on a tiny trained run."""

import json

import torch

from embcompress.cli import main
from embcompress.compress.command import load_run_model
from embcompress.compress import FactorizedLinear
from embcompress.embeddings.lowrank import LowRankEmbeddingBag
from embcompress.train.loop import TrainConfig, run_training


def test_compress_lowrank_cli(tmp_path, capsys):
    run_dir, out_dir = tmp_path / "run", tmp_path / "small"
    cfg = TrainConfig(data="synthetic", data_options={"rows": 3000, "scale": 0.0005, "seed": 0}, model="deepfm",
                      model_options={"deep": [32, 32]}, embedding_dim=8, batch_size=256, out=str(run_dir),
                      progress=False)
    run_training(cfg)
    code = main(["compress-lowrank", "--run", str(run_dir), "--ratio", "2", "--out", str(out_dir),
                 "--calibration-batches", "2", "--calibration-batch-size", "256", "--eval-batch-size", "512",
                 "--timing-rows", "256", "--mlp-variance", "0", "--threads", "1", "--json"])  # 0: factorised layers to reload
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("auc_before", "auc_after", "params_before", "params_after"):
        assert key in result
    assert result["torch_threads"] == 1
    # timed at the batch sizes the test rows hold (1 and 64 of the defaults), each model interleaved
    assert set(result["infer_samples_per_s"]) == {"1", "64"}
    for speeds in result["infer_samples_per_s"].values():
        assert set(speeds) == {"original", "compressed", "served"} and min(speeds.values()) > 0
    assert result["params_after"] <= result["params_before"] / 2
    assert 0.0 <= result["auc_after"] <= 1.0
    # the compressed run loads back with its structure and gives the AUC it reported
    _, model, _, test = load_run_model(out_dir)
    assert isinstance(model.embedding, LowRankEmbeddingBag)
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == result["params_after"]
    from embcompress.train.loop import evaluate
    torch.testing.assert_close(evaluate(model, test, 512)["auc"], result["auc_after"], rtol=1e-6, atol=1e-6)


def test_missing_run_is_a_user_error(tmp_path, capsys):
    code = main(["compress-lowrank", "--run", str(tmp_path / "nope"), "--ratio", "2", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "config.json" in capsys.readouterr().err


def test_finetune_is_reported_separately(tmp_path, capsys):
    run_dir, out_dir = tmp_path / "run", tmp_path / "small"
    cfg = TrainConfig(data="synthetic", data_options={"rows": 2000, "scale": 0.0005, "seed": 0}, model="dcn",
                      model_options={"deep": [16]}, embedding_dim=4, batch_size=256, out=str(run_dir),
                      progress=False)
    run_training(cfg)
    code = main(["compress-lowrank", "--run", str(run_dir), "--ratio", "2", "--out", str(out_dir),
                 "--calibration-batches", "2", "--calibration-batch-size", "256", "--eval-batch-size", "512",
                 "--timing-batches", "1", "--finetune-steps", "3", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["finetune_steps"] == 3 and 0.0 <= result["auc_after_finetune"] <= 1.0
    _, model, _, test = load_run_model(out_dir)  # the saved model is the fine-tuned one
    from embcompress.train.loop import evaluate
    torch.testing.assert_close(evaluate(model, test, 512)["auc"], result["auc_after_finetune"], rtol=1e-6, atol=1e-6)


def _run_dir(path, model, state):
    """A run directory whose config.json describes ``model`` and whose checkpoint holds ``state``."""
    import dataclasses
    from embcompress.train.checkpoint import save_checkpoint, write_json
    path.mkdir()
    cfg = TrainConfig(data="synthetic", data_options={"rows": 300, "scale": 0.0005, "seed": 0}, model=model,
                      model_options={"deep": [8]} if model == "deepfm" else {}, embedding_dim=4, progress=False)
    write_json(path / "config.json", dataclasses.asdict(cfg))
    save_checkpoint(path / "checkpoint.pt", state)
    return path


def _cli_error(run_dir, tmp_path, capsys):
    code = main(["compress-lowrank", "--run", str(run_dir), "--ratio", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("embcompress: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_wrong_structure_checkpoint_is_one_line_error(tmp_path, capsys):
    from embcompress.embeddings import make_table
    from embcompress.models.deepfm import DeepFM
    from embcompress.data import load_dataset
    sizes = load_dataset("synthetic", rows=300, scale=0.0005, seed=0).field_sizes
    deepfm = DeepFM(make_table("full", list(sizes), 4, compression=1), deep=[8])
    # a DeepFM checkpoint under a config.json that says DLRM
    err = _cli_error(_run_dir(tmp_path / "a", "dlrm", {"model": deepfm.state_dict()}), tmp_path, capsys)
    assert "does not fit" in err and "missing" in err and "unexpected" in err
    # the right model, one weight of the wrong shape
    state = dict(deepfm.state_dict())
    state["deep.0.0.weight"] = torch.zeros(9, state["deep.0.0.weight"].shape[1])
    err = _cli_error(_run_dir(tmp_path / "b", "deepfm", {"model": state}), tmp_path, capsys)
    assert "deep.0.0.weight (9," in err
    # a compression plan naming a layer the model does not have
    plan = [{"name": "over_arch.net.0.0", "kind": "linear", "rank": 2, "folded": False}]
    err = _cli_error(_run_dir(tmp_path / "c", "deepfm", {"model": deepfm.state_dict(), "compression": {"plan": plan}}),
                     tmp_path, capsys)
    assert "over_arch.net.0.0" in err
