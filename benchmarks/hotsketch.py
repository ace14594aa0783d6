"""HotSketch benchmark: insert+query throughput at batches of 4096x26 ids, and top-k recall vs memory.

    PYTHONPATH=. .venv/bin/python benchmarks/hotsketch.py                # a few minutes on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/hotsketch.py --stream 10000000 --universe 5000000

Prints one JSON line: machine, commit, settings, ids/s, and recall of the true top-k (exact counting) by
the hot set and by the sketch's top-k, per Zipf exponent and buckets per hot row (memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import numpy as np
import torch

from embcompress.embeddings.hotsketch import HotSketch


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit}


def zipf_stream(n: int, universe: int, exponent: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    p = np.arange(1, universe + 1, dtype=np.float64) ** -exponent
    draws = rng.choice(universe, size=n, p=p / p.sum())
    return torch.from_numpy(rng.permutation(universe)[draws] * 7919 + 13)


def throughput(ids: torch.Tensor, batch: int, hot_rows: int, repeats: int) -> float:
    sk = HotSketch(hot_rows, hot_rows, threshold=50.0)
    batches = ids[: (len(ids) // batch) * batch].split(batch)
    sk.insert(batches[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):  # best of several passes: the machine is shared
        t0 = time.perf_counter()
        for b in batches:
            sk.query(b)
            sk.insert(b)
        best = min(best, time.perf_counter() - t0)
    return len(batches) * batch / best


def recall(ids: torch.Tensor, k: int, buckets_per_row: int, batch: int) -> dict:
    uniq, counts = torch.unique(ids, return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    true_top = set(uniq[order[:k]].tolist())
    kth = counts[order[k - 1]].item()
    sk = HotSketch(k * buckets_per_row, k, threshold=kth / 2)
    for b in ids.split(batch):
        sk.insert(b)
    hot = set(sk.hot_entries()[0].tolist())
    mem = HotSketch.memory_bytes_for(k * buckets_per_row, k)
    return {"buckets_per_row": buckets_per_row, "sketch_bytes_per_hot_row": round(mem / k, 1),
            "threshold": kth / 2, "recall_hot": len(hot & true_top) / k,
            "recall_top": len(set(sk.top(k).tolist()) & true_top) / k}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stream", type=int, default=2_000_000)
    ap.add_argument("--universe", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=1000, help="hot rows for the recall runs")
    ap.add_argument("--speed-hot-rows", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=4096 * 26)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "hotsketch", **machine(), "settings": vars(args), "throughput_ids_per_s": {},
              "recall": {}}
    for exponent in (1.05, 1.1, 1.3):
        ids = zipf_stream(args.stream, args.universe, exponent, seed=0)
        result["throughput_ids_per_s"][str(exponent)] = round(throughput(ids, args.batch, args.speed_hot_rows,
                                                                         args.repeats))
        result["recall"][str(exponent)] = [recall(ids, args.k, m, args.batch) for m in (1, 2, 4, 8, 16)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
