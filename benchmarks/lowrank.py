"""AFM benchmark: a trained run compressed with ``compress_model``; AUC and inference speed against the original.

Prints JSON lines (machine, commit, load average with each figure):
* ``auc``: test AUC of the original and the compressed model, parameters before/after, the ranks;
* ``table`` (with ``--table-ratios``): the ``lowrank`` table trained from scratch beside ``hash``;
* ``speed``: samples/s at each ``--batch-sizes`` of the original and of the compressed model, eager (the
  trained modules, and the serving form :func:`embcompress.compress.serving_model`) and exported
  (``torch.export``: the original through ``embcompress.export``, the serving form directly), all timed
  interleaved in this one process (median of ``--rounds`` rounds), at ``--threads`` torch threads.

The run is one of ``embcompress train --out RUN`` (``--run``); without it, the CLI's defaults are trained
first into a temporary directory (``--model`` dlrm or deepfm, 200k synthetic rows: about a minute)::

    embcompress train --model dlrm --out runs/dlrm --no-progress
    PYTHONPATH=. .venv/bin/python benchmarks/lowrank.py --run runs/dlrm --threads 1
    PYTHONPATH=. .venv/bin/python benchmarks/lowrank.py --model deepfm --threads 2
    PYTHONPATH=. .venv/bin/python benchmarks/lowrank.py --layer-rule   # one product against two, by rank
"""

from __future__ import annotations

import argparse
import dataclasses
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


def layer_rule(args: argparse.Namespace) -> None:
    """One Linear(in, out) against Linear(in, k) then Linear(k, out), interleaved, at the rule's cost fractions
    k·(in + out) / (in·out): where two products stop paying (``FACTORISED_MAX_COST``)."""
    from embcompress.compress.speed import inference_samples_per_s

    shapes = [(512, 256), (367, 512), (429, 400), (400, 400)]
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        for n_in, n_out in shapes:
            for frac in (0.02, 0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0):
                k = max(1, round(frac * n_in * n_out / (n_in + n_out)))
                one = torch.nn.Linear(n_in, n_out)
                two = torch.nn.Sequential(torch.nn.Linear(n_in, k), torch.nn.Linear(k, n_out))
                x = torch.randn(b, n_in)
                calls = max(1, 512 // b)
                batches = [(x, x)] * calls
                load = os.getloadavg()
                s_one, s_two = inference_samples_per_s([lambda d, _s: one(d), lambda d, _s: two(d)], batches,
                                                       rounds=args.rounds)
                emit({"benchmark": "lowrank", "figure": "layer_rule", "batch": b, "in": n_in, "out": n_out,
                      "rank": k, "cost_fraction": frac, "threads": args.threads, "speedup_two_vs_one": s_two / s_one,
                      "load_average": load})


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
    p.add_argument("--layer-rule", action="store_true",
                   help="only time one linear layer against its factorisation at several ranks")
    p.add_argument("--table-ratios", default="",
                   help="also train the `lowrank` table from scratch beside `hash` at these ratios (e.g. 10,100), "
                        "with the run's settings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.layer_rule:
        return layer_rule(args)

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

    rows, taken = [], 0
    for b in iterate_batches(test, 4096):
        if taken >= args.timing_rows:
            break
        rows.append((b.dense, b.sparse))
        taken += len(b.dense)
    example = (rows[0][0][:4], rows[0][1][:4])
    original_exported = None if args.no_export else exported(model, example, True)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    for b in sizes:
        served = serving_model(small, b)
        models = {"original": model.eval(), "compressed": small.eval(), "served": served}
        failed = {}
        if not args.no_export:
            for name, module in (("original_exported", original_exported),
                                 ("served_exported", exported(served, example, False))):
                if isinstance(module, str):
                    failed[name] = module
                else:
                    models[name] = module
        load = os.getloadavg()
        speed = speed_by_batch_size(models, rows, [b], rounds=args.rounds).get(b)
        if speed is None:
            continue
        emit({"benchmark": "lowrank", "figure": "speed", "model": cfg.model, "batch": b, "threads": args.threads,
              "samples_per_s": speed, "speedup_vs_original": {k: v / speed["original"] for k, v in speed.items()},
              **({"speedup_exported": speed["served_exported"] / speed["original_exported"]}
                 if "served_exported" in speed and "original_exported" in speed else {}),
              "served_floats": sum(t.numel() for t in served.buffers() if t.is_floating_point()),
              "export_failed": failed, "load_average_before": load, "load_average_after": os.getloadavg()})

    for r in [float(x) for x in args.table_ratios.split(",") if x]:
        for method in ("lowrank", "hash"):
            s = run_training(dataclasses.replace(cfg, method=method, compression=r, out=None, progress=False))
            emit({"benchmark": "lowrank", "figure": "table", "model": cfg.model,
                  **{k: s[k] for k in ("method", "compression_target", "compression_actual", "test_auc",
                                       "test_logloss", "train_samples_per_s")}})


if __name__ == "__main__":
    main()
