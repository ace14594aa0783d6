"""The ``embcompress`` command: train, demo, preprocess, synth (and more, registered by subpackages).

Errors a user can fix (bad input, unknown names, unreachable ratios, missing files, a diverged loss)
print one line ``embcompress: error: ...`` to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Callable, Sequence

import torch

from .embeddings import BudgetError, methods
from .train.checkpoint import CheckpointError
from .train.loop import OPTIMIZERS, TrainConfig, TrainingDiverged, run_training

log = logging.getLogger("embcompress")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, BudgetError, TrainingDiverged, CheckpointError)


def parse_value(text: str) -> Any:
    """A command-line option value: int, float, bool, null, a JSON list, or else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"option {item!r} must look like KEY=VALUE")
        options[key.replace("-", "_")] = parse_value(value)
    return options


def split_list(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


# ---------------------------------------------------------------------------------------------- data args
def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="synthetic (default) | criteo:PATH (raw TSV) | csv:PATH | a preprocessed directory")
    g.add_argument("--rows", type=int, help="synthetic: number of rows")
    g.add_argument("--fields", type=int, help="synthetic: number of categorical fields (<= 26)")
    g.add_argument("--scale", type=float, help="synthetic: Criteo Kaggle cardinalities times this")
    g.add_argument("--skew", type=skew_arg,
                   help="synthetic: Zipf exponent of the ids, or criteo-sample (per-field exponents fitted to the real sample)")
    g.add_argument("--drift", type=float, help="synthetic: popularity drift over time, 0..1")
    g.add_argument("--data-seed", type=int, help="synthetic: generator seed (default: --seed)")
    g.add_argument("--label", help="csv: label column")
    g.add_argument("--categorical", help="csv: comma-separated categorical columns")
    g.add_argument("--numeric", help="csv: comma-separated numeric columns")
    g.add_argument("--delimiter", help="csv: field delimiter (default ',')")
    g.add_argument("--min-count", type=int, help="values seen fewer times map to the field's OOV id")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of stopping")
    g.add_argument("--cache-dir", help="where criteo:/csv: data is preprocessed to (default: a temporary directory)")
    g.add_argument("--split", choices=["time", "random"], default="time",
                   help="time: last 1/7 of the rows is the test set (default); random: a seeded random 1/7")


def skew_arg(text: str) -> float | str:
    """--skew: a number, or the name of a per-field preset of the synthetic generator."""
    from .data.synthetic import SKEW_PRESETS
    try:
        return float(text)
    except ValueError:
        if text in SKEW_PRESETS:
            return text
        raise argparse.ArgumentTypeError(f"a number or one of {sorted(SKEW_PRESETS)}, got {text!r}") from None


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    spec = args.data
    opts: dict[str, Any] = {}
    if spec == "synthetic":
        for name in ("rows", "fields", "scale", "skew", "drift"):
            if getattr(args, name) is not None:
                opts[name] = getattr(args, name)
        opts["seed"] = args.data_seed if args.data_seed is not None else getattr(args, "seed", 0)
    elif spec.startswith("csv:"):
        if not args.label or not (args.categorical or args.numeric):
            raise ValueError("csv data needs --label and --categorical and/or --numeric")
        opts.update(label=args.label, categorical=split_list(args.categorical) or [],
                    numeric=split_list(args.numeric) or [])
        if args.delimiter:
            opts["delimiter"] = args.delimiter
    if not spec == "synthetic" and not spec.startswith(("criteo:", "csv:")) and args.skip_bad_lines:
        raise ValueError("--skip-bad-lines applies to criteo: and csv: data only")
    if spec.startswith(("criteo:", "csv:")):
        if args.min_count is not None:
            opts["min_count"] = args.min_count
        if args.skip_bad_lines:
            opts["skip_bad_lines"] = True
        if args.cache_dir:
            opts["cache_dir"] = args.cache_dir
    return opts


# ---------------------------------------------------------------------------------------------- train
def add_train_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    g = p.add_argument_group("table and model")
    g.add_argument("--method", default="full", help=f"table type: {', '.join(methods())}")
    g.add_argument("--compression", type=float, help="compression ratio (full table bytes / table bytes); full: 1")
    g.add_argument("--budget-bytes", type=int, help="byte budget for the table instead of a ratio")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable; VALUE in JSON (0.5, true, [4,4]); see: embcompress methods")
    g.add_argument("--model", default="dlrm", help="model: dlrm, dcn, deepfm")
    g.add_argument("--dim", type=int, default=16, help="embedding dimension (default 16)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--eval-batch-size", type=int, default=4096)
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=300,
                   help="steps over which the learning rate ramps up linearly (default 300; 0: none)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adagrad",
                   help="adagrad (default), sgd (the DLRM reference, with --lr 0.1) or adam (SparseAdam for tables)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shuffle", action="store_true", help="shuffle batch order (default: time order)")
    g.add_argument("--max-steps", type=int, help="stop training after this many steps")
    g.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="hold out the last F of the training rows (time order with --split time) and report "
                        "val_auc / val_logloss: tune on these, not on the test rows (default 0: none)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0: at the end of each epoch)")
    g.add_argument("--keep-checkpoints", type=int, default=2, metavar="K",
                   help="keep the last K checkpoints (checkpoint-STEP.pt; checkpoint.pt links the newest)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue from the newest intact checkpoint in --out (or DIR); starts afresh if none")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (with a fixed thread count a resumed run is exact)")
    g.add_argument("--out", help="run directory (config.json, metrics.jsonl, summary.json, checkpoints)")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    out = args.out
    if isinstance(args.resume, str):
        if out and out != args.resume:
            raise ValueError(f"--resume {args.resume} and --out {out} name different run directories")
        out = args.resume
    return TrainConfig(
        data=args.data, data_options=data_options(args), split=args.split, val_fraction=args.val_fraction,
        method=args.method,
        compression=args.compression, budget_bytes=args.budget_bytes, method_options=parse_options(args.option),
        model=args.model, embedding_dim=args.dim, epochs=args.epochs, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        optimizer=args.optimizer, seed=args.seed,
        shuffle=args.shuffle, max_steps=args.max_steps, device=args.device, out=out,
        progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume is not None, deterministic=args.deterministic,
    )


def format_summary(s: dict[str, Any]) -> str:
    return (f"{s['method']:>8} {s['compression_actual']:>10.1f}x  AUC {s['test_auc']:.4f}  "
            f"logloss {s['test_logloss']:.4f}  table {s['embedding_bytes'] / 2**20:.2f} MiB  "
            f"train {s['train_samples_per_s']:,.0f}/s  eval {s['eval_samples_per_s']:,.0f}/s")


def cmd_train(args: argparse.Namespace) -> int:
    """Under torchrun every rank trains; only rank 0 prints (and writes the run directory)."""
    summary = run_training(config_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------------------------- demo
DEMO_METHODS = ("full", "hash", "qr", "cafe", "cafe-ml", "tt", "lowrank")


def cmd_demo(args: argparse.Namespace) -> int:
    """Short DLRM trainings of several table types at one ratio on synthetic data, then a comparison."""
    from .data import load_dataset
    from .report import markdown_table

    opts = {"rows": args.rows, "seed": args.seed}
    dataset = load_dataset("synthetic", **opts)
    rows = []
    chosen = [m for m in (split_list(args.methods) or DEMO_METHODS) if m in methods() or m == "full"]
    for method in chosen:
        cfg = TrainConfig(data="synthetic", data_options=opts, method=method,
                          compression=None if method == "full" else args.compression, batch_size=args.batch_size,
                          lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, device=args.device,
                          out=f"{args.out}/{method}" if args.out else None,
                          progress=not args.no_progress)
        try:
            s = run_training(cfg, dataset=dataset)
        except BudgetError as e:
            log.warning("skipping %s: %s", method, e)
            rows.append({"method": method, "note": f"skipped: {e}"})
            continue
        print(format_summary(s), flush=True)
        rows.append(s)
    bayes = next((r.get("bayes_auc") for r in rows if "bayes_auc" in r), math.nan)
    print(f"\nDLRM on {args.rows:,} synthetic rows (time split 6/7 : 1/7), one epoch, batch {args.batch_size}, "
          f"target ratio {args.compression:g}x; Bayes-optimal test AUC {bayes:.4f}\n")
    print(markdown_table(rows))
    return 0


# ---------------------------------------------------------------------------------------------- methods
def cmd_methods(args: argparse.Namespace) -> int:
    """Every method's declared options (or the named ones); --markdown writes docs/methods.md."""
    from .embeddings import get_method
    from .embeddings.options import describe, markdown
    names = args.names or methods()
    classes = [(name, get_method(name)) for name in names]
    print(markdown(classes) if args.markdown else "\n\n".join(describe(n, c) for n, c in classes))
    return 0


# ---------------------------------------------------------------------------------------------- data commands
def cmd_preprocess(args: argparse.Namespace) -> int:
    if args.format == "criteo":
        from .data.criteo import preprocess_criteo
        stats = preprocess_criteo(args.path, args.out, min_count=args.min_count or 1,
                                  skip_bad_lines=args.skip_bad_lines, progress=not args.no_progress)
    else:
        from .data.csv import preprocess_csv
        if not args.label:
            raise ValueError("csv preprocessing needs --label")
        stats = preprocess_csv(args.path, args.out, label=args.label, categorical=split_list(args.categorical) or [],
                               numeric=split_list(args.numeric) or [], delimiter=args.delimiter or ",",
                               min_count=args.min_count or 1, skip_bad_lines=args.skip_bad_lines,
                               progress=not args.no_progress)
    print(json.dumps(stats, default=str))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic_tsv
    opts = {k: getattr(args, k) for k in ("fields", "scale", "skew", "drift") if getattr(args, k) is not None}
    write_synthetic_tsv(args.out, args.rows, seed=args.seed, **opts)
    print(f"wrote {args.rows:,} Criteo-format rows to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embcompress", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate one model")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="compare several table types at one ratio on synthetic data")
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--compression", type=float, default=100.0)
    p.add_argument("--methods", help=f"comma-separated (default: {','.join(DEMO_METHODS)}, those available)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write each run under this directory")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list the table methods and the options each accepts")
    p.add_argument("names", nargs="*", help="methods to describe (default: all)")
    p.add_argument("--markdown", action="store_true", help="print docs/methods.md (Markdown tables)")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("preprocess", help="turn raw Criteo TSV or CSV into a memory-mapped dataset directory")
    p.add_argument("format", choices=["criteo", "csv"])
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--min-count", type=int)
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--label")
    p.add_argument("--categorical")
    p.add_argument("--numeric")
    p.add_argument("--delimiter")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("synth", help="write synthetic Criteo-format TSV")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fields", type=int)
    p.add_argument("--scale", type=float)
    p.add_argument("--skew", type=skew_arg, help="Zipf exponent, or criteo-sample")
    p.add_argument("--drift", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    for register in extra_commands():
        register(sub)
    return parser


def extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands that live with their subpackage (compress-lowrank, sweep, ...)."""
    found = []
    for module in ("embcompress.compress.command", "embcompress.sweep", "embcompress.serve.command",
                   "embcompress.export"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if not e.name or not module.startswith(e.name):
                raise
            continue
        found.append(mod.add_parser)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"embcompress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embcompress: interrupted", file=sys.stderr)
        return 130
