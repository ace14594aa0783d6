"""Our table operations against their native peers, interleaved in one process, as speed ratios.

    PYTHONPATH=. .venv/bin/python benchmarks/peers.py [--threads 1,2] [--rows lookup,train,sketch,tt] \
        [--cafe-sketch /tmp/cafe/sketch.so]

Rows (each prints one JSON line per thread count; ``ratio_*`` is our speed over the peer's):
- ``lookup``: mpcache INT8 (5% cache, filled by training steps first) eval lookups against FBGEMM's CPU
  ``IntNBitTableBatchedEmbeddingBagsCodegen`` (INT8, one table per field, inputs already in its
  table-major layout) and PyTorch's ``quantized.embedding_bag_byte_rowwise_offsets`` on mpcache's rows
  (no cache: the floor of any INT8 lookup).
- ``train``: one training step (lookup, backward, update) of mpcache INT8 + SGD (hooks attached) against
  ``full`` + SGD and FBGEMM's fp32 TBE with exact SGD fused into its backward.
- ``sketch``: HotSketch query + insert (with int64 ids, and int32 ids as cafe stores them) against the
  CAFE authors' C++ sketch (``--cafe-sketch``: their
  ``ArtifactEvaluation/embeddings/sketch.cpp`` from github HugoZHL/CAFE, built by the user outside this
  repository with their README's ``g++ -fPIC -shared --std=c++17 -O3 -fopenmp``; skipped without it),
  called through ctypes as their embedding calls it (insert then query, at most 16,384 ids a call), and
  the recall of the true top-k of the same Zipf-1.1 stream (k: the ids whose exact count reaches the
  threshold, at most the hot rows).
- ``tt``: the ``tt`` table at 100x against ``full``: training step (forward, backward, SGD, hooks).

Every contender handles the same Zipf batches (``common.zipf_requests``); a round times each contender
on all batches in turn, and a ratio is the median over rounds of the per-round ratio of process CPU
seconds (``wall_ratio_*``: of wall seconds), so load from other processes hits both sides alike. Prints JSON lines (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

import embcompress as ec
from common import emit, kaggle_field_sizes, log, zipf_requests  # type: ignore[import-not-found]
from embcompress.embeddings.mpcache import MPCacheEmbeddingBag

Run = Callable[[], None]  # processes every batch once


def interleaved(contenders: dict[str, Run], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds of each contender per round, the contenders taking turns within a
    round (after one untimed warm-up round)."""
    seconds: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in contenders}
    for r in range(rounds + 1):
        for key, run in contenders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            if r:
                seconds[key]["wall"].append(time.perf_counter() - wall)
                seconds[key]["cpu"].append(time.process_time() - cpu)
    return seconds


def summarise(seconds: dict[str, dict[str, list[float]]], items: int, ours: str) -> dict[str, Any]:
    """Items per wall second (best round) and per CPU second (median) for each contender, and our
    median per-round speed ratio to each peer in CPU time (``ratio_vs_*``) and wall time (``wall_ratio_vs_*``).
    CPU time is what a loaded machine disturbs least; at 1 thread the two agree on a quiet machine."""
    out: dict[str, Any] = {}
    for key, s in seconds.items():
        out[f"{key}_per_s"] = round(items / min(s["wall"]))
        out[f"{key}_per_cpu_s"] = round(items / statistics.median(s["cpu"]))
    mine = seconds[ours]
    for key, s in seconds.items():
        if key != ours:
            for clock, label in (("cpu", "ratio_vs_"), ("wall", "wall_ratio_vs_")):
                ratios = [p / o for o, p in zip(mine[clock], s[clock]) if o > 0]
                out[label + key] = round(statistics.median(ratios), 3)
    return out


def batches_runner(step: Callable[[torch.Tensor], Any], batches: list[torch.Tensor]) -> Run:
    def run() -> None:
        for b in batches:
            step(b)
    return run


# ---------------------------------------------------------------------------- lookup and training
def trained_mpcache(sizes: list[int], dim: int, warm: list[torch.Tensor], lr: float) -> tuple[MPCacheEmbeddingBag, Any]:
    """mpcache INT8 + 5% cache with SGD attached, after training steps on ``warm`` (cache filled)."""
    torch.manual_seed(0)
    table = MPCacheEmbeddingBag(sizes, dim, precision="int8", cache_fraction=0.05)
    table.validate_ids = False
    opt = torch.optim.SGD(table.parameters(), lr=lr)
    ec.attach(table, opt)
    grad = torch.randn(1, dim)
    for ids in warm:
        opt.zero_grad(set_to_none=True)
        table(ids).backward(grad.expand(ids.shape[0], dim))
        opt.step()
    return table, opt


def fbgemm_int8(sizes: list[int], dim: int) -> Callable[[torch.Tensor], Callable[[], Any]] | None:
    """(global ids (B*F, 1) -> a call of FBGEMM's INT8 inference TBE on them), or None without fbgemm_gpu."""
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    except ImportError:
        return None
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [(f"f{i}", n, dim, SparseType.INT8, EmbeddingLocation.HOST) for i, n in enumerate(sizes)],
        device="cpu", pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32)
    tbe.fill_random_weights()
    starts = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])

    def prepare(ids: torch.Tensor) -> Callable[[], Any]:
        local = ids.view(-1, len(sizes)) - starts  # (B, F)
        indices = local.t().reshape(-1).int().contiguous()  # table-major, as a KJT holds them
        offsets = torch.arange(indices.numel() + 1, dtype=torch.int32)
        return lambda: tbe(indices, offsets)

    return prepare


def lookup_row(args: argparse.Namespace, sizes: list[int], warm: list[torch.Tensor], timed: list[torch.Tensor]) -> Callable[[], dict]:
    table, _ = trained_mpcache(sizes, args.dim, warm, args.lr)
    table.eval()
    flat = [b.view(-1) for b in timed]
    offsets = torch.arange(flat[0].numel())
    codes = table.codes

    def ours() -> None:
        with torch.no_grad():
            for b in timed:
                table(b)

    def torch_op() -> None:
        for ids in flat:
            torch.ops.quantized.embedding_bag_byte_rowwise_offsets(codes, ids, offsets)

    contenders: dict[str, Run] = {"mpcache": ours, "torch_qop": torch_op}
    prepare = fbgemm_int8(sizes, args.dim)
    if prepare is not None:
        calls = [prepare(b) for b in timed]
        contenders["fbgemm_intnbit"] = lambda: [c() for c in calls] and None
    hit = table.hit_rate()

    def measure() -> dict:
        with torch.no_grad():
            s = interleaved(contenders, args.rounds)
        return {"unit": "lookups", "cache_hit_rate_training": round(hit, 3),
                **summarise(s, sum(b.numel() for b in timed), "mpcache")}
    return measure


def train_row(args: argparse.Namespace, sizes: list[int], warm: list[torch.Tensor], timed: list[torch.Tensor]) -> Callable[[], dict]:
    dim = args.dim
    grad = torch.randn(1, dim).expand(timed[0].shape[0], dim)
    mp, mp_opt = trained_mpcache(sizes, dim, warm, args.lr)
    torch.manual_seed(0)
    full = ec.make_table("full", sizes, dim, compression=1)
    full.validate_ids = False
    full_opt = torch.optim.SGD(full.parameters(), lr=args.lr)

    def stepper(table: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(ids: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            table(ids).backward(grad[: ids.shape[0]])
            opt.step()
        return step

    contenders: dict[str, Run] = {"mpcache": batches_runner(stepper(mp, mp_opt), timed),
                                  "full": batches_runner(stepper(full, full_opt), timed)}
    tbe = fbgemm_sgd(sizes, dim, args.lr)
    if tbe is not None:
        contenders["fbgemm_tbe_sgd"] = batches_runner(tbe, timed)

    def measure() -> dict:
        s = interleaved(contenders, args.rounds)
        return {"unit": "ids (training step)", "cache_hit_rate": round(mp.hit_rate(), 3),
                **summarise(s, sum(b.numel() for b in timed), "mpcache")}
    return measure


def fbgemm_sgd(sizes: list[int], dim: int, lr: float) -> Callable[[torch.Tensor], None] | None:
    """FBGEMM's fp32 CPU TBE with exact SGD fused into its backward, one table per field."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    except ImportError:
        return None
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in sizes],
        optimizer=EmbOptimType.EXACT_SGD, learning_rate=lr, pooling_mode=PoolingMode.SUM)
    starts = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])
    prepared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(ids: torch.Tensor) -> None:
        if id(ids) not in prepared:  # inputs in its table-major layout, made once per batch
            local = ids.view(-1, len(sizes)) - starts
            indices = local.t().reshape(-1).contiguous()
            prepared[id(ids)] = indices, torch.arange(indices.numel() + 1)
        out = tbe(*prepared[id(ids)])
        out.backward(torch.ones_like(out))

    return step


def tt_row(args: argparse.Namespace, sizes: list[int], warm: list[torch.Tensor], timed: list[torch.Tensor]) -> Callable[[], dict]:
    dim = args.dim
    grad = torch.randn(1, dim).expand(timed[0].shape[0], dim)
    contenders: dict[str, Run] = {}
    for label, ratio in (("tt", 100.0), ("full", 1.0)):
        torch.manual_seed(0)
        table = ec.make_table(label, sizes, dim, compression=ratio)
        table.validate_ids = False
        opt = torch.optim.SGD(table.parameters(), lr=args.lr)
        ec.attach(table, opt)

        def step(ids: torch.Tensor, table: nn.Module = table, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            table(ids).backward(grad[: ids.shape[0]])
            opt.step()
        for ids in warm:
            step(ids)
        contenders[label] = batches_runner(step, timed)

    def measure() -> dict:
        s = interleaved(contenders, args.rounds)
        return {"unit": "ids (training step)", "compression": 100,
                **summarise(s, sum(b.numel() for b in timed), "tt")}
    return measure


# ---------------------------------------------------------------------------- main
ROWS = {"lookup": lookup_row, "train": train_row, "tt": tt_row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="lookup,train,sketch,tt", help="comma list of: lookup, train, sketch, tt")
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts to measure at")
    ap.add_argument("--scale", type=float, default=0.0296, help="Kaggle cardinalities times this (0.0296: 1M rows)")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2048, help="samples per batch (x 26 fields ids)")
    ap.add_argument("--batches", type=int, default=5, help="timed batches per round")
    ap.add_argument("--warm", type=int, default=30, help="training batches before timing (fills caches)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--skew", type=float, default=1.1)
    add_sketch_args(ap)
    args = ap.parse_args()

    sizes = kaggle_field_sizes(args.scale)
    requests = zipf_requests(sizes, args.batch, args.warm + args.batches, args.skew)
    warm, timed = requests[:args.warm], requests[args.warm:]
    settings = {k: v for k, v in vars(args).items()}
    settings["num_ids"] = sum(sizes)
    rows = args.rows.split(",")
    for name in rows:
        if name == "sketch":
            measure = sketch_row(args)
        else:
            measure = ROWS[name](args, sizes, warm, timed)
        if measure is None:
            continue
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            log(f"{name}: {threads} thread(s)")
            for record in measure() if name == "sketch" else [measure()]:
                emit({"benchmark": "peers", "row": name, "threads": threads, **record, "settings": settings})


# ---------------------------------------------------------------------------- HotSketch vs the authors' sketch
def add_sketch_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cafe-sketch", default=None,
                    help="shared library built from CAFE's ArtifactEvaluation/embeddings/sketch.cpp (skipped without)")
    ap.add_argument("--sketch-batches", default="16384,106496")
    ap.add_argument("--sketch-key-dtypes", default="int64,int32",
                    help="HotSketch id dtypes to measure (int32: 12-byte slots, as cafe uses for ids below 2^31)")
    ap.add_argument("--sketch-buckets", type=int, default=65536)
    ap.add_argument("--sketch-threshold", type=float, default=20.0)
    ap.add_argument("--sketch-stream", type=int, default=4_000_000, help="ids per timed stream")
    ap.add_argument("--sketch-universe", type=int, default=10_000_000,
                    help="distinct ids the stream draws from (far more than the sketch has slots)")


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what C code prints to fd 1 to /dev/null (stdout stays JSON lines)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def sketch_row(args: argparse.Namespace) -> Callable[[], list[dict]] | None:
    from embcompress.embeddings.hotsketch import HotSketch

    if not args.cafe_sketch:
        log("sketch: skipped (no --cafe-sketch)")
        return None
    lib = ctypes.CDLL(args.cafe_sketch)
    ptr = ctypes.POINTER(ctypes.c_int)
    lib.batch_insert.argtypes = [ptr, ctypes.c_int, ctypes.c_int]
    lib.batch_insert.restype = ptr
    lib.batch_query.argtypes = [ptr, ctypes.c_int, ctypes.c_int]
    lib.batch_query.restype = ptr
    lib.init.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int]
    w, k, t = args.sketch_buckets, args.sketch_buckets - 1, args.sketch_threshold
    rng = np.random.default_rng(0)
    p = np.arange(1, args.sketch_universe + 1, dtype=np.float64) ** -1.1
    draws = rng.choice(args.sketch_universe, size=args.sketch_stream, p=p / p.sum())
    stream = (rng.permutation(args.sketch_universe)[draws] + 1).astype(np.int32)  # ids >= 1, popularity not id order
    counts = np.bincount(stream)
    # recall of the true top-k, k = the ids whose exact count reaches T (at most the hot rows): the
    # features a sketch with exact counts would have made hot
    k_true = int(min(k, (counts >= t).sum()))
    true_top = set(np.argsort(-counts, kind="stable")[:k_true].tolist())
    chunk = 16384  # the authors' sketch returns its answers in static arrays of 16,384 ints
    instances = [0]
    try:  # their batch query is an OpenMP loop: give it the thread count being measured
        set_omp_threads = ctypes.CDLL("libgomp.so.1").omp_set_num_threads
    except OSError:
        set_omp_threads = None

    def theirs(batches: list[np.ndarray]) -> Run:
        def run() -> None:
            if set_omp_threads is not None:
                set_omp_threads(torch.get_num_threads())
            idx = instances[0] % 26  # a fresh sketch per run: their library holds 26
            instances[0] += 1
            with quiet_stdout():  # their sketch prints progress lines
                lib.init(w, int(t), 0.98, idx)
                for b in batches:
                    for lo in range(0, len(b), chunk):
                        part = b[lo:lo + chunk]
                        p_ = part.ctypes.data_as(ptr)
                        lib.batch_insert(p_, len(part), idx)
                        lib.batch_query(p_, len(part), idx)
        return run

    def ours(batches: list[torch.Tensor], key_dtype: torch.dtype) -> Run:
        def run() -> None:
            sk = ours_sketch[0] = HotSketch(w, k, threshold=t, key_dtype=key_dtype)
            for b in batches:
                loc = sk.locate(b)
                sk.query(b, loc)
                sk.insert(b, located=loc)
        return run

    ours_sketch: list[Any] = [None]

    def their_hot(idx: int) -> set[int]:
        ids = np.nonzero(counts)[0].astype(np.int32)
        hot = np.empty(len(ids), dtype=np.int32)
        for lo in range(0, len(ids), chunk):
            part = np.ascontiguousarray(ids[lo:lo + chunk])
            res = lib.batch_query(part.ctypes.data_as(ptr), len(part), idx)
            hot[lo:lo + len(part)] = np.ctypeslib.as_array(res, shape=(len(part),))
        return set(ids[hot < 0].tolist())

    def measure() -> list[dict]:
        records = []
        for size, key in itertools.product([int(x) for x in args.sketch_batches.split(",")],
                                           args.sketch_key_dtypes.split(",")):
            nb = len(stream) // size
            np_batches = [np.ascontiguousarray(stream[i * size:(i + 1) * size]) for i in range(nb)]
            t_batches = [torch.from_numpy(b.astype(np.int64)) for b in np_batches]
            s = interleaved({"hotsketch": ours(t_batches, getattr(torch, key)), "cafe_cpp": theirs(np_batches)},
                            args.rounds)
            ours_hot = set(ours_sketch[0].hot_entries()[0].tolist())
            theirs_hot = their_hot((instances[0] - 1) % 26)
            records.append({"unit": "ids (query + insert)", "batch": size, "key_dtype": key, "buckets": w, "hot_rows": k,
                            "threshold": t, "top_k": k_true, "hot_hotsketch": len(ours_hot), "hot_cafe_cpp": len(theirs_hot),
                            "recall_hotsketch": round(len(ours_hot & true_top) / k_true, 4),
                            "recall_cafe_cpp": round(len(theirs_hot & true_top) / k_true, 4),
                            **summarise(s, nb * size, "hotsketch")})
        return records
    return measure


if __name__ == "__main__":
    main()
