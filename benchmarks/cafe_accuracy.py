"""DLRM test AUC of full, hash, qr, cafe and cafe-ml at 10x, 100x, 1000x, 10000x on synthetic Criteo-like data.

    PYTHONPATH=. .venv/bin/python benchmarks/cafe_accuracy.py                    # ~10 minutes on 1 thread
    PYTHONPATH=. .venv/bin/python benchmarks/cafe_accuracy.py --rows 2000000 --scale 0.1

One dataset, one epoch in time order, same seed for every run, the training loop's defaults (Adagrad lr
0.05, batch 128). A (method, ratio) a method cannot reach is reported as null. One thread by default: on
the shared 2-core machine two torch threads spin against other processes and run 20x slower. Prints one
JSON line per run and a summary line (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from embcompress.data import make_synthetic
from embcompress.embeddings import BudgetError
from embcompress.train.loop import TrainConfig, run_training
from common import emit, log  # type: ignore[import-not-found]

METHODS = ["full", "hash", "qr", "cafe", "cafe-ml"]
RATIOS = [10, 100, 1000, 10000]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method-options", default="{}", help="JSON options for cafe and cafe-ml")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    data_options = {"rows": args.rows, "scale": args.scale}
    ds = make_synthetic(**data_options)
    results = {}
    for method in args.methods.split(","):
        for ratio in ([1.0] if method == "full" else [float(r) for r in args.ratios.split(",")]):
            mopts = json.loads(args.method_options) if method.startswith("cafe") else {}
            cfg = TrainConfig(data="synthetic", data_options=data_options, method=method, compression=ratio,
                              method_options=mopts, batch_size=args.batch_size, progress=False)
            try:
                s = run_training(cfg, dataset=ds)
            except BudgetError as e:
                results[f"{method}@{ratio:g}"] = None
                logging.warning("%s", e)
                continue
            results[f"{method}@{ratio:g}"] = {k: s.get(k) for k in (
                "test_auc", "test_logloss", "compression_actual", "train_samples_per_s", "bayes_auc")}
            log(f"{method}@{ratio:g}: {results[f'{method}@{ratio:g}']}")
            emit({"benchmark": "cafe_accuracy_run", "method": method, "ratio": ratio,
                  **results[f"{method}@{ratio:g}"]})
    emit({"benchmark": "cafe_accuracy", "settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
