"""How long the learning-rate warm-up may be on a short run: validation AUC by ``warmup_max_share``.

A run of fewer steps than ``--warmup-steps`` (300) never reached ``--lr`` before the cap existed. This
trains the same short run with the warm-up capped at several shares of its steps (a share above
300 / steps is the uncapped ramp) over several seeds and prints, per share, the mean validation AUC
(the last ``--val-fraction`` of the training rows) and, for the record only, the test AUC. The default
share is chosen on the validation column.

    PYTHONPATH=. .venv/bin/python benchmarks/warmup_cap.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads_arg, apply_threads, emit  # noqa: E402

from embcompress.data import load_dataset  # noqa: E402
from embcompress.train.loop import TrainConfig, run_training  # noqa: E402

CRITEO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_kaggle_sample_10k.tsv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"criteo:{CRITEO_SAMPLE}")
    ap.add_argument("--cache-dir", default="bench-out/warmup-cache")
    ap.add_argument("--rows", type=int, default=10_000, help="synthetic: rows (10,000: 67 steps, as the sample)")
    ap.add_argument("--method", default="full")
    ap.add_argument("--compression", type=float)
    ap.add_argument("--shares", default="0.1,0.2,0.333,0.5,1,100", help="100: effectively uncapped")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--optimizer", default="adagrad")
    add_threads_arg(ap, default=1)
    args = ap.parse_args()
    apply_threads(args)
    opts = ({"min_count": 2, "cache_dir": args.cache_dir} if args.data.startswith(("criteo:", "csv:"))
            else {"rows": args.rows, "skew": "criteo-sample"} if args.data == "synthetic" else {})
    ds = load_dataset(args.data, progress=False, **opts)
    for share in [float(s) for s in args.shares.split(",")]:
        runs = []
        for seed in range(args.seeds):
            cfg = TrainConfig(data=args.data, data_options=opts, method=args.method, compression=args.compression,
                              batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, seed=seed,
                              val_fraction=args.val_fraction, warmup_max_share=share, progress=False)
            runs.append(run_training(cfg, dataset=ds))
        val = [r["val_auc"] for r in runs]
        emit({"bench": "warmup_cap", "data": args.data, "method": args.method, "lr": args.lr,
              "optimizer": args.optimizer, "warmup_max_share": share, "warmup_steps_used": runs[0]["warmup_steps_used"],
              "steps": runs[0]["steps"], "seeds": args.seeds, "val_auc_mean": statistics.mean(val),
              "val_auc_sd": statistics.stdev(val) if len(val) > 1 else 0.0,
              "test_auc_mean": statistics.mean(r["test_auc"] for r in runs)})


if __name__ == "__main__":
    main()
