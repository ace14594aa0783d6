"""Low-rank benchmark: AFM post-training compression of a trained DeepFM / DCN-v2, and the ``lowrank`` table.

Prints one JSON object (machine, git commit, settings, results):
* AFM at ``--ratio`` (default 3x, whole model: embeddings + MLP): test AUC before/after and CPU inference
  samples/s at batch ``--infer-batch`` (4096) before/after, timed interleaved in one run;
* the ``lowrank`` table trained from scratch at ``--table-ratios`` (10x, 100x), beside ``hash`` at the
  same ratios and the uncompressed model's AUC.

Timing uses ``--threads`` torch threads (default 1): on a small shared machine two threads contend with
other processes and make the ratio noisy.

Defaults: DeepFM (deep 400,400,400, D=16) on 1M synthetic rows (scale 0.002: 67.5k ids), Adagrad lr 0.05
(the project's defaults), batch 256, one epoch; AFM calibrated on 50 batches of 1024 training rows, as
``compress-lowrank`` does, so both pick the same ranks for the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/lowrank.py                   # ~20 min on 2 busy cores
    PYTHONPATH=. .venv/bin/python benchmarks/lowrank.py --table-ratios ''  # AFM only: ~2-5 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embcompress.compress import compress_model, count_parameters  # noqa: E402
from embcompress.compress.speed import inference_samples_per_s  # noqa: E402
from embcompress.data import iterate_batches, load_dataset, split_dataset  # noqa: E402
from embcompress.train.checkpoint import load_checkpoint  # noqa: E402
from embcompress.train.loop import TrainConfig, build_model, evaluate, run_training  # noqa: E402
from common import commit, machine  # type: ignore[import-not-found]  # noqa: E402


def config(args: argparse.Namespace, method: str, ratio: float | None, out: str | None) -> TrainConfig:
    model_options = {"deep": args.deep} if args.model == "deepfm" else {"deep": args.deep, "cross_layers": 3}
    return TrainConfig(data="synthetic", data_options={"rows": args.rows, "scale": args.scale, "seed": args.seed},
                       method=method, compression=ratio, model=args.model, model_options=model_options,
                       embedding_dim=args.dim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       optimizer=args.optimizer, seed=args.seed, out=out, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepfm", choices=["deepfm", "dcn"])
    p.add_argument("--deep", default="400,400,400", help="deep network widths")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--scale", type=float, default=0.002, help="synthetic cardinalities = Kaggle's times this")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="adagrad")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=float, default=3.0, help="AFM whole-model size reduction")
    p.add_argument("--calibration-batches", type=int, default=50, help="of 1024 rows (as compress-lowrank)")
    p.add_argument("--allocation", default="per-parameter", choices=["per-parameter", "variance"])
    p.add_argument("--infer-batch", type=int, default=4096)
    p.add_argument("--infer-batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-ratios", default="10,100", help="ratios for the lowrank/hash tables ('' to skip)")
    args = p.parse_args()
    args.deep = [int(x) for x in args.deep.split(",")]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.time()

    # 1. train the uncompressed model, keep its run directory
    ds = load_dataset("synthetic", rows=args.rows, scale=args.scale, seed=args.seed)
    run_dir = tempfile.mkdtemp(prefix="lowrank_bench_")
    cfg = config(args, "full", None, run_dir)
    base = run_training(cfg, dataset=ds)
    model = build_model(cfg, ds)
    model.load_state_dict(load_checkpoint(Path(run_dir) / "checkpoint.pt")["model"])
    train, test = split_dataset(ds, cfg.split, cfg.test_fraction, seed=cfg.seed)

    # 2. AFM compression, AUC and speed before/after
    calibration = iterate_batches(train, 1024, shuffle=True, seed=args.seed)
    small, report = compress_model(model, calibration, ratio=args.ratio, max_batches=args.calibration_batches,
                                   allocation=args.allocation)
    before = evaluate(model, test, args.infer_batch)
    after = evaluate(small, test, args.infer_batch)
    timing = [(b.dense, b.sparse) for _, b in zip(range(args.infer_batches), iterate_batches(test, args.infer_batch))]
    load_before_timing = os.getloadavg()
    speed_before, speed_after = inference_samples_per_s([model, small], timing, rounds=args.rounds)
    load_after_timing = os.getloadavg()
    afm = {
        "params_before": count_parameters(model), "params_after": count_parameters(small),
        "params_ratio": report.ratio, "auc_before": before["auc"], "auc_after": after["auc"],
        "auc_change_relative": (after["auc"] - before["auc"]) / before["auc"],
        "logloss_before": before["logloss"], "logloss_after": after["logloss"],
        "infer_samples_per_s_before": speed_before, "infer_samples_per_s_after": speed_after,
        "infer_speedup": speed_after / speed_before,
        "load_average_before_timing": load_before_timing, "load_average_after_timing": load_after_timing,
        "layers": [{"name": l.name, "width": l.width, "rank": l.rank, "explained_variance": round(l.explained_variance, 4),
                    "params_before": l.params_before, "params_after": l.params_after} for l in report.layers],
    }

    # 3. tables trained from scratch
    tables = []
    for r in [float(x) for x in args.table_ratios.split(",") if x]:
        for method in ("lowrank", "hash"):
            s = run_training(config(args, method, r, None), dataset=ds)
            tables.append({k: s[k] for k in ("method", "compression_target", "compression_actual", "test_auc",
                                             "test_logloss", "train_samples_per_s")})

    print(json.dumps({
        "benchmark": "lowrank", "machine": machine(), **commit(),
        "settings": {k: v for k, v in vars(args).items()},
        "data": {"rows_train": base["rows_train"], "rows_test": base["rows_test"], "ids": sum(ds.field_sizes),
                 "bayes_auc": base.get("bayes_auc")},
        "uncompressed": {k: base[k] for k in ("test_auc", "test_logloss", "train_samples_per_s", "train_seconds")},
        "afm": afm, "tables": tables, "seconds": time.time() - started,
    }))


if __name__ == "__main__":
    main()
