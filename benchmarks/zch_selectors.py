"""How well each table's selector picks the ids that get their own row, on the training ids of the
sweep's synthetic data, without the model: the share of the hashed fields' lookups that own rows serve.

    python benchmarks/zch_selectors.py --rows 1000000 --scale 0.02 --ratio 1000 --seeds 0,1,2 [--drift 0.5]

Every table is built at the same byte budget and fed the training rows in order, batch by batch; its
state is updated after each batch as in training (``cafe`` with ``importance=frequency``, since there
is no gradient here). One JSON line per (seed, table): own rows, the share of lookups they served over
the whole stream and over its last quarter, the number of ids admitted, and for reference the share the
best fixed set of as many ids would serve (the most frequent ids of the whole stream, known in advance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads_arg, apply_threads, emit, log  # noqa: E402

import embcompress as ec  # noqa: E402
from embcompress.data.synthetic import make_synthetic  # noqa: E402

TABLES = {
    "cafe": ("cafe", {"importance": "frequency"}),
    "cafe slots=2": ("cafe", {"importance": "frequency", "slots": 2}),
    "cafe buckets_per_row=0.5": ("cafe", {"importance": "frequency", "buckets_per_row": 0.5}),
    "cafe threshold=100": ("cafe", {"importance": "frequency", "threshold": 100.0}),
    "cafe pressure_decay=false": ("cafe", {"importance": "frequency", "pressure_decay": False}),
    "cafe preempt=false": ("cafe", {"importance": "frequency", "preempt": False}),
    "cafe buckets_per_row=0.5 pressure_decay=false": ("cafe", {"importance": "frequency", "buckets_per_row": 0.5,
                                                                "pressure_decay": False}),
    "cafe buckets_per_row=0.5 pressure_decay=false threshold=100": (
        "cafe", {"importance": "frequency", "buckets_per_row": 0.5, "pressure_decay": False, "threshold": 100.0}),
    "cafe buckets_per_row=0.5 pressure_decay=false threshold=30": (
        "cafe", {"importance": "frequency", "buckets_per_row": 0.5, "pressure_decay": False, "threshold": 30.0}),
    "zch": ("zch", {}),
    "zch distance_lfu": ("zch", {"eviction_policy": "distance_lfu"}),
}


def own_rows(table) -> int:
    return int(getattr(table, "num_hot_rows", 0) or getattr(table, "num_slots"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--scale", type=float, default=0.02)
    ap.add_argument("--drift", type=float, default=0.0, help="popularity drift over time, 0..1 (make_synthetic)")
    ap.add_argument("--ratio", type=float, default=1000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tables", default=",".join(TABLES))
    add_threads_arg(ap, 1)
    args = ap.parse_args()
    apply_threads(args)
    for seed in [int(s) for s in args.seeds.split(",")]:
        ds = make_synthetic(rows=args.rows, scale=args.scale, seed=seed, drift=args.drift)
        train_rows = ds.num_rows - ds.num_rows // 7  # the time split's training rows
        offsets = np.concatenate([[0], np.cumsum(ds.field_sizes)[:-1]])
        ids = torch.from_numpy(ds.sparse[:train_rows].astype(np.int64) + offsets)  # (rows, F) global ids
        batches = ids.split(args.batch_size)
        for label in args.tables.split(","):
            method, options = TABLES[label]
            torch.manual_seed(seed)
            table = ec.make_table(method, ds.field_sizes, args.dim, compression=args.ratio, **options)
            table.train()
            hashed = (table.rows < table.sizes).nonzero().squeeze(1)  # fields that can hold own rows
            served = lookups = late_served = late_lookups = admitted = 0
            counts = torch.zeros(table.num_embeddings, dtype=torch.int64)
            late = len(batches) * 3 // 4
            log(f"seed {seed} {label}: {own_rows(table)} own rows")
            for step, batch in enumerate(batches):
                sub = batch[:, hashed].reshape(-1)
                rows = table.row_index(sub)
                own = int((rows >= table.num_hash_rows).sum())
                served, lookups = served + own, lookups + sub.numel()
                if step >= late:
                    late_served, late_lookups = late_served + own, late_lookups + sub.numel()
                counts.index_add_(0, sub, torch.ones_like(sub))
                with torch.enable_grad():
                    table(batch.reshape(-1, 1))
                table.before_optimizer_step()
                table.after_optimizer_step()
                stats = table.training_stats()
                admitted += int(stats.get("promoted", stats.get("admitted", 0)))
            best = counts.topk(own_rows(table)).values.sum().item() / counts.sum().item()
            emit({"seed": seed, "table": label, "ratio": args.ratio, "drift": args.drift, "bytes": table.memory_bytes(),
                  "own_rows": own_rows(table), "served_share": round(served / lookups, 4),
                  "served_share_last_quarter": round(late_served / late_lookups, 4),
                  "best_fixed_share": round(best, 4), "admitted": admitted, "steps": len(batches)})


if __name__ == "__main__":
    main()
