"""CAFE adaptivity: the hot set changes halfway through a stream; how many steps until CAFE follows?

    PYTHONPATH=. .venv/bin/python benchmarks/cafe_adaptivity.py                 # sketch part, ~1 minute
    PYTHONPATH=. .venv/bin/python benchmarks/cafe_adaptivity.py --dlrm-rows 300000   # + DLRM part

Sketch part: two Zipf regimes over independent popularity orders (the new hot ids are mostly cold ids of
the first regime), batches of ``--batch`` frequency scores (one training step each); we report after each
step of the second regime the fraction of its true top-k that is hot, and the first step where it reaches
80%, for each decay and with the pressure rule on and off (off: DESIGN.md's mass rule alone).

DLRM part (``--dlrm-rows``): synthetic data with ``drift`` 1 (the popular ids change at 8 points along the
rows; the time-split test set is the last regime): test AUC of ``hash`` and ``cafe`` with and without the
pressure rule, and of ``cafe`` on the same data without drift. Prints JSON lines (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from common import emit, log  # type: ignore[import-not-found]
from embcompress.embeddings.hotsketch import HotSketch


def regime(n: int, universe: int, exponent: float, rng: np.random.Generator) -> torch.Tensor:
    p = np.arange(1, universe + 1, dtype=np.float64) ** -exponent
    order = rng.permutation(universe)  # rank -> id
    return torch.from_numpy(order[rng.choice(universe, size=n, p=p / p.sum())])


def sketch_run(first: torch.Tensor, second: torch.Tensor, new_top: torch.Tensor, k: int, threshold: float,
               args: argparse.Namespace, decay: float, pressure: bool) -> dict:
    sk = HotSketch(int(k * args.buckets_per_row), k, threshold, decay=decay, decay_mass=args.decay_mass,
                   pressure_decay=pressure, preempt=pressure)
    for b in first.split(args.batch):
        sk.insert(b)
    old_hot = sk.num_hot()
    curve, reached, migrations = [], None, 0
    for step, b in enumerate(second.split(args.batch), 1):
        up = sk.insert(b)
        migrations += up.promoted_ids.numel()
        frac = float((sk.query(new_top)[0] >= 0).float().mean())
        curve.append(round(frac, 3))
        if reached is None and frac >= 0.8:
            reached = step
    return {"decay": decay, "pressure_rule": pressure, "hot_before_switch": old_hot,
            "steps_to_80pct_new_topk_hot": reached, "final_fraction": curve[-1],
            "promotions_after_switch": migrations, "curve_every_25_steps": curve[::25]}


def dlrm_part(args: argparse.Namespace) -> None:
    from embcompress.data import make_synthetic
    from embcompress.train.loop import TrainConfig, run_training

    logging.basicConfig(level=logging.WARNING)
    for drift in (1.0, 0.0):
        opts = {"rows": args.dlrm_rows, "scale": args.dlrm_scale, "drift": drift}
        ds = make_synthetic(**opts)
        runs = [("hash", {}), ("cafe", {}), ("cafe", {"pressure_decay": False, "preempt": False})]
        for method, mopts in (runs if drift else runs[1:2]):
            cfg = TrainConfig(data="synthetic", data_options=opts, method=method, compression=args.dlrm_ratio,
                              method_options=mopts, progress=False)
            s = run_training(cfg, dataset=ds)
            rec = {"benchmark": "cafe_adaptivity_dlrm", "drift": drift, "method": method, "options": mopts,
                   "ratio": args.dlrm_ratio, "rows": args.dlrm_rows, "scale": args.dlrm_scale,
                   **{k: s.get(k) for k in ("test_auc", "test_logloss", "bayes_auc", "train_samples_per_s")}}
            log(str(rec))
            emit(rec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="steps per regime")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--universe", type=int, default=500_000)
    ap.add_argument("--exponent", type=float, default=1.1)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--buckets-per-row", type=float, default=1.0)
    ap.add_argument("--decays", default="0.98,0.99")
    ap.add_argument("--decay-mass", type=float, default=10.0)
    ap.add_argument("--threshold", type=float, default=None, help="default: half the k-th count of a regime")
    ap.add_argument("--dlrm-rows", type=int, default=0, help="rows of the DLRM part (0: skip it)")
    ap.add_argument("--dlrm-scale", type=float, default=0.05)
    ap.add_argument("--dlrm-ratio", type=float, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    first, second = regime(n, args.universe, args.exponent, rng), regime(n, args.universe, args.exponent, rng)
    uniq, counts = torch.unique(second, return_counts=True)
    top = torch.argsort(counts, descending=True)[: args.k]
    threshold = args.threshold or counts[top[-1]].item() / 2
    runs = [sketch_run(first, second, uniq[top], args.k, threshold, args, float(d), p)
            for d in args.decays.split(",") for p in (True, False)]
    for r in runs:
        log(str({k: v for k, v in r.items() if k != "curve_every_25_steps"}))
    emit({"benchmark": "cafe_adaptivity", "settings": {**vars(args), "threshold": threshold}, "runs": runs})
    if args.dlrm_rows:
        dlrm_part(args)


if __name__ == "__main__":
    main()
