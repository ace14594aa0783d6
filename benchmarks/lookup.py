"""Table lookup speed: forward + backward rows/s per method and compression ratio, on shared requests.

    PYTHONPATH=. .venv/bin/python benchmarks/lookup.py [--scale 0.05 --batch 4096 --batches 8 --repeats 3]

Every table sees the same requests (``common.zipf_requests``: Zipf ids over the 26 Kaggle fields scaled by
--scale, batch x 26 ids, one id per bag as DLRM looks them up). A step is forward, backward of a fixed
random output gradient, and the table's training hooks (``before_optimizer_step`` / ``after_optimizer_step``:
CAFE's sketch update, mpcache's cache write-back); no optimizer step. ``torch.nn.EmbeddingBag`` (sparse
gradients) is the reference; when ``fbgemm_gpu`` is importable, FBGEMM's CPU table-batched embedding
(one table per field, exact SGD fused into its backward, so its step includes the update) runs on the
same requests. Measurements are interleaved round-robin and the best of --repeats is kept, so load from
other processes hits every table alike. Prints one JSON line; speeds relative to EmbeddingBag included.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
from torch import nn

from common import add_threads_arg, apply_threads, emit, kaggle_field_sizes, log, zipf_requests
from embcompress.embeddings import BudgetError, full_table_bytes, make_table, methods

Step = Callable[[torch.Tensor], None]


def table_step(table: nn.Module, dim: int, hooks: bool, max_rows: int) -> Step:
    grad = torch.randn(1, dim).expand(max_rows, dim)  # a fixed output gradient, no allocation per step

    def step(ids: torch.Tensor) -> None:
        out = table(ids)  # (B*F, D)
        out.backward(grad[: out.shape[0]])
        if hooks:
            table.before_optimizer_step()
            table.after_optimizer_step()
        for p in table.parameters():
            p.grad = None

    return step


def fbgemm_step(field_sizes: list[int], dim: int, reference: nn.EmbeddingBag, check: torch.Tensor) -> Step | None:
    """FBGEMM's CPU TBE on the same requests, or None when fbgemm_gpu is not installed.

    Its weights are copied from ``reference`` and its output on ``check`` must equal the reference's, so
    both kernels are known to do the same lookups.
    """
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    except ImportError:
        return None
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in field_sizes],
        optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.01, pooling_mode=PoolingMode.SUM)
    starts = torch.tensor([0, *torch.tensor(field_sizes).cumsum(0)[:-1].tolist()])
    F = len(field_sizes)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        local = ids.view(-1, F) - starts  # (B, F) local ids
        B = local.shape[0]
        indices = local.t().reshape(-1)  # TBE wants table-major order: all of field 0's bags first
        offsets = torch.arange(F * B + 1, dtype=torch.int64)
        return tbe(indices, offsets)  # (B, F*D)

    with torch.no_grad():
        for w, start, n in zip(tbe.split_embedding_weights(), starts.tolist(), field_sizes):
            w.copy_(reference.weight[start:start + n])
        torch.testing.assert_close(forward(check).view(-1, dim), reference(check))

    def step(ids: torch.Tensor) -> None:
        out = forward(ids)
        out.backward(torch.ones_like(out))

    return step


def best_rows_per_s(step: Step, requests: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for ids in requests:
        step(ids)
    return sum(r.numel() for r in requests) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.05, help="Kaggle cardinalities times this")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin passes; the best is kept")
    ap.add_argument("--skew", type=float, default=1.1)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--methods", default=",".join(methods()))
    ap.add_argument("--compression", default="10,100,1000,10000")
    ap.add_argument("--no-hooks", action="store_true", help="time forward + backward only")
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args)

    sizes = kaggle_field_sizes(args.scale)
    requests = zipf_requests(sizes, args.batch, args.batches + 1, args.skew)
    warm, timed = requests[0], requests[1:]
    max_rows = requests[0].shape[0]
    steps: dict[str, Step] = {}
    info: dict[str, dict] = {}
    reference = nn.EmbeddingBag(sum(sizes), args.dim, mode="sum", sparse=True)
    steps["EmbeddingBag"] = table_step(reference, args.dim, hooks=False, max_rows=max_rows)
    info["EmbeddingBag"] = {"method": "torch.nn.EmbeddingBag", "ratio": 1.0}
    fb = fbgemm_step(sizes, args.dim, reference, warm)
    if fb is not None:
        steps["fbgemm_tbe"] = fb
        info["fbgemm_tbe"] = {"method": "fbgemm_gpu TBE (CPU, exact SGD fused)", "ratio": 1.0}
    skipped = {}
    for m in args.methods.split(","):
        for r in ([1.0] if m == "full" else [float(x) for x in args.compression.split(",")]):
            key = f"{m}@{r:g}x"
            try:
                t = make_table(m, sizes, args.dim, compression=r)
            except BudgetError as e:
                skipped[key] = str(e)
                continue
            t.train()
            steps[key] = table_step(t, args.dim, hooks=not args.no_hooks, max_rows=max_rows)
            info[key] = {"method": m, "ratio": r, "ratio_reached": round(full_table_bytes(sizes, args.dim)
                                                                          / t.memory_bytes(), 1)}
    for key, step in steps.items():  # warm-up: first-touch allocation, lazy state
        step(warm)
    best = dict.fromkeys(steps, 0.0)
    load = []
    for rep in range(args.repeats):
        load.append(round(os.getloadavg()[0], 2))
        for key, step in steps.items():
            best[key] = max(best[key], best_rows_per_s(step, timed))
        log(f"pass {rep + 1}/{args.repeats} done")
    ref = best["EmbeddingBag"]
    results = [{**info[k], "key": k, "rows_per_s": round(v), "relative_to_embeddingbag": round(v / ref, 3)}
               for k, v in best.items()]
    emit({"benchmark": "lookup", "settings": {**vars(args), "total_ids": sum(sizes)},
          "fbgemm": fb is not None, "load_per_pass": load, "results": results, "skipped": skipped})


if __name__ == "__main__":
    main()
