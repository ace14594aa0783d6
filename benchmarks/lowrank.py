"""AFM benchmark: a trained run compressed with ``compress_model``; AUC and inference speed against the original.

Prints JSON lines (machine, commit, load average with each figure):
* ``auc``: test AUC of the original and the compressed model, parameters before/after, the ranks;
* ``speed``: samples/s at each ``--batch-sizes`` of the original and of the compressed model, eager (the
  trained modules, and the serving form :func:`embcompress.compress.serving_model`) and exported
  (``torch.export``: the original through ``embcompress.export``, the serving form directly), all timed
  interleaved in this one process (median of ``--rounds`` rounds), at ``--threads`` torch threads.

The run is one of ``embcompress train --out RUN`` (``--run``); without it, the CLI's defaults are trained
first into a temporary directory (``--model`` dlrm or deepfm, 200k synthetic rows: about a minute)::

    embcompress train --model dlrm --out runs/dlrm --no-progress
    PYTHONPATH=. .venv/bin/python benchmarks/lowrank.py --run runs/dlrm --threads 1
    PYTHONPATH=. .venv/bin/python benchmarks/lowrank.py --model deepfm --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embcompress.compress import compress_model, count_parameters  # noqa: E402
from embcompress.compress.afm import MLP_VARIANCE  # noqa: E402
from embcompress.compress.command import load_run_model  # noqa: E402
from embcompress.compress.serving import serving_model  # noqa: E402
from embcompress.compress.speed import speed_by_batch_size  # noqa: E402
from embcompress.data import iterate_batches  # noqa: E402
from embcompress.train.loop import TrainConfig, evaluate, run_training  # noqa: E402
from common import emit, log  # type: ignore[import-not-found]  # noqa: E402


def exported(model: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor], via_project: bool):
    """The module of a ``torch.export`` program with a dynamic batch, or the reason it failed."""
    try:
        if via_project:
            from embcompress.export import export_model
            program = export_model(model)
        else:
            batch = torch.export.Dim("batch", min=1)
            with torch.no_grad():
                program = torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))
        return program.module()
    except Exception as e:  # reported, not fatal: the eager figures still stand
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory of `embcompress train --out` (default: train the CLI's defaults)")
    p.add_argument("--model", default="dlrm", choices=["dlrm", "deepfm", "dcn"], help="without --run")
    p.add_argument("--ratio", type=float, default=3.0, help="AFM whole-model size reduction")
    p.add_argument("--mlp-variance", type=float, default=MLP_VARIANCE, help="0: the linear layers compete freely")
    p.add_argument("--calibration-batches", type=int, default=50, help="of 1024 rows (as compress-lowrank)")
    p.add_argument("--batch-sizes", default="1,64,4096")
    p.add_argument("--timing-rows", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-export", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    run = args.run
    if run is None:
        run = tempfile.mkdtemp(prefix="lowrank_bench_")
        log(f"training the CLI's defaults ({args.model}) into {run}")
        run_training(TrainConfig(model=args.model, out=run, progress=False))
    cfg, model, train, test = load_run_model(run)
    calibration = iterate_batches(train, 1024, shuffle=True, seed=cfg.seed)
    small, report = compress_model(model, calibration, ratio=args.ratio, max_batches=args.calibration_batches,
                                   mlp_variance=args.mlp_variance or None)
    before, after = evaluate(model, test, 4096)["auc"], evaluate(small, test, 4096)["auc"]
    emit({"benchmark": "lowrank", "figure": "auc", "run": str(run), "model": cfg.model, "data": cfg.data,
          "data_options": cfg.data_options, "ratio_target": args.ratio, "mlp_variance": args.mlp_variance,
          "params_before": count_parameters(model), "params_after": count_parameters(small),
          "params_ratio": report.ratio, "auc_before": before, "auc_after": after,
          "auc_change_relative": (after - before) / before,
          "ranks": {l.name: l.rank for l in report.layers if l.factorized}})

    served = serving_model(small)
    rows, taken = [], 0
    for b in iterate_batches(test, 4096):
        if taken >= args.timing_rows:
            break
        rows.append((b.dense, b.sparse))
        taken += len(b.dense)
    models = {"original": model.eval(), "compressed": small.eval(), "served": served}
    failed = {}
    if not args.no_export:
        example = (rows[0][0][:4], rows[0][1][:4])
        for name, m, project in (("original_exported", model, True), ("served_exported", served, False)):
            module = exported(m, example, project)
            if isinstance(module, str):
                failed[name] = module
            else:
                models[name] = module
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    for b in sizes:
        load = os.getloadavg()
        speed = speed_by_batch_size(models, rows, [b], rounds=args.rounds).get(b)
        if speed is None:
            continue
        emit({"benchmark": "lowrank", "figure": "speed", "model": cfg.model, "batch": b, "threads": args.threads,
              "samples_per_s": speed, "speedup_vs_original": {k: v / speed["original"] for k, v in speed.items()},
              **({"speedup_exported": speed["served_exported"] / speed["original_exported"]}
                 if "served_exported" in speed and "original_exported" in speed else {}),
              "export_failed": failed, "load_average_before": load, "load_average_after": os.getloadavg()})


if __name__ == "__main__":
    main()
