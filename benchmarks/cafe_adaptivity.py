"""CAFE adaptivity: the hot set changes halfway through a stream; how many steps until HotSketch follows?

    PYTHONPATH=. .venv/bin/python benchmarks/cafe_adaptivity.py [--steps 400 --batch 4096 --k 1000]

Two Zipf regimes over disjoint popularity orders (the new hot ids are cold ids of the first regime). The
sketch gets frequency scores per batch with decay, as in training; we report after each step of the second
half the fraction of the new regime's true top-k that are hot, and the first step where it reaches 80%.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from embcompress.embeddings.hotsketch import HotSketch
from hotsketch import machine  # type: ignore[import-not-found]


def regime(n: int, universe: int, exponent: float, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    p = np.arange(1, universe + 1, dtype=np.float64) ** -exponent
    order = rng.permutation(universe)  # rank -> id
    return torch.from_numpy(order[rng.choice(universe, size=n, p=p / p.sum())]), order


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="steps per regime")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--universe", type=int, default=500_000)
    ap.add_argument("--exponent", type=float, default=1.1)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--buckets-per-row", type=int, default=4)
    ap.add_argument("--decay", type=float, default=0.98)
    ap.add_argument("--decay-mass", type=float, default=10.0)
    ap.add_argument("--threshold", type=float, default=None, help="default: half the k-th count of a regime")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    first, _ = regime(n, args.universe, args.exponent, rng)
    second, order2 = regime(n, args.universe, args.exponent, rng)
    uniq, counts = torch.unique(second, return_counts=True)
    top = torch.argsort(counts, descending=True)[: args.k]
    new_top = uniq[top]
    threshold = args.threshold or counts[top[-1]].item() / 2
    sk = HotSketch(args.k * args.buckets_per_row, args.k, threshold, decay=args.decay, decay_mass=args.decay_mass)
    for b in first.split(args.batch):
        sk.insert(b)
    old_hot = sk.num_hot()
    curve, reached = [], None
    for step, b in enumerate(second.split(args.batch), 1):
        sk.insert(b)
        frac = float((sk.query(new_top)[0] >= 0).float().mean())
        curve.append(round(frac, 3))
        if reached is None and frac >= 0.8:
            reached = step
    print(json.dumps({"benchmark": "cafe_adaptivity", **machine(), "settings": {**vars(args), "threshold": threshold},
                      "hot_before_switch": old_hot, "steps_to_80pct_new_topk_hot": reached,
                      "final_fraction": curve[-1], "curve_every_25_steps": curve[::25]}))


if __name__ == "__main__":
    main()
