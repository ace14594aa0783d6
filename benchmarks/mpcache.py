"""mpcache vs full on synthetic Criteo-like data: AUC, DLRM training speed, cache hit rate, quantisation time.

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/mpcache.py [--rows 400000 --optimizer-states row,slot \
        --write-backs keep-grid,fresh --precisions int8,int4 --seeds 0,1,2]

Prints one JSON object (machine, git commit, settings, one entry per configuration). All runs share one
dataset and one process, so the speed ratios (``speed_vs_full``) compare runs made on the same machine
under the same load. The share of training time spent in (de)quantisation comes from a separate,
instrumented run (timers around every quantise/dequantise call) so that it does not slow the timed runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from statistics import mean, stdev
from typing import Any, Callable

import torch

from embcompress.data import make_synthetic
from embcompress.embeddings import full_table_bytes, mpcache
from embcompress.embeddings.mpcache import PRECISIONS, _cache_rows, table_bytes
from embcompress.train import loop
from common import add_threads_arg, apply_threads, commit, log, machine  # type: ignore[import-not-found]


def timed(fn: Callable[..., Any], clock: dict[str, float], device: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        if clock["on"]:
            clock["s"] += time.perf_counter() - t
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--scale", type=float, default=0.002, help="synthetic cardinality scale (0.002: ~67.5k ids)")
    ap.add_argument("--skew", type=float, default=1.1)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", default="0",
                    help="comma-separated training seeds; every configuration runs with each (paired with full)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policy", default="lfu", choices=["lfu", "lru"])
    ap.add_argument("--optimizer-states", default="row",
                    help="comma-separated mpcache optimizer_state modes to run (row, element, slot)")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--write-backs", default="keep-grid",
                    help="comma-separated mpcache write_back modes to run (keep-grid, fresh)")
    add_threads_arg(ap, default=1)  # 1 avoids oversubscribing shared cores
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    apply_threads(args)

    t0 = time.perf_counter()
    ds = make_synthetic(rows=args.rows, scale=args.scale, skew=args.skew, seed=args.data_seed)
    gen_s = time.perf_counter() - t0
    n = sum(ds.field_sizes)
    full_bytes = full_table_bytes(ds.field_sizes, args.dim)
    base = dict(data="synthetic", embedding_dim=args.dim, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, device=args.device, progress=False)
    seeds = [int(x) for x in args.seeds.split(",")]

    configs: list[tuple[str, str, dict[str, Any]]] = [("full", "full", {})]
    fractions = {"int8": 0.05, "int4": 0.01}
    for state in args.optimizer_states.split(","):
        for write_back in args.write_backs.split(","):
            for precision in args.precisions.split(","):
                frac = fractions[precision]
                opts = dict(precision=precision, cache_fraction=frac, policy=args.policy, optimizer_state=state,
                            write_back=write_back)
                suffix = ("" if state == "row" else f"-{state}") + ("" if write_back == "keep-grid" else f"-{write_back}")
                configs.append((f"mpcache-{precision}-{int(frac * 100)}%{suffix}", "mpcache", opts))

    # Per seed, all configurations run back to back, so each speed ratio compares neighbouring runs; the
    # AUC comparison is paired: the same seed gives full and mpcache the same MLP init and batch order.
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in configs}
    bayes = None
    for seed in seeds:
        for label, method, opts in configs:
            kw: dict[str, Any] = {}
            if method == "mpcache":
                bits = PRECISIONS[opts["precision"]]
                exact = table_bytes(n, args.dim, bits, _cache_rows(n, bits, None, opts["cache_fraction"]), opts["policy"])
                kw = dict(budget_bytes=exact, method_options=opts)
            summary, model = loop.train_model(loop.TrainConfig(method=method, seed=seed, **kw, **base), ds)
            table = loop.embedding_tables(model)[0]
            entry = {k: summary[k] for k in ("compression_actual", "embedding_bytes", "test_auc", "test_logloss",
                                              "train_samples_per_s", "train_seconds", "steps")}
            if method == "mpcache":
                entry.update(cache_rows=table.num_cache_rows, hit_rate=table.hit_rate(), precision=table.precision)
            runs[label].append(entry)
            bayes = summary.get("bayes_auc")
            log(f"seed {seed} {label}: AUC {entry['test_auc']:.4f}, {entry['train_samples_per_s']:.0f} samples/s")

    results: dict[str, Any] = {"bayes_auc": bayes}
    for label, entries in runs.items():
        full = runs["full"]
        row: dict[str, Any] = {"seeds": seeds, "runs": entries, "test_auc_mean": mean([e["test_auc"] for e in entries])}
        if label != "full":
            loss = [100 * (f["test_auc"] - e["test_auc"]) / f["test_auc"] for e, f in zip(entries, full)]
            speed = [e["train_samples_per_s"] / f["train_samples_per_s"] for e, f in zip(entries, full)]
            row.update(auc_relative_loss_pct=loss, auc_relative_loss_pct_mean=mean(loss),
                       auc_relative_loss_pct_stderr=stdev(loss) / len(loss) ** 0.5 if len(loss) > 1 else None,
                       speed_vs_full=speed, speed_vs_full_mean=mean(speed),
                       hit_rate=mean([e["hit_rate"] for e in entries]))
        results[label] = row

    # quantisation share: one instrumented INT8 run, timers around quantise / dequantise calls made
    # inside train_epoch (table initialisation and evaluation are not counted)
    clock = {"s": 0.0, "on": 0.0}
    saved = mpcache.quantize_rows, mpcache.dequantize_rows, loop.train_epoch
    mpcache.quantize_rows = timed(saved[0], clock, args.device)
    mpcache.dequantize_rows = timed(saved[1], clock, args.device)

    def train_epoch(*a: Any, **k: Any) -> Any:
        clock["on"] = 1.0
        try:
            return saved[2](*a, **k)
        finally:
            clock["on"] = 0.0

    loop.train_epoch = train_epoch
    try:
        label, method, opts = configs[1]
        steps = min(500, runs[label][0]["steps"])
        summary, _ = loop.train_model(loop.TrainConfig(method=method, budget_bytes=runs[label][0]["embedding_bytes"],
                                          method_options=opts, max_steps=steps, seed=seeds[0], **base), ds)
        results["quantisation_share"] = {
            "config": label, "steps": steps, "quant_seconds": clock["s"],
            "train_seconds": summary["train_seconds"], "share": clock["s"] / summary["train_seconds"],
        }
    finally:
        mpcache.quantize_rows, mpcache.dequantize_rows, loop.train_epoch = saved

    print(json.dumps({
        "benchmark": "mpcache", "machine": machine(), **commit(),
        "settings": {**vars(args), "num_ids": n, "fields": len(ds.field_sizes), "data_seconds": gen_s},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
