"""tt (TT-Rec) on synthetic Criteo-like data: lookup speed with and without the cache, DLRM speed and AUC.

    PYTHONPATH=. .venv/bin/python benchmarks/tt.py [--rows 300000 --scale 0.01 --dim 16 --threads 1]

Prints one JSON object (machine, git commit, settings, results). Everything runs in one process on one
dataset; ratios come from contenders measured in the same process (``--threads 1`` for CPU figures).

- ``lookup``: forward + backward + SGD step + hooks of the table alone on the training batches' ids (B x F
  lookups per step), ``full``, tt@100x and tt@100x without cache taking turns step by step in one process,
  each step timed in thread CPU time; ``vs_full`` is the ratio of rows/s. ``--warm-steps`` untimed steps
  first (the cache fills from the same stream).
- ``pieces``: thread CPU time of the compiled passes of one ``tt`` lookup (``tt_native.cpp``) and of the
  tables' forward, one batch of ``--batch-size`` samples repeated alone after the warm-up steps (warm caches).
- ``train``: DLRM via ``embcompress.train.loop.run_training``: full; tt@100x; tt@100x without cache;
  tt@100x with one shared TT (``layout=shared``); tt@1000x; hash@1000x. Test AUC, samples/s, bytes.
  ``--extra '{"label": ["tt", 100, {"core_scale": 0.3}]}' --configs full,label`` adds ablations.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import torch

import embcompress as ec
from embcompress.data import make_synthetic
from embcompress.embeddings.ops import field_starts
from embcompress.train import loop
from common import commit, machine  # type: ignore[import-not-found]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_lookup(tables: dict[str, ec.CompressedEmbeddingBag], batches: list[torch.Tensor], warm: int,
                       device: str) -> dict[str, Any]:
    """Rows/s of forward + backward + SGD step + table hooks per table, the tables taking turns step by step.

    Every table trains on the same batches; each step is timed in thread CPU time (on CUDA: wall time), so
    the ratios compare the tables under the same load. The first ``warm`` steps are not timed.
    ``us_per_step`` splits a step into forward, backward and the optimizer step with the table's hooks.
    """
    opts = {}
    for label, table in tables.items():
        table.to(device).train()
        opts[label] = torch.optim.SGD(table.parameters(), lr=0.05)
        ec.attach(table, opts[label])
    clock = time.perf_counter if device == "cuda" else time.thread_time
    spent = dict.fromkeys(tables, 0.0)
    phases = {label: [0.0, 0.0, 0.0] for label in tables}
    rows, timed = 0, 0
    for i, ids in enumerate(batches):
        for label, table in tables.items():
            start = clock()
            opts[label].zero_grad(set_to_none=True)
            loss = table(ids).pow(2).sum()
            sync(device)
            forward = clock()
            loss.backward()
            sync(device)
            backward = clock()
            opts[label].step()
            sync(device)
            end = clock()
            if i >= warm:
                spent[label] += end - start
                for k, t in enumerate((forward - start, backward - forward, end - backward)):
                    phases[label][k] += t
        rows += ids.numel() if i >= warm else 0
        timed += i >= warm
    out: dict[str, Any] = {}
    for label, table in tables.items():
        out[label] = {"rows_per_s": rows / spent[label], "cpu_seconds": spent[label], "bytes": table.memory_bytes(),
                      "compression": table.compression_ratio(),
                      "us_per_step": dict(zip(("forward", "backward", "step"),
                                              (round(t / max(timed, 1) * 1e6, 1) for t in phases[label])))}
        if getattr(table, "cache_keys", None) is not None and table.cache_keys.numel():
            hit, _ = table._cache_find(torch.cat(batches[warm:]).reshape(-1))
            out[label].update(cache_rows=table.cache_keys.numel(), cache_hit_rate=hit.float().mean().item())
    return out


def timed(fn: Any, reps: int = 1000) -> float:
    """Microseconds of thread CPU time per call of ``fn`` (after 20 untimed calls)."""
    for _ in range(20):
        fn()
    start = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - start) / reps * 1e6


def pieces(tables: dict[str, ec.CompressedEmbeddingBag], batches: list[torch.Tensor], warm: int) -> dict[str, Any]:
    """Microseconds per call of the compiled passes of one ``tt`` lookup and of each table's forward (no
    gradient, and forward + backward), on one batch repeated after ``warm`` training steps."""
    import ctypes

    from embcompress.embeddings.tt_cores import chain_backward, chain_forward, native_library

    interleaved_lookup(tables, batches[:-1], warm, "cpu")  # the cache fills (one timed step, unused)
    ids, tt = batches[-1], tables["tt100"]
    lib = native_library()
    if lib is None:
        return {"error": "no compiled kernels (no C++ compiler, or EMBCOMPRESS_NATIVE=0)"}
    flat = ids.reshape(-1).contiguous()
    n, t_cores = flat.numel(), len(tt.q_shape)
    buf = torch.empty((6 + t_cores) * n, dtype=torch.int64)
    p, sizes = buf.data_ptr(), (ctypes.c_int64 * 4)()
    u = lib.tt_dedup(n, flat.data_ptr(), tt.num_embeddings, p, p + 8 * n, p + 16 * n)

    def route() -> None:
        lib.tt_route(u, p, n, p + 8 * n, len(tt.field_sizes), tt.starts.data_ptr(), tt.field_group.data_ptr(),
                     tt.field_base.data_ptr(), t_cores, tt.radix.data_ptr(), tt.core_base.data_ptr(),
                     tt.cache_keys.numel(), tt.cache_keys.data_ptr(), tt.cache_slots.data_ptr(), None, None,
                     p + 24 * n, p + 32 * n, p + 48 * n, p + 40 * n, sizes)

    route()
    n_raw, n_cache, n_tt, _ = sizes
    core_rows, cores = buf[6 * n: 6 * n + t_cores * n_tt].view(n_tt, t_cores), list(tt.cores)
    rows, state = chain_forward(lib, core_rows, cores)
    grad, out = torch.randn_like(rows), torch.empty(n, tt.embedding_dim)
    res: dict[str, Any] = {"ids": n, "distinct": u, "raw": n_raw, "cache": n_cache, "tt": n_tt, "us": {
        "tt_dedup": timed(lambda: lib.tt_dedup(n, flat.data_ptr(), tt.num_embeddings, p, p + 8 * n, p + 16 * n)),
        "tt_route": timed(route),
        "chain_forward": timed(lambda: chain_forward(lib, core_rows, cores)),
        "chain_backward": timed(lambda: chain_backward(lib, core_rows, cores, state, grad)),
        "tt_assemble": timed(lambda: lib.tt_assemble(n, tt.embedding_dim, 4, p + 24 * n, n_raw, n_cache, p + 32 * n,
                                                     tt.raw_weight.data_ptr(), tt.cache_weight.data_ptr(),
                                                     rows.data_ptr(), out.data_ptr()))}}
    for label, table in tables.items():
        table.eval()  # nothing recorded: the cache stays as it is
        with torch.no_grad():
            res["us"][f"{label} forward"] = timed(lambda: table(ids))
        res["us"][f"{label} forward+backward"] = timed(lambda: (table.zero_grad(set_to_none=True),
                                                                table(ids).sum().backward()))
    return res


def tt_info(table: Any) -> dict[str, Any]:
    return {"ranks": table.ranks, "q_shape": table.q_shape, "tt_groups": len(table.groups),
            "raw_rows": table.raw_weight.shape[0], "cache_rows": table.cache_keys.numel(),
            "cache_stats": dict(zip(["refreshes", "admissions", "evictions"], table.stats.tolist()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--scale", type=float, default=0.01, help="synthetic cardinality scale (0.01: ~338k ids)")
    ap.add_argument("--skew", type=float, default=1.1)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default: the training loop's")
    ap.add_argument("--optimizer", default=None, help="default: the training loop's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--lookup-steps", type=int, default=300, help="timed steps per batch size")
    ap.add_argument("--lookup-batch", default="128,512,2048", help="samples per lookup step (x fields ids)")
    ap.add_argument("--warm-steps", type=int, default=200, help="untimed steps first (the cache fills)")
    ap.add_argument("--parts", default="lookup,train", help="comma list of: lookup, pieces, train")
    ap.add_argument("--configs", default="full,tt100,tt100-nocache,tt100-shared,tt1000,hash1000")
    ap.add_argument("--extra", default="{}",
                    help='JSON {label: [method, ratio, options]}: more train configs, e.g. for ablations')
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))

    t0 = time.perf_counter()
    ds = make_synthetic(rows=args.rows, scale=args.scale, skew=args.skew, seed=args.seed)
    gen_s = time.perf_counter() - t0
    sizes = list(ds.field_sizes)
    results: dict[str, Any] = {}

    if "lookup" in parts:
        starts = field_starts(sizes)
        look: dict[str, Any] = {}
        for b in [int(x) for x in args.lookup_batch.split(",")]:
            n = min(args.lookup_steps + args.warm_steps, ds.num_rows // b)
            glob = (torch.as_tensor(ds.sparse[: n * b]).long() + starts).to(args.device)  # DLRM's global ids
            batches = [glob[i * b:(i + 1) * b].reshape(-1, 1) for i in range(n)]
            tables = {}
            for label, method, kw in (("full", "full", {"compression": 1}),
                                      ("tt100-nocache", "tt", {"compression": 100, "cache_fraction": 0.0}),
                                      ("tt100", "tt", {"compression": 100})):
                torch.manual_seed(args.seed)
                tables[label] = ec.make_table(method, sizes, args.dim, **kw)
            res = interleaved_lookup(tables, batches, min(args.warm_steps, n // 2), args.device)
            for label in ("tt100", "tt100-nocache"):
                res[label]["vs_full"] = res[label]["rows_per_s"] / res["full"]["rows_per_s"]
            look[f"batch{b}"] = res
        results["lookup"] = look

    if "pieces" in parts:
        starts = field_starts(sizes)
        b, n = args.batch_size, args.warm_steps + 2
        glob = torch.as_tensor(ds.sparse[: n * b]).long() + starts
        tables = {}
        for label, kw in (("full", {"compression": 1}), ("tt100", {"compression": 100})):
            torch.manual_seed(args.seed)
            tables[label] = ec.make_table("full" if label == "full" else "tt", sizes, args.dim, **kw)
        results["pieces"] = pieces(tables, [glob[i * b:(i + 1) * b].reshape(-1, 1) for i in range(n)],
                                   args.warm_steps)

    if "train" in parts:
        base = dict(data="synthetic", embedding_dim=args.dim, batch_size=args.batch_size, seed=args.seed,
                    device=args.device, progress=False)
        base.update({k: v for k, v in (("lr", args.lr), ("optimizer", args.optimizer)) if v is not None})
        defaults = loop.TrainConfig()
        args.lr, args.optimizer = base.get("lr", defaults.lr), base.get("optimizer", defaults.optimizer)
        configs = {
            "full": ("full", None, {}),
            "tt100": ("tt", 100, {}),
            "tt100-nocache": ("tt", 100, {"cache_fraction": 0.0}),
            "tt100-shared": ("tt", 100, {"layout": "shared"}),
            "tt1000": ("tt", 1000, {}),
            "hash1000": ("hash", 1000, {}),
            "hash100": ("hash", 100, {}),
            "tt100-bigcache": ("tt", 100, {"cache_fraction": 0.01, "cache_max_share": 0.5}),
        }
        configs.update({k: tuple(v) for k, v in json.loads(args.extra).items()})
        train: dict[str, Any] = {}
        for label in args.configs.split(","):
            method, ratio, opts = configs[label]
            summary, model = loop.train_model(loop.TrainConfig(method=method, compression=ratio, method_options=opts, **base), ds)
            entry = {k: summary[k] for k in ("compression_actual", "embedding_bytes", "test_auc", "test_logloss",
                                              "train_samples_per_s", "eval_samples_per_s", "train_seconds", "steps")}
            if method == "tt":
                entry.update(tt_info(loop.embedding_tables(model)[0]))
            train[label] = entry
            train.setdefault("bayes_auc", summary.get("bayes_auc"))
        full = train.get("full")
        for label, entry in train.items():
            if isinstance(entry, dict) and full and label != "full":
                entry["auc_minus_full"] = entry["test_auc"] - full["test_auc"]
                entry["auc_relative_loss_pct"] = 100 * (full["test_auc"] - entry["test_auc"]) / full["test_auc"]
                entry["speed_vs_full"] = entry["train_samples_per_s"] / full["train_samples_per_s"]
        if "tt1000" in train and "hash1000" in train:
            train["tt1000_minus_hash1000_auc"] = train["tt1000"]["test_auc"] - train["hash1000"]["test_auc"]
        if "tt100" in train and "tt100-nocache" in train:
            train["cache_auc_effect"] = train["tt100"]["test_auc"] - train["tt100-nocache"]["test_auc"]
        results["train"] = train

    print(json.dumps({
        "benchmark": "tt", "machine": machine(), **commit(),
        "settings": {**vars(args), "num_ids": sum(sizes), "fields": len(sizes), "data_seconds": gen_s},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
