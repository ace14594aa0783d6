"""DLRM training samples/s with ``cafe`` (and ``cafe-ml``) vs ``hash`` at the same compression ratio, in one run.

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/cafe_speed.py [--ratio 1000 --rows 200000 --blocks 20]
    # on a GPU (the data is copied to it once; each timed block ends with a synchronize)
    PYTHONPATH=.:benchmarks python3 benchmarks/cafe_speed.py --device cuda --batch-size 4096 --scale 1

Every method gets its own DLRM and optimizer (the loop's: Adagrad, lr 0.05, ``embcompress.attach``) on one
dataset, and their training steps run interleaved in blocks (25 steps of hash, 25 of cafe, 25 of cafe-ml,
then again), so load from other processes hits all of them alike; a first round of blocks is warm-up and
not timed. (Whole training runs one after another varied by ±7% between repeats on a quiet machine.)
``--clock cpu`` counts this process's CPU time per step instead of wall time: on a machine shared with
other work a step preempted for a while then costs what it computed, not how long it waited.
Prints one JSON line with samples/s per method and the ratios to ``hash``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from common import (add_dlrm_step_args, apply_threads, dlrm_steppers, emit,  # type: ignore[import-not-found]
                    interleaved_seconds, log)
from embcompress.data import make_synthetic


def cpu_seconds(steps: dict[str, Callable[[], None]], blocks: int, block_steps: int) -> dict[str, float]:
    """:func:`common.interleaved_seconds` (same order of blocks, same warm-up round) in process CPU time:
    each step is timed on its own, and a stepper's first ``block_steps`` steps (the warm-up) are not counted."""
    spent, calls = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0)

    def timed(key: str, step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            start = time.process_time()
            step()
            calls[key] += 1
            if calls[key] > block_steps:
                spent[key] += time.process_time() - start
        return run

    interleaved_seconds({k: timed(k, s) for k, s in steps.items()}, blocks, block_steps)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dlrm_step_args(ap, ratio=1000.0)
    ap.add_argument("--methods", default="hash,cafe,cafe-ml")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time per step: wall time, or this process's CPU time (CPU only)")
    args = ap.parse_args()
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        ap.error("--clock cpu measures host CPU time: use it with --device cpu")
    apply_threads(args)
    ds = make_synthetic(rows=args.rows, scale=args.scale)
    steps = dlrm_steppers(ds, args.methods.split(","), args.ratio, args.batch_size, args.device)
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else None
    if args.clock == "cpu":
        seconds = cpu_seconds(steps, args.blocks, args.block_steps)
    else:
        seconds = interleaved_seconds(steps, args.blocks, args.block_steps, sync)
    samples = args.blocks * args.block_steps * args.batch_size
    speed = {m: samples / t for m, t in seconds.items()}
    rel = {m: round(v / speed["hash"], 3) for m, v in speed.items()} if "hash" in speed else {}
    log(f"relative to hash: {rel}")
    emit({"benchmark": "cafe_speed", "settings": vars(args),
          "train_samples_per_s": {m: round(v) for m, v in speed.items()}, "relative_to_hash": rel})


if __name__ == "__main__":
    main()
