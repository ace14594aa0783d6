"""``embcompress sweep``: train every (method, compression ratio, seed) cell and compare the methods.

    embcompress sweep --rows 200000 --scale 0.05 --methods full,hash,qr,cafe \\
        --compression 10,100,1000,10000 --seeds 3 --out bench-out/sweep

Writes under --out: ``cells/*.json`` (one per finished cell; a rerun skips them, so an interrupted sweep
resumes), ``results.csv``, ``results.md`` (mean ± std over seeds, and every method's test AUC against
``--baseline``, paired by seed) and two PNG plots. Cells a method cannot reach are skipped with the
reason. See :mod:`embcompress.sweep.runner` for the resume rules.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .runner import Cell, SweepConfig, machine_info, plan_cells, run_sweep

log = logging.getLogger(__name__)

__all__ = ["Cell", "SweepConfig", "add_parser", "plan_cells", "run", "run_sweep", "write_reports"]

DEFAULT_RATIOS = "10,100,1000,10000"


def write_reports(cfg: SweepConfig, records: list[dict[str, Any]]) -> None:
    """results.csv, results.md and the plots of ``records`` under ``cfg.out``."""
    from .plots import write_plots
    from .results import write_csv, write_markdown

    out = Path(cfg.out)
    write_csv(out / "results.csv", records)
    write_markdown(out / "results.md", records, cfg.settings(), machine_info(), cfg.baseline)
    write_plots(out, records)


def parse_method_options(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--option METHOD:KEY=VALUE`` (one method) or ``--option KEY=VALUE`` (every method but full)."""
    from ..cli import parse_options

    options: dict[str, dict[str, Any]] = {}
    for item in items or []:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            targets, kv = [head], rest
        else:
            targets, kv = [m for m in methods if m != "full"], item
        for m in targets:
            options.setdefault(m, {}).update(parse_options([kv]))
    return options


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    from ..cli import data_options, split_list
    from ..embeddings import methods as registered

    methods = split_list(args.methods) or registered()
    ratios = [float(r) for r in (split_list(args.compression) or [])]
    opts = data_options(args)
    opts.pop("seed", None)  # the data seed follows each cell's seed unless --data-seed fixes it
    train: dict[str, Any] = {"split": args.split, "model": args.model, "embedding_dim": args.dim,
                             "epochs": args.epochs, "batch_size": args.batch_size,
                             "eval_batch_size": args.eval_batch_size, "lr": args.lr,
                             "warmup_steps": args.warmup_steps, "warmup_max_share": args.warmup_max_share,
                             "optimizer": args.optimizer,
                             "shuffle": args.shuffle, "max_steps": args.max_steps, "device": args.device}
    first = args.first_seed
    return SweepConfig(out=args.out, methods=methods, ratios=ratios, seeds=list(range(first, first + args.seeds)),
                       data=args.data, data_options=opts, data_seed=args.data_seed, train=train,
                       method_options=parse_method_options(args.option, methods), keep_runs=args.keep_runs,
                       progress=not args.no_progress, baseline=None if args.baseline == "none" else args.baseline)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # --threads is applied by embcompress.cli.main for every command
    records = run_sweep(cfg, report=write_reports)
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed", "error")}
    print(f"sweep: {counts['done']} cells done, {counts['skipped']} skipped (unreachable), "
          f"{counts['failed']} failed (diverged), {counts['error']} errors; results in {cfg.out}/results.md")
    return 1 if counts["error"] else 0


def add_parser(subparsers: Any) -> None:
    from ..cli import add_data_args, add_training_args

    p = subparsers.add_parser("sweep", help="train every method x compression ratio x seed and compare",
                              description=__doc__.splitlines()[0])
    add_data_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--methods", help="comma-separated table types (default: every registered method)")
    g.add_argument("--compression", default=DEFAULT_RATIOS,
                   help=f"comma-separated target ratios (default {DEFAULT_RATIOS}); full always runs at 1x only")
    g.add_argument("--seeds", type=int, default=1, help="number of seeds per cell (default 1)")
    g.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    g.add_argument("--option", action="append", metavar="[METHOD:]KEY=VALUE",
                   help="table option for METHOD (or for every compressed method), repeatable")
    g.add_argument("--out", required=True, help="sweep directory; rerun with the same settings to resume")
    g.add_argument("--keep-runs", action="store_true", help="keep each cell's run directory under OUT/runs")
    g.add_argument("--baseline", default="hash",
                   help="results.md compares every method's test AUC with this method's, paired by seed "
                        "(default hash; 'none' leaves the comparison out)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_training_args(p.add_argument_group("training (shared by every cell)"))
    p.set_defaults(func=run)
