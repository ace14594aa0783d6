"""DLRM training samples/s with the loop's optimizers against one Adagrad over all parameters, in one run.

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/optimizer_speed.py [--ratio 10000 --methods hash,cafe]

The loop (``build_optimizers``) gives the sparse table weights one Adagrad and the dense MLP parameters
another, fused on the CPU. Before, one Adagrad held them all, and a single sparse gradient sends every
parameter of an optimizer down PyTorch's per-tensor loop, whose ``sqrt`` slows down on accumulators with
many exact zeros (weights of dead ReLU units never get a gradient): its cost then depends on the model's
state rather than its size. Each method trains one model per optimizer layout (same seed, same data), their
steps interleaved in blocks as in ``cafe_speed.py``; a first round of blocks is warm-up. Prints ms per step
per (method, layout), the speedup of the loop's layout and each layout's ratios to ``hash``, and the share
of exact zeros in each model's dense Adagrad state at the end.
"""

from __future__ import annotations

import argparse

import torch

from common import (add_dlrm_step_args, apply_threads, dlrm_steppers, emit,  # type: ignore[import-not-found]
                    interleaved_seconds, log)
from embcompress.data import make_synthetic
from embcompress.embeddings import attach
from embcompress.train.loop import build_optimizers


def one_adagrad(model, cfg) -> list[torch.optim.Optimizer]:  # type: ignore[no-untyped-def]
    """The layout before the split: every parameter in one (per-tensor) Adagrad."""
    opt = torch.optim.Adagrad(list(model.parameters()), lr=cfg.lr)
    attach(model, opt)
    return [opt]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dlrm_step_args(ap, ratio=10000.0)
    ap.add_argument("--methods", default="hash,cafe")
    args = ap.parse_args()
    apply_threads(args)
    torch.sparse.check_sparse_tensor_invariants.disable()  # as the loop does
    ds = make_synthetic(rows=args.rows, scale=args.scale)
    methods = args.methods.split(",")
    captured: dict[str, list[torch.optim.Optimizer]] = {}

    def keep(layout: str, build):  # type: ignore[no-untyped-def]
        def wrapped(model, cfg):  # type: ignore[no-untyped-def]
            opts = build(model, cfg)
            captured[f"{cfg.method}/{layout}"] = opts
            return opts
        return wrapped

    steps = {}
    for layout, build in (("one", one_adagrad), ("split", build_optimizers)):
        for method, step in dlrm_steppers(ds, methods, args.ratio, args.batch_size,
                                          optimizers=keep(layout, build)).items():
            steps[f"{method}/{layout}"] = step
    seconds = interleaved_seconds(steps, args.blocks, args.block_steps)
    n = args.blocks * args.block_steps
    ms = {k: round(v / n * 1e3, 3) for k, v in seconds.items()}
    speedup = {m: round(ms[f"{m}/one"] / ms[f"{m}/split"], 3) for m in methods}
    rel = {layout: {m: round(ms[f"hash/{layout}"] / ms[f"{m}/{layout}"], 3) for m in methods}
           for layout in ("one", "split")} if "hash" in methods else {}
    zeros = {}
    for key, opts in captured.items():
        dense = [o.state[p]["sum"] for o in opts for p in o.param_groups[0]["params"]
                 if p.grad is None or not p.grad.is_sparse]
        total = sum(t.numel() for t in dense)
        zeros[key] = round(sum(int((t == 0).sum()) for t in dense) / max(total, 1), 3)
    log(f"ms per step: {ms}\nspeedup of the split: {speedup}\nrelative to hash: {rel}\n"
        f"exact zeros in the dense Adagrad state: {zeros}")
    emit({"benchmark": "optimizer_speed", "settings": vars(args), "ms_per_step": ms,
          "speedup_of_split": speedup, "relative_to_hash": rel, "dense_state_zero_share": zeros})


if __name__ == "__main__":
    main()
