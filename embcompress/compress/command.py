"""``embcompress compress-lowrank``: AFM-compress a trained run; report the AUC and inference speed of the
original and the compressed model.

Reads a run directory written by the training loop, calibrates on training batches, evaluates both
models on the test split, times them (and the serving form) at a few batch sizes, and writes a new run
directory: ``config.json``, ``checkpoint.pt`` (the compressed state plus the plan that rebuilds its
structure, which :func:`embcompress.load_model` applies), ``compression.json`` (per-layer ranks) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .afm import MLP_VARIANCE, compress_model

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    from ..cli import positive_int
    p = subparsers.add_parser("compress-lowrank", help="AFM low-rank compression of a trained run (post-training)")
    p.add_argument("--run", required=True, help="run directory of a trained model (config.json, checkpoint.pt)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="whole-model parameter reduction, e.g. 3")
    target.add_argument("--variance", type=float, help="fraction of each layer's output variance to keep")
    p.add_argument("--out", required=True, help="directory for the compressed run")
    p.add_argument("--calibration-batches", type=positive_int, default=50,
                   help="training batches streamed through the model to collect each layer's output statistics")
    p.add_argument("--calibration-batch-size", type=positive_int, default=1024, help="rows per calibration batch")
    p.add_argument("--eval-batch-size", type=int, default=4096, help="batch size of the AUC evaluation")
    p.add_argument("--timing-batch-sizes", default="1,64,4096",
                   help="batch sizes the inference speed is measured at (comma-separated; '' skips timing)")
    p.add_argument("--timing-rows", type=int, default=8192, help="test rows the timing cuts its batches from")
    from ..cli import positive_int

    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: torch's choice; 1 times more steadily on a busy machine)")
    p.add_argument("--timing-batches", type=int, help=argparse.SUPPRESS)  # older spelling: rows = N x eval batch
    p.add_argument("--mlp-variance", type=float, default=MLP_VARIANCE,
                   help="with --ratio: a linear layer keeps at most the rank holding this fraction of its "
                        "output variance, and stays whole where that rank would not compute faster; 0: "
                        "linear layers compete for the budget like embedding fields")
    p.add_argument("--allocation", default="per-parameter", choices=["per-parameter", "variance"],
                   help="with --ratio: ranks keeping the most variance per parameter (default), or evening "
                        "out the variance fraction each layer/field discards")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="optional training steps on the compressed model afterwards (reported separately as "
                        "auc_after_finetune; auc_after stays the pure post-training result)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="learning rate of the fine-tune (default: a tenth of the run's; a fresh Adagrad state "
                        "takes full-size first steps, which would undo the compression's fit)")
    p.add_argument("--keep-embeddings", action="store_true", help="compress only the linear layers")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def _config(run_dir: Path) -> Any:
    from ..train.loop import TrainConfig

    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --run must be a run directory of `embcompress train --out`")
    raw = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in raw.items() if k in known})


def load_run_model(run_dir: str | Path) -> tuple[Any, nn.Module, Any, Any]:
    """(config, model with the run's weights, train view, test view) of a run directory.

    A run written by this command (its checkpoint has a ``compression`` entry) comes back compressed.
    """
    from ..data import load_dataset, split_dataset
    from ..serve import load_run

    run = load_run(run_dir)  # the model from the run directory alone; the data only for the splits
    cfg = run.config
    ds = load_dataset(cfg.data, **cfg.data_options)
    train, test = split_dataset(ds, cfg.split, cfg.test_fraction, seed=cfg.seed)
    return cfg, run.model, train, test


def _state_mismatch(model: nn.Module, state: dict[str, Any]) -> str:
    """'' when ``state`` has exactly ``model``'s tensors and shapes, else one line saying what differs."""
    mine = model.state_dict()
    if not isinstance(state, dict):
        return f"its model state is a {type(state).__name__}, not a state dict"

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [f"{k} {tuple(state[k].shape)} (the model's: {tuple(v.shape)})" for k, v in mine.items()
              if k in state and (not hasattr(state[k], "shape") or tuple(state[k].shape) != tuple(v.shape))]
    parts = [f"{label} {names(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape:", shapes)) if keys]
    return "; ".join(parts)


def finetune(model: nn.Module, cfg: Any, train: Any, steps: int, lr: float, batch_size: int | None = None) -> None:
    """``steps`` optimizer steps of the run's optimizer (fresh state) at ``lr`` on shuffled training batches."""
    from ..data import iterate_batches
    from ..train.loop import build_optimizers

    ft_cfg = dataclasses.replace(cfg, lr=lr)
    opts = build_optimizers(model, ft_cfg)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    done = 0
    while done < steps:  # as many passes as the steps need
        for batch in iterate_batches(train, batch_size or cfg.batch_size, shuffle=True, seed=cfg.seed + 1 + done):
            if done >= steps:
                break
            dense, sparse, labels = (t.to(cfg.device) for t in batch)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss_fn(model(dense, sparse), labels).backward()
            for o in opts:
                o.step()
            done += 1
    model.eval()


def run(args: argparse.Namespace) -> int:
    from ..data import iterate_batches
    from ..data.features import FEATURES_FILE, copy_run_features
    from ..train.checkpoint import save_checkpoint, write_json
    from ..train.loop import evaluate
    from .serving import serving_model
    from .speed import speed_by_batch_size

    cfg, model, train, test = load_run_model(args.run)
    model.to(cfg.device)
    before = evaluate(model, test, args.eval_batch_size, cfg.device)
    calibration = iterate_batches(train, args.calibration_batch_size, shuffle=True, seed=cfg.seed)
    new, report = compress_model(model, calibration, ratio=args.ratio, variance=args.variance,
                                 compress_embeddings=not args.keep_embeddings,
                                 max_batches=args.calibration_batches, allocation=args.allocation,
                                 mlp_variance=args.mlp_variance or None)
    after = evaluate(new, test, args.eval_batch_size, cfg.device)
    tuned = None
    if args.finetune_steps > 0:
        finetune(new, cfg, train, args.finetune_steps, args.finetune_lr or cfg.lr / 10)
        tuned = evaluate(new, test, args.eval_batch_size, cfg.device)
    if args.timing_batches is not None:
        args.timing_rows = args.timing_batches * args.eval_batch_size
    sizes = [int(x) for x in args.timing_batch_sizes.split(",") if x.strip()]
    rows, taken = [], 0
    for b in iterate_batches(test, 4096):
        if taken >= args.timing_rows:
            break
        rows.append((b.dense[:args.timing_rows - taken].to(cfg.device), b.sparse[:args.timing_rows - taken].to(cfg.device)))
        taken += len(rows[-1][0])
    speed, served_size = {}, {}
    for b in sizes:
        served = serving_model(new, b)  # small batches get merged layers: see serving_model
        speed.update(speed_by_batch_size({"original": model, "compressed": new, "served": served}, rows, [b]))
        served_size[b] = sum(t.numel() for t in served.buffers() if t.is_floating_point())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    save_checkpoint(out / "checkpoint.pt", {
        "model": new.state_dict(),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "compression": {"plan": report.plan(), "source_run": str(Path(args.run).resolve())},
    })
    write_json(out / "compression.json", report.to_dict())
    if (Path(args.run) / FEATURES_FILE).is_file():  # the compressed run scores raw rows without its source
        copy_run_features(args.run, out)
    summary = {
        "source_run": str(args.run),
        "model": cfg.model,
        "method": cfg.method,
        "ratio_target": args.ratio,
        "variance_target": args.variance,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_ratio": report.ratio,
        "auc_before": before["auc"],
        "auc_after": after["auc"],
        "logloss_before": before["logloss"],
        "logloss_after": after["logloss"],
        "finetune_steps": args.finetune_steps,
        "auc_after_finetune": tuned["auc"] if tuned else None,
        # samples/s at each batch size: the original, the compressed model as trained modules, and its
        # serving form (embcompress.compress.serving_model), measured interleaved
        "infer_samples_per_s": speed,
        "infer_speedup": {b: v["served"] / v["original"] for b, v in speed.items()},
        "served_floats": served_size,  # floats the serving form at each batch size holds
        "eval_batch_size": args.eval_batch_size,
        "calibration_samples": report.calibration_samples,
        "allocation": args.allocation,
        "mlp_variance": args.mlp_variance or None,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, default=lambda x: float(x) if isinstance(x, np.floating) else str(x)))
    else:
        print(f"params {report.params_before:,} -> {report.params_after:,} ({report.ratio:.2f}x)  "
              f"AUC {before['auc']:.4f} -> {after['auc']:.4f}"
              + (f" ({tuned['auc']:.4f} after {args.finetune_steps} fine-tune steps)" if tuned else ""))
        for b, v in speed.items():
            print(f"batch {b:>5}: original {v['original']:,.0f}  served {v['served']:,.0f} samples/s "
                  f"({v['served'] / v['original']:.2f}x; the compressed modules as trained "
                  f"{v['compressed'] / v['original']:.2f}x), {torch.get_num_threads()} torch thread(s)")
    return 0
