"""DLRM training and evaluation samples/s with full, hash and qr at one ratio, and the Bayes-optimal AUC.

    PYTHONPATH=. .venv/bin/python benchmarks/train_speed.py [--rows 300000 --scale 0.05 --batch-size 4096
        --ratio 1000 --repeats 2 --threads 2]

Speed: one synthetic dataset (Kaggle cardinalities times --scale), one epoch per run at --batch-size,
methods interleaved (full, hash, qr, full, hash, qr, ...) and the best samples/s of each kept, so load
from other processes hits all alike; reported with the ratios hash/full and qr/full (issue 2 asks
hash >= full). Accuracy: ``full`` trained at the project's default settings (batch 128, Adagrad lr 0.05,
one epoch) on the same data, its test AUC next to the Bayes-optimal AUC of the generator's hidden model on
the same test rows. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os

from common import add_threads_arg, apply_threads, emit, log
from embcompress.data import make_synthetic
from embcompress.train.loop import TrainConfig, run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=1000)
    ap.add_argument("--methods", default="full,hash,qr")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                    help="also train full at default settings (batch 128) for the AUC vs Bayes figure")
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args)

    data_options = {"rows": args.rows, "scale": args.scale, "seed": 0}
    ds = make_synthetic(**data_options)
    methods = args.methods.split(",")
    best: dict[str, dict] = {}
    loads = []
    for rep in range(args.repeats):
        for m in methods:
            loads.append(round(os.getloadavg()[0], 2))
            cfg = TrainConfig(data="synthetic", data_options=data_options, method=m,
                              compression=None if m == "full" else args.ratio, batch_size=args.batch_size,
                              progress=False)
            s = run_training(cfg, dataset=ds)
            log(f"pass {rep + 1} {m}: train {s['train_samples_per_s']:,.0f}/s eval {s['eval_samples_per_s']:,.0f}/s")
            b = best.setdefault(m, {"train_samples_per_s": 0.0, "eval_samples_per_s": 0.0})
            b["train_samples_per_s"] = max(b["train_samples_per_s"], s["train_samples_per_s"])
            b["eval_samples_per_s"] = max(b["eval_samples_per_s"], s["eval_samples_per_s"])
            b.update(ratio_reached=round(s["compression_actual"], 1), test_auc=round(s["test_auc"], 4),
                     embedding_bytes=s["embedding_bytes"])
    speed = {m: {k: (round(v) if k.endswith("_per_s") else v) for k, v in b.items()} for m, b in best.items()}
    relative = {}
    if "full" in best:
        for m in best:
            relative[m] = {k: round(best[m][k] / best["full"][k], 3) for k in ("train_samples_per_s",
                                                                                "eval_samples_per_s")}
    record = {"benchmark": "train_speed", "settings": {**vars(args), "total_ids": sum(ds.field_sizes)},
              "speed": speed, "relative_to_full": relative, "load_per_run": loads}
    if args.accuracy:
        loads.append(round(os.getloadavg()[0], 2))
        s = run_training(TrainConfig(data="synthetic", data_options=data_options, method="full", progress=False),
                         dataset=ds)
        record["accuracy"] = {"method": "full", "settings": "defaults: batch 128, adagrad lr 0.05, 1 epoch",
                              "test_auc": round(s["test_auc"], 4), "test_logloss": round(s["test_logloss"], 4),
                              "bayes_auc": round(s["bayes_auc"], 4), "rows_train": s["rows_train"],
                              "rows_test": s["rows_test"]}
        log(f"full at default settings: AUC {s['test_auc']:.4f}, Bayes-optimal {s['bayes_auc']:.4f}")
    emit(record)


if __name__ == "__main__":
    main()
