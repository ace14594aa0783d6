"""memory_bytes() against measured memory: tensor storage bytes and the RSS growth when building each table.

    PYTHONPATH=. .venv/bin/python benchmarks/memory.py [--scale 0.05 --compression 4,10,100,1000,10000]

For each method and ratio: ``memory_bytes()`` (what the compression ratio is computed from), the bytes of
every distinct tensor storage the table holds (parameters and buffers) right after construction and again
after one training step (forward, backward, the table's optimizer hooks) so lazily created state shows,
and the process's resident-set growth while building it (coarse: the allocator rounds, and small
tables vanish in the noise; for large tables it should track storage). The script re-executes itself
with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_), so every large block is its own mapping and
freeing the previous table really returns its memory: otherwise glibc raises the threshold after the first
large free and keeps later tables' memory in the heap, which makes RSS deltas meaningless.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
from torch import nn

from common import add_threads_arg, apply_threads, current_rss_bytes, emit, kaggle_field_sizes, log, zipf_requests
from embcompress.embeddings import BudgetError, full_table_bytes, make_table, methods


def storage_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind the module's parameters and buffers (views counted once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--methods", default=",".join(methods()))
    ap.add_argument("--compression", default="4,10,100,1000,10000", help="4x: where mpcache (INT8 + cache) is")
    ap.add_argument("--batch", type=int, default=4096)
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args)

    sizes = kaggle_field_sizes(args.scale)
    ids = zipf_requests(sizes, args.batch, 1)[0]
    full = full_table_bytes(sizes, args.dim)
    results, skipped = [], {}
    for m in args.methods.split(","):
        for r in ([1.0] if m == "full" else [float(x) for x in args.compression.split(",")]):
            gc.collect()
            rss0 = current_rss_bytes()
            try:
                table = make_table(m, sizes, args.dim, compression=r)
            except BudgetError as e:
                skipped[f"{m}@{r:g}x"] = str(e)
                continue
            rss1 = current_rss_bytes()
            claimed, built = table.memory_bytes(), storage_bytes(table)
            table.train()
            out = table(ids)
            out.backward(torch.ones_like(out))
            table.before_optimizer_step()
            table.after_optimizer_step()
            for p in table.parameters():
                p.grad = None
            stepped = storage_bytes(table)
            results.append({"method": m, "ratio": r, "ratio_reached": round(full / claimed, 1),
                            "memory_bytes": claimed, "storage_bytes": built, "storage_bytes_after_step": stepped,
                            "storage_over_claimed": round(stepped / claimed, 3), "rss_delta_bytes": rss1 - rss0})
            log(f"{m}@{r:g}x: memory_bytes {claimed:,} storage {built:,} -> {stepped:,} rss +{rss1 - rss0:,}")
            del table, out
    emit({"benchmark": "memory", "settings": {**vars(args), "total_ids": sum(sizes), "full_table_bytes": full},
          "results": results, "skipped": skipped, "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"]})


if __name__ == "__main__":
    main()
