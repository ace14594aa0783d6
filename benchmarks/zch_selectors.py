"""How well each table's selector picks the ids that get their own (exact) row, without the model: the
share of the compressed fields' lookups that own rows serve, on the training ids of the sweep's synthetic
data or of a dataset directory.

    python benchmarks/zch_selectors.py --rows 1000000 --scale 0.02 --ratio 1000 --seeds 0,1,2 [--drift 0.5]
    python benchmarks/zch_selectors.py --data bench-out/large-data-10m-cs --batch-size 4096 --ratio 1000 \
        --tables tt,cafe-tt

Every table is built at the same byte budget and fed the training rows in order, batch by batch; its
state is updated after each batch as in training (``cafe`` with ``importance=frequency``, since there
is no gradient here). Own rows are ``cafe``'s hot rows and ``zch``'s slots (over the hashed fields), and
``tt``'s cache and ``cafe-tt``'s hot rows (over the TT fields). One JSON line per (seed, table): own
rows, the share of lookups they served over the whole stream and over its last quarter, the number of
ids admitted, and for reference the share the best fixed set of as many ids would serve (the most
frequent ids of the whole stream, known in advance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads_arg, apply_threads, emit, log  # noqa: E402

import embcompress as ec  # noqa: E402
from embcompress.cli import parse_options  # noqa: E402
from embcompress.data.arrays import open_dataset, split_dataset  # noqa: E402
from embcompress.data.synthetic import make_synthetic  # noqa: E402

TABLES = ("cafe", "cafe slots=2", "cafe buckets_per_row=0.5", "cafe threshold=100", "cafe pressure_decay=false",
          "cafe preempt=false", "cafe buckets_per_row=0.5 pressure_decay=false",
          "cafe buckets_per_row=0.5 pressure_decay=false threshold=100",
          "cafe buckets_per_row=0.5 pressure_decay=false threshold=30", "zch", "zch eviction_policy=distance_lfu")
NO_GRADIENT = {"cafe": {"importance": "frequency"}, "cafe-ml": {"importance": "frequency"}}


def table_spec(label: str) -> tuple[str, dict]:
    """``"method key=value ..."`` -> (method, options); ``cafe``'s importance is the lookup count here."""
    method, *items = label.split()
    return method, {**NO_GRADIENT.get(method, {}), **parse_options(items)}


def own_rows(table) -> int:
    if isinstance(table, ec.embeddings.tt.TTEmbeddingBag):
        return int(table.cache_weight.shape[0])
    return int(getattr(table, "num_hot_rows", 0) or getattr(table, "num_slots"))


def compressed_fields(table) -> torch.Tensor:
    """The fields whose ids can be given own rows: the hashed fields, or the TT fields."""
    if isinstance(table, ec.embeddings.tt.TTEmbeddingBag):
        return (table.field_group >= 0).nonzero().squeeze(1)
    return (table.rows < table.sizes).nonzero().squeeze(1)


def served_by_own_rows(table, ids: torch.Tensor) -> int:
    """How many of ``ids`` (global ids of compressed fields) an own row serves now."""
    if isinstance(table, ec.embeddings.tt.TTEmbeddingBag):
        with torch.no_grad():
            return int(table._cache_find(ids)[0].sum())
    return int((table.row_index(ids) >= table.num_hash_rows).sum())


def training_ids(args, seed: int) -> tuple[list[int], np.ndarray]:
    """(field sizes, the training rows' local ids) of the synthetic data for ``seed`` or of ``--data``."""
    if args.data:
        ds = open_dataset(args.data)
        train, _ = split_dataset(ds)
        return ds.field_sizes, ds.sparse[: train.num_rows]
    ds = make_synthetic(rows=args.rows, scale=args.scale, seed=seed, drift=args.drift)
    return ds.field_sizes, ds.sparse[: ds.num_rows - ds.num_rows // 7]  # the time split's training rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a dataset directory (preprocessed or synthetic) instead of fresh synthetic data")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--scale", type=float, default=0.02)
    ap.add_argument("--drift", type=float, default=0.0, help="popularity drift over time, 0..1 (make_synthetic)")
    ap.add_argument("--ratio", type=float, default=1000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tables", default=",".join(TABLES),
                    help="comma-separated 'method key=value ...' (a method and its --option values)")
    add_threads_arg(ap, 1)
    args = ap.parse_args()
    apply_threads(args)
    for seed in [int(s) for s in args.seeds.split(",")]:
        field_sizes, sparse = training_ids(args, seed)
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(field_sizes)[:-1]]).astype(np.int64))
        num_batches = -(-len(sparse) // args.batch_size)
        for label in args.tables.split(","):
            method, options = table_spec(label)
            torch.manual_seed(seed)
            table = ec.make_table(method, field_sizes, args.dim, compression=args.ratio, **options)
            table.train()
            fields = compressed_fields(table)
            served = lookups = late_served = late_lookups = admitted = 0
            counts = torch.zeros(sum(field_sizes), dtype=torch.int64)
            late = num_batches * 3 // 4
            log(f"seed {seed} {label}: {own_rows(table)} own rows")
            for step in tqdm(range(num_batches), desc=label, mininterval=10, disable=None):
                batch = torch.from_numpy(np.asarray(sparse[step * args.batch_size:(step + 1) * args.batch_size],
                                                    dtype=np.int64)) + offsets  # (B, F) global ids
                sub = batch[:, fields].reshape(-1)
                own = served_by_own_rows(table, sub)
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
                  "best_fixed_share": round(best, 4), "admitted": admitted, "steps": num_batches,
                  "data": args.data or "synthetic"})


if __name__ == "__main__":
    main()
