"""DLRM training samples/s with ``cafe`` (and ``cafe-ml``) vs ``hash`` at the same compression ratio, in one run.

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/cafe_speed.py [--ratio 1000 --rows 200000 --blocks 20]
    # on a GPU (the data is copied to it once; each timed block ends with a synchronize)
    PYTHONPATH=.:benchmarks python3 benchmarks/cafe_speed.py --device cuda --batch-size 4096 --scale 1

Every method gets its own DLRM and optimizer (the loop's: Adagrad, lr 0.05, ``embcompress.attach``) on one
dataset, and their training steps run interleaved in blocks (25 steps of hash, 25 of cafe, 25 of cafe-ml,
then again), so load from other processes hits all of them alike; a first round of blocks is warm-up and
not timed. (Whole training runs one after another varied by ±7% between repeats on a quiet machine.)
Prints one JSON line with samples/s per method and the ratios to ``hash``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import add_threads_arg, apply_threads, emit, log  # type: ignore[import-not-found]
from embcompress.data import make_synthetic
from embcompress.train.loop import TrainConfig, build_model, build_optimizers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=1000)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--scale", type=float, default=0.05)
    add_threads_arg(ap, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=20, help="timed rounds of blocks per method")
    ap.add_argument("--block-steps", type=int, default=25)
    ap.add_argument("--methods", default="hash,cafe,cafe-ml")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    apply_threads(args)
    ds = make_synthetic(rows=args.rows, scale=args.scale)
    dev = torch.device(args.device)
    dense, sparse = torch.from_numpy(ds.dense).to(dev), torch.from_numpy(ds.sparse.astype("int64")).to(dev)
    labels = torch.from_numpy(ds.labels).float().to(dev)
    runs = {}
    for method in args.methods.split(","):
        cfg = TrainConfig(method=method, compression=args.ratio, batch_size=args.batch_size)
        torch.manual_seed(0)
        model = build_model(cfg, ds).to(dev)
        model.train()
        runs[method] = {"model": model, "opts": build_optimizers(model, cfg), "step": 0, "seconds": 0.0}
    b, rows = args.batch_size, len(labels) - args.batch_size

    def step(run: dict) -> None:
        lo = run["step"] * b % rows
        for opt in run["opts"]:
            opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(run["model"](dense[lo:lo + b], sparse[lo:lo + b]), labels[lo:lo + b])
        loss.backward()
        for opt in run["opts"]:
            opt.step()
        run["step"] += 1

    for block in range(args.blocks + 1):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(args.block_steps):
                step(run)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if block:  # the first round warms up caches, allocators and the sketch
                run["seconds"] += time.perf_counter() - start
    samples = args.blocks * args.block_steps * b
    speed = {m: samples / r["seconds"] for m, r in runs.items()}
    rel = {m: round(v / speed["hash"], 3) for m, v in speed.items()} if "hash" in speed else {}
    log(f"relative to hash: {rel}")
    emit({"benchmark": "cafe_speed", "settings": vars(args),
          "train_samples_per_s": {m: round(v) for m, v in speed.items()}, "relative_to_hash": rel})


if __name__ == "__main__":
    main()
