"""Subcommands that use trained runs: ``predict``, ``evaluate``, ``compare``, ``inspect``."""

from __future__ import annotations

import argparse
from typing import Any

from ..train.checkpoint import json_dumps


def add_parser(subparsers: Any) -> None:
    from ..cli import device_arg, positive_int  # the same checked values as train's options

    for name, help_text, func in (
        ("predict", "score raw rows with a trained run: one probability per row (and AUC/logloss with labels)",
         cmd_predict),
        ("evaluate", "AUC and logloss of a trained run on labelled raw rows", cmd_evaluate),
    ):
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--run", required=True, help="run directory of `embcompress train --out`")
        p.add_argument("--data", required=True,
                       help="raw rows in the run's training format: PATH, criteo:PATH or csv:PATH (plain, gzip or "
                            "zstd); Criteo rows may lack the label, CSV needs the training columns")
        if name == "predict":
            p.add_argument("--out", required=True, help="output file: .csv or .parquet (one 'probability' column)")
        p.add_argument("--batch-size", type=positive_int, default=4096, help="rows per forward call (default 4096)")
        p.add_argument("--device", type=device_arg, default="cpu", metavar="{cpu,cuda,cuda:N}",
                       help="where the model runs")
        p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=func)

    p = subparsers.add_parser("compare", help="one table of several runs (run or sweep directories)",
                              description="One table of method, ratio, bytes, AUC, logloss and speeds of run "
                                          "directories and sweep directories.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or sweep directories")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON list of rows")
    fmt.add_argument("--markdown", action="store_true", help="a markdown table")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("inspect", help="what a trained run's table holds (cafe hot ids, cached rows)",
                              description="What a trained run's embedding table holds per field: CAFE's hot ids "
                                          "(as raw values), their scores and the share of lookups served hot; "
                                          "mpcache's and tt's cached rows.")
    p.add_argument("--run", required=True, help="run directory of `embcompress train --out`")
    p.add_argument("--data", help="raw rows (as for predict): also report the share of each field's lookups "
                                  "that the hot rows / cache serve on them")
    p.add_argument("--field", type=int, action="append", help="only this field (0-based), repeatable")
    p.add_argument("--top", type=positive_int, default=10, help="ids listed per field (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_inspect)


def _print_json(obj: Any) -> None:
    print(json_dumps(obj))


def _score(args: argparse.Namespace, out: str | None) -> dict[str, Any]:
    from .predict import predict_file

    return predict_file(args.run, args.data, out, batch_size=args.batch_size, device=args.device,
                        progress=not args.no_progress, require_labels=out is None)


def _metrics_text(r: dict[str, Any]) -> str:
    if r["auc"] is None and r["logloss"] is None:
        return "no labels"
    auc = "n/a (one class)" if r["auc"] is None else f"{r['auc']:.4f}"
    return f"AUC {auc}  logloss {r['logloss']:.4f}"


def cmd_predict(args: argparse.Namespace) -> int:
    r = _score(args, args.out)
    if args.json:
        _print_json(r)
    else:
        print(f"wrote {r['rows']:,} probabilities to {r['out']}  ({_metrics_text(r)}; {r['samples_per_s']:,.0f} rows/s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    r = _score(args, None)
    if args.json:
        _print_json(r)
    else:
        print(f"{r['rows']:,} rows  {_metrics_text(r)}  ({r['samples_per_s']:,.0f} rows/s)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import collect_runs, format_table

    rows = collect_runs(args.dirs)
    if args.json:
        _print_json(rows)
    else:
        print(format_table(rows, markdown=args.markdown))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import format_report, inspect_run

    report = inspect_run(args.run, fields=args.field, top=args.top, data=args.data)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0
