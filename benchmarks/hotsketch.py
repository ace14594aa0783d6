"""HotSketch benchmark: insert+query throughput at batches of 4096x26 ids, and top-k recall vs memory.

    PYTHONPATH=. .venv/bin/python benchmarks/hotsketch.py                # a few minutes on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/hotsketch.py --stream 10000000 --universe 5000000
    PYTHONPATH=. python3 benchmarks/hotsketch.py --device cuda --skip-recall --threads 1   # on a GPU

Throughput: per batch one ``query`` (as in the forward) and one ``insert`` of the same ids with the
located slots reused (as in the training step), on 1 and on 2 threads; best of ``--repeats`` passes
because the machine is shared (the load average is recorded). ``--baseline FILE`` (another version of
hotsketch.py, e.g. ``git show bb67e12:embcompress/embeddings/hotsketch.py > /tmp/old.py``) alternates
passes of that version with the current one in the same process and reports the speed-up (best pass
against best pass, and the median over consecutive pairs of passes): a ratio that survives a loaded machine.
``--key-dtype int32`` times the sketch with 4-byte ids (what CAFE uses when its ids fit);
``--baseline-key-dtype int64`` makes the baseline the current sketch with 8-byte ids. Recall: the true top-k by exact counting
against the hot set (``recall_hot``) and the sketch's k highest scores (``recall_top``), per Zipf exponent,
batch size and buckets per hot row (memory). Prints JSON lines (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time

import numpy as np
import torch

from common import emit, log  # type: ignore[import-not-found]
from embcompress.embeddings.hotsketch import HotSketch


def zipf_stream(n: int, universe: int, exponent: float, seed: int, spacing: int = 7919) -> torch.Tensor:
    """n ids drawn from ``universe`` distinct ids (``k * spacing + 13``) with Zipf popularity."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, universe + 1, dtype=np.float64) ** -exponent
    draws = rng.choice(universe, size=n, p=p / p.sum())
    return torch.from_numpy(rng.permutation(universe)[draws] * spacing + 13)  # popularity not id order


def load_baseline(path: str) -> type:
    """The HotSketch class of another version of hotsketch.py (a file)."""
    spec = importlib.util.spec_from_file_location("hotsketch_baseline", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.HotSketch


def one_pass(cls: type, batches: tuple[torch.Tensor, ...], hot_rows: int) -> float:
    """Seconds for query + insert (located slots reused) of every batch on a fresh sketch (on the
    batches' device; a CUDA pass ends with a synchronize)."""
    dev = batches[0].device
    sk = cls(hot_rows, hot_rows, threshold=50.0).to(dev)
    for b in batches[:2]:  # warm-up
        sk.insert(b)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        loc = sk.locate(b)
        sk.query(b, loc)
        sk.insert(b, located=loc)
    sync()
    return time.perf_counter() - t0


def throughput(ids: torch.Tensor, batch: int, hot_rows: int, repeats: int, threads: int,
               baseline: type | None = None, sketch: type = HotSketch) -> dict:
    torch.set_num_threads(threads)
    batches = ids[: (len(ids) // batch) * batch].split(batch)
    times: list[float] = []
    base_times: list[float] = []
    for r in range(repeats):  # best of several passes: the machine is shared
        if baseline is not None and r % 2:  # alternate which version goes first
            base_times.append(one_pass(baseline, batches, hot_rows))
        times.append(one_pass(sketch, batches, hot_rows))
        if baseline is not None and not r % 2:
            base_times.append(one_pass(baseline, batches, hot_rows))
    best = min(times)
    out = {"device": str(ids.device), "threads": threads, "ids_per_s": round(len(batches) * batch / best),
           "ms_per_batch": round(best / len(batches) * 1e3, 2), "loadavg_1m": round(os.getloadavg()[0], 2)}
    if baseline is not None:
        out.update(baseline_ids_per_s=round(len(batches) * batch / min(base_times)),
                   speedup_best=round(min(base_times) / best, 3),
                   speedup_median_pair=round(statistics.median(b / t for b, t in zip(base_times, times)), 3))
    return out


def recall(ids: torch.Tensor, k: int, buckets_per_row: float, batch: int, dim: int) -> dict:
    """Recall of the true top-k with k hot rows; and the lookup mass served by hot rows when the hot rows
    and their sketch share get a fixed memory (that of ``k`` rows at one bucket per row, D = ``dim``)."""
    uniq, counts = torch.unique(ids, return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    count_of = dict(zip(uniq.tolist(), counts.tolist()))

    def run(rows: int) -> tuple[HotSketch, set, float]:
        kth = counts[order[rows - 1]].item()
        sk = HotSketch(max(1, int(rows * buckets_per_row)), rows, threshold=kth / 2)
        for b in ids.split(batch):
            sk.insert(b)
        return sk, set(uniq[order[:rows]].tolist()), kth / 2

    sk, true_top, threshold = run(k)
    hot = set(sk.hot_entries()[0].tolist())
    w = max(1, int(k * buckets_per_row))
    row_bytes = 4 * dim + HotSketch.memory_bytes_for(w, k) / k
    rows_eq = int(k * (4 * dim + HotSketch.memory_bytes_for(k, k) / k) / row_bytes)
    sk_eq, _, _ = run(rows_eq)
    hot_eq = sk_eq.hot_entries()[0].tolist()
    return {"batch": batch, "buckets_per_row": buckets_per_row, "sketch_bytes_per_hot_row": round(row_bytes - 4 * dim, 1),
            "threshold": threshold, "recall_hot": round(len(hot & true_top) / k, 4),
            "recall_top": round(len(set(sk.top(k).tolist()) & true_top) / k, 4),
            "equal_memory_hot_rows": rows_eq,
            "equal_memory_hot_mass": round(sum(count_of.get(i, 0) for i in hot_eq) / len(ids), 4),
            "top_k_mass": round(counts[order[:k]].sum().item() / len(ids), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stream", type=int, default=4_000_000)
    ap.add_argument("--universe", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=1000, help="hot rows for the recall runs")
    ap.add_argument("--speed-hot-rows", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=4096 * 26)
    ap.add_argument("--recall-batches", default="4096,106496")
    ap.add_argument("--buckets-per-row", default="0.5,1,2,4")
    ap.add_argument("--exponents", default="1.05,1.1,1.3")
    ap.add_argument("--threads", default="1,2", help="thread counts for the throughput runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=16, help="embedding dim for the equal-memory comparison")
    ap.add_argument("--skip-recall", action="store_true")
    ap.add_argument("--baseline", help="another hotsketch.py to time against, alternating passes")
    ap.add_argument("--key-dtype", default="int64", choices=["int64", "int32"], help="ids stored in the sketch")
    ap.add_argument("--baseline-key-dtype", choices=["int64", "int32"],
                    help="time against the current sketch with this key dtype (instead of --baseline FILE)")
    ap.add_argument("--device", default="cpu", help="where the throughput runs (recall runs on the CPU)")
    args = ap.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.baseline_key_dtype:
        baseline = functools.partial(baseline or HotSketch, key_dtype=getattr(torch, args.baseline_key_dtype))
    sketch = functools.partial(HotSketch, key_dtype=getattr(torch, args.key_dtype))
    # int32 keys hold ids below 2^31: space the ids more tightly then (for both versions of a comparison)
    spacing = 7919 if "int32" not in (args.key_dtype, args.baseline_key_dtype) else (2**31 - 14) // args.universe
    for exponent in (float(e) for e in args.exponents.split(",")):
        ids = zipf_stream(args.stream, args.universe, exponent, seed=0, spacing=spacing)
        speed = [throughput(ids.to(args.device), args.batch, args.speed_hot_rows, args.repeats, int(t), baseline, sketch)
                 for t in args.threads.split(",")]
        log(f"zipf {exponent}: {speed}")
        torch.set_num_threads(2)
        rec = [] if args.skip_recall else [
            recall(ids, args.k, float(m), int(b), args.dim) for b in args.recall_batches.split(",")
            for m in args.buckets_per_row.split(",")]
        emit({"benchmark": "hotsketch", "settings": vars(args), "exponent": exponent,
              "throughput": speed, "recall": rec})


if __name__ == "__main__":
    main()
