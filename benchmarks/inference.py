"""Serving throughput of exported artifacts (``embcompress export``) against the eager model and ``full``.

For each method: a DLRM built as ``train`` builds it, trained ``--train-steps`` steps on synthetic
Criteo-shaped data (so hot rows, caches and sketches hold something), exported with
:func:`embcompress.export.save` and loaded back with ``torch.export.load``. Then, per batch size, every
method's artifact and eager model (eval mode) score the same batches under ``torch.inference_mode()``,
all contenders taking turns block by block in one process (``common.interleaved_seconds``), so machine
load hits them alike. One JSON line per method and batch size:

* ``exported_per_s`` / ``eager_per_s``: samples per second;
* ``exported_vs_eager``: the artifact's speed over the eager model's (> 1: the artifact is faster);
* ``exported_vs_full`` / ``eager_vs_full``: speed over ``full``'s artifact / eager model at that batch.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/inference.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads_arg, apply_threads, emit, interleaved_seconds, log  # noqa: E402

import embcompress  # noqa: E402
from embcompress import export  # noqa: E402
from embcompress.data import make_synthetic  # noqa: E402
from embcompress.train.loop import TrainConfig, build_model, build_optimizers  # noqa: E402


def trained_model(method: str, ds, ratio: float, steps: int, batch: int) -> torch.nn.Module:
    """A DLRM of ``method`` as ``train`` builds it, after ``steps`` training steps, in eval mode."""
    cfg = TrainConfig(method=method, compression=1.0 if method == "full" else ratio, batch_size=batch)
    torch.manual_seed(0)
    model = build_model(cfg, ds)
    opts = build_optimizers(model, cfg)
    dense, sparse = torch.from_numpy(ds.dense), torch.from_numpy(ds.sparse.astype("int64"))
    labels = torch.from_numpy(ds.labels).float()
    model.train()
    for step in range(steps):
        lo = step * batch % (len(labels) - batch)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(dense[lo:lo + batch], sparse[lo:lo + batch]),
                                           labels[lo:lo + batch]).backward()
        for opt in opts:
            opt.step()
    return model.eval()


def profile_batch1(module: torch.nn.Module, dense: torch.Tensor, sparse: torch.Tensor, calls: int) -> dict:
    """cProfile of ``calls`` batch-1 forwards of an artifact's module: aten calls per forward, seconds per
    call, and the share of the time in torch.export's input check (``_check_input_constraints_pre_hook``)."""
    import cProfile
    import pstats

    nodes = sum(1 for n in module.graph.nodes if n.op == "call_function")
    prof = cProfile.Profile()
    with torch.inference_mode():
        module(dense[:1], sparse[:1])
        prof.enable()
        for i in range(calls):
            module(dense[i:i + 1], sparse[i:i + 1])
        prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values())
    check = sum(v[3] for k, v in stats.items() if k[2] == "_check_input_constraints_pre_hook")
    return {"aten_calls_per_forward": nodes, "seconds_per_call_profiled": total / calls,
            "input_check_share": check / total if total else None, "calls": calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", help="comma-separated (default: every registered method)")
    ap.add_argument("--ratio", type=float, default=100.0, help="compression ratio of every method but full")
    ap.add_argument("--method-ratio", action="append", default=["mpcache=5"], metavar="METHOD=RATIO",
                    help="another ratio for one method (default: mpcache=5, as its quantised rows reach ~5x at most)")
    ap.add_argument("--rows", type=int, default=100_000, help="synthetic rows (training and scored batches)")
    ap.add_argument("--scale", type=float, default=0.01, help="Criteo Kaggle cardinalities times this")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--train-batch", type=int, default=512)
    ap.add_argument("--batches", default="1:500,4096:2",
                    help="comma-separated serving batch sizes, each with the calls of one block (BATCH:CALLS)")
    ap.add_argument("--blocks", type=int, default=8, help="timed rounds; each contender runs one block per round")
    ap.add_argument("--profile", type=int, default=0, metavar="CALLS",
                    help="also profile CALLS batch-1 calls of each artifact: aten calls per forward and the share "
                         "of the time spent checking the inputs against the exported specs")
    add_threads_arg(ap, default=1)
    args = ap.parse_args()
    apply_threads(args)
    methods = args.methods.split(",") if args.methods else embcompress.methods()
    ratios = {m: float(r) for m, r in (item.split("=") for item in args.method_ratio)}
    if "full" not in methods:
        methods = ["full", *methods]
    ds = make_synthetic(rows=args.rows, scale=args.scale, seed=0)
    dense, sparse = torch.from_numpy(ds.dense), torch.from_numpy(ds.sparse.astype("int64"))
    eager: dict[str, torch.nn.Module] = {}
    served: dict[str, Callable] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            log(f"{method}: training {args.train_steps} steps, exporting")
            try:
                model = trained_model(method, ds, ratios.get(method, args.ratio), args.train_steps, args.train_batch)
                path = Path(tmp) / f"{method}.pt2"
                export.save(model, path)
            except (ValueError, ImportError) as e:  # a method that cannot be built or exported here
                log(f"{method}: skipped ({e})")
                emit({"benchmark": "inference", "method": method, "skipped": str(e)})
                continue
            eager[method] = model
            served[method] = torch.export.load(path).module()
        if args.profile:
            for m, fn in served.items():
                emit({"benchmark": "inference-profile", "method": m, **profile_batch1(fn, dense, sparse, args.profile)})
        for spec in args.batches.split(","):
            batch, steps_per_block = (int(x) for x in (spec.split(":") + ["1"])[:2])
            position = dict.fromkeys([*eager, *(f"{m}@export" for m in served)], 0)

            def runner(key: str, fn: Callable) -> Callable[[], None]:
                def step() -> None:
                    lo = position[key] * batch % (len(dense) - batch)
                    position[key] += 1
                    fn(dense[lo:lo + batch], sparse[lo:lo + batch])
                return step

            steppers = {m: runner(m, eager[m]) for m in eager}
            steppers.update({f"{m}@export": runner(f"{m}@export", served[m]) for m in served})
            log(f"batch {batch}: {len(steppers)} contenders, {args.blocks} rounds of {steps_per_block} calls")
            with torch.inference_mode():
                seconds = interleaved_seconds(steppers, args.blocks, steps_per_block)
            samples = args.blocks * steps_per_block * batch
            rate = {k: samples / s for k, s in seconds.items()}
            for m in eager:
                ratio = 1.0 if m == "full" else ratios.get(m, args.ratio)
                emit({"benchmark": "inference", "method": m, "batch": batch, "ratio": ratio,
                      "exported_per_s": rate[f"{m}@export"], "eager_per_s": rate[m],
                      "exported_vs_eager": rate[f"{m}@export"] / rate[m],
                      "exported_vs_full": rate[f"{m}@export"] / rate["full@export"],
                      "eager_vs_full": rate[m] / rate["full"],
                      "blocks": args.blocks, "calls_per_block": steps_per_block, "rows": args.rows,
                      "scale": args.scale, "fields": len(ds.field_sizes), "ids": int(sum(ds.field_sizes)),
                      "pid": os.getpid()})


if __name__ == "__main__":
    main()
