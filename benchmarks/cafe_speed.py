"""DLRM training samples/s with ``cafe`` vs ``hash`` at the same compression ratio, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/cafe_speed.py [--ratio 1000 --rows 200000 --repeats 2]

Runs are interleaved (hash, cafe, hash, cafe, ...) on one dataset and the best samples/s of each method is
kept, so load from other processes hits both alike. Prints one JSON line with the ratio cafe / hash.
"""

from __future__ import annotations

import argparse

import torch

from embcompress.data import make_synthetic
from embcompress.train.loop import TrainConfig, run_training
from common import emit, log  # type: ignore[import-not-found]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=1000)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="hash,cafe,cafe-ml")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_options = {"rows": args.rows, "scale": args.scale}
    ds = make_synthetic(**data_options)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for method in args.methods.split(","):
            cfg = TrainConfig(data="synthetic", data_options=data_options, method=method,
                              compression=args.ratio, batch_size=args.batch_size, progress=False,
                              max_steps=args.max_steps)
            s = run_training(cfg, dataset=ds)
            best[method] = max(best.get(method, 0.0), s["train_samples_per_s"])
    rel = {m: round(v / best["hash"], 3) for m, v in best.items()} if "hash" in best else {}
    emit({"benchmark": "cafe_speed", "settings": vars(args),
          "train_samples_per_s": {m: round(v) for m, v in best.items()}, "relative_to_hash": rel})


if __name__ == "__main__":
    main()
