"""The ``embcompress`` command: train, demo, preprocess, synth, methods (and more, registered by subpackages).

Errors a user can fix (bad input, unknown names, out-of-range values, unreachable ratios, missing or
unreadable files, a diverged loss) print one line ``embcompress: error: ...`` to stderr and exit with
status 2. Anything else is a bug and shows its traceback; ``-v`` also shows the traceback behind a user error.
"""

from __future__ import annotations

import argparse
import json
import linecache
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch

from .embeddings import BudgetError, methods
from .report import text_table
from .train.checkpoint import CheckpointError, json_dumps
from .train.distributed import RankStopped
from .train.loop import OPTIMIZERS, WARMUP_MAX_SHARE, TrainConfig, TrainingDiverged, run_training

log = logging.getLogger("embcompress")

#: exception types whose message a user can act on: raised by a check of embcompress (any OSError: a
#: path of the user's), they print one line; raised elsewhere they are bugs and keep their traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, BudgetError,
               TrainingDiverged, CheckpointError, RankStopped)
_PACKAGE_DIR = Path(__file__).resolve().parent


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors and every option's default in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"embcompress: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it says its default already or has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings and not isinstance(action, argparse._VersionAction)):
            text += " (default: %(default)s)"
        return text


# ---------------------------------------------------------------------------------------------- value types
def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            name: str = "") -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) in [low, high] (``low_open``: above low)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    parse.__name__ = name or kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, name="positive integer")
nonnegative_int = _number(int, 0, name="non-negative integer")
positive_float = _number(float, 0, low_open=True, name="positive number")
fraction = _number(float, 0, 1, name="fraction")


def _checked_by(check: Callable[[str], Any], doc: str) -> Callable[[str], str]:
    """An argparse type: the text itself once ``check`` accepts it (its ValueError is the usage error)."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    parse.__doc__ = doc
    return parse


def _check_device(text: str) -> None:
    from .train.loop import check_device
    check_device(text)


def _check_method(text: str) -> None:
    from .embeddings import get_method
    get_method(text)


device_arg = _checked_by(_check_device, "--device: cpu, cuda or cuda:N that this machine has")
method_arg = _checked_by(_check_method, "--method: a registered table type (the error lists them)")


def out_path(text: str) -> str:
    """--out of a command that writes a directory: refuse an existing file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a directory")
    return text


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
                   help="synthetic | criteo:PATH (raw TSV) | csv:PATH | a preprocessed directory")
    g.add_argument("--rows", type=positive_int, help="synthetic: number of rows (default 200000)")
    g.add_argument("--fields", type=_number(int, 1, 26, name="field count"),
                   help="synthetic: number of categorical fields, 1..26 (default 26)")
    g.add_argument("--scale", type=positive_float,
                   help="synthetic: Criteo Kaggle cardinalities times this (default 0.01)")
    g.add_argument("--skew", type=skew_arg,
                   help="synthetic: Zipf exponent of the ids, or criteo-sample (per-field exponents fitted to "
                        "the real sample) (default 1.1)")
    g.add_argument("--drift", type=fraction, help="synthetic: popularity drift over time, 0..1 (default 0)")
    g.add_argument("--data-seed", type=nonnegative_int, help="synthetic: generator seed (default: --seed)")
    g.add_argument("--label", help="csv: label column (required for csv:)")
    g.add_argument("--categorical", help="csv: comma-separated categorical columns")
    g.add_argument("--numeric", help="csv: comma-separated numeric columns")
    g.add_argument("--delimiter", help="csv: field delimiter (default ',')")
    g.add_argument("--min-count", type=positive_int,
                   help="criteo:/csv: values seen fewer times map to the field's OOV id (default 1: keep all)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="criteo:/csv: skip and count malformed lines instead of stopping at the first")
    g.add_argument("--cache-dir", help="where criteo:/csv: data is preprocessed to (default: "
                                       "$XDG_CACHE_HOME/embcompress, else ~/.cache/embcompress)")
    g.add_argument("--split", choices=["time", "random"], default="time",
                   help="time: the last 1/7 of the rows is the test set; random: a seeded random 1/7")


def skew_arg(text: str) -> float | str:
    """--skew: a number, or the name of a per-field preset of the synthetic generator."""
    from .data.synthetic import SKEW_PRESETS
    try:
        return float(text)
    except ValueError:
        if text in SKEW_PRESETS:
            return text
        raise argparse.ArgumentTypeError(f"a number or one of {sorted(SKEW_PRESETS)}, got {text!r}") from None


#: data flags and the kind of --data each applies to ("raw": criteo: and csv:)
_DATA_FLAGS = {"rows": "synthetic", "fields": "synthetic", "scale": "synthetic", "skew": "synthetic",
               "drift": "synthetic", "data_seed": "synthetic", "label": "csv", "categorical": "csv",
               "numeric": "csv", "delimiter": "csv", "min_count": "raw", "skip_bad_lines": "raw", "cache_dir": "raw"}
_DATA_KINDS = {"synthetic": "synthetic", "csv": "csv:", "raw": "criteo: and csv:"}


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The data options of ``args`` for :func:`embcompress.data.load_dataset`; a flag that does not apply
    to the kind of ``--data`` given is an error (it would be ignored)."""
    spec = args.data
    kind = "synthetic" if spec == "synthetic" else spec.split(":", 1)[0] if spec.startswith(("csv:", "criteo:")) else ""
    for name, applies in _DATA_FLAGS.items():
        if getattr(args, name, None) not in (None, False) and not (
                applies == kind or (applies == "raw" and kind in ("criteo", "csv"))):
            raise ValueError(f"--{name.replace('_', '-')} applies to {_DATA_KINDS[applies]} data only, "
                             f"not to --data {spec}")
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
    if spec.startswith(("criteo:", "csv:")):
        if args.min_count is not None:
            opts["min_count"] = args.min_count
        if args.skip_bad_lines:
            opts["skip_bad_lines"] = True
        if args.cache_dir:
            opts["cache_dir"] = args.cache_dir
    return opts


# ---------------------------------------------------------------------------------------------- train
def add_training_args(g: Any) -> None:
    """Model and training flags shared by ``train`` and ``sweep`` (``g``: a parser or argument group)."""
    from .models import MODELS
    g.add_argument("--model", default="dlrm", choices=sorted(MODELS), help="model")
    g.add_argument("--dim", type=positive_int, default=16, help="embedding dimension")
    g.add_argument("--epochs", type=positive_int, default=1, help="passes over the training rows")
    g.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (per rank)")
    g.add_argument("--eval-batch-size", type=positive_int, default=4096, help="evaluation batch size")
    g.add_argument("--lr", type=positive_float, default=0.05, help="learning rate")
    g.add_argument("--warmup-steps", type=nonnegative_int, default=300,
                   help="steps over which the learning rate ramps up linearly (0: none)")
    g.add_argument("--warmup-max-share", type=positive_float, default=WARMUP_MAX_SHARE,
                   help="cap the warm-up at this share of the run's steps (default: no cap; a run shorter than "
                        "its warm-up never reaches --lr, which is logged as a warning)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adagrad",
                   help="sgd (the DLRM reference, with --lr 0.1), adagrad, or adam (SparseAdam for the tables)")
    g.add_argument("--shuffle", action="store_true", help="shuffle the batch order (default: time order)")
    g.add_argument("--max-steps", type=positive_int, help="stop training after this many steps (default: no limit)")
    g.add_argument("--device", type=device_arg, default="cpu", metavar="{cpu,cuda,cuda:N}",
                   help="where to train")
    g.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    g = p.add_argument_group("table and model")
    g.add_argument("--method", default="full", type=method_arg, metavar="METHOD",
                   help=f"table type: {', '.join(sorted(methods()))} (options: embcompress methods)")
    g.add_argument("--compression", type=positive_float,
                   help="compression ratio, full table bytes / table bytes (default: 1 for full; other methods "
                        "need this or --budget-bytes)")
    g.add_argument("--budget-bytes", type=positive_int, help="byte budget for the table instead of a ratio")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable; VALUE in JSON (0.5, true, [4,4]); see: embcompress methods")
    g = p.add_argument_group("training")
    add_training_args(g)
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the model, the batch order and the random split")
    g.add_argument("--val-fraction", type=_number(float, 0, 0.99, name="fraction"), default=0.0, metavar="F",
                   help="hold out the last F of the training rows (time order with --split time) and report "
                        "val_auc / val_logloss: tune on these, not on the test rows (0: none)")
    g.add_argument("--dist-timeout", type=positive_float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before the run stops and says "
                        "which ranks did not answer")
    g = p.add_argument_group("run directory")
    g.add_argument("--out", type=out_path,
                   help="run directory: config.json, metrics.jsonl, summary.json, checkpoints (default: none "
                        "written); must be new or empty unless --resume or --overwrite")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue from the newest intact checkpoint in --out (or DIR); starts afresh if none")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run files in a non-empty --out (other files stay)")
    g.add_argument("--checkpoint-every", type=nonnegative_int, default=0,
                   help="steps between checkpoints (0: at the end of each epoch)")
    g.add_argument("--keep-checkpoints", type=positive_int, default=2, metavar="K",
                   help="keep the last K checkpoints (checkpoint-STEP.pt; checkpoint.pt links the newest)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (with a fixed thread count a resumed run is exact)")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (training, evaluation, preprocessing)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    out = args.out
    if isinstance(args.resume, str):
        if out and out != args.resume:
            raise ValueError(f"--resume {args.resume} and --out {out} name different run directories")
        out = args.resume
    if args.resume is not None and args.overwrite:
        raise ValueError("--resume continues the run in the directory and --overwrite replaces it: give one")
    if not out and (args.checkpoint_every or args.overwrite):
        raise ValueError(f"{'--checkpoint-every' if args.checkpoint_every else '--overwrite'} needs a run "
                         "directory (--out DIR)")
    return TrainConfig(
        data=args.data, data_options=data_options(args), split=args.split, val_fraction=args.val_fraction,
        method=args.method,
        compression=args.compression, budget_bytes=args.budget_bytes, method_options=parse_options(args.option),
        model=args.model, embedding_dim=args.dim, epochs=args.epochs, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        warmup_max_share=args.warmup_max_share, optimizer=args.optimizer, seed=args.seed,
        shuffle=args.shuffle, max_steps=args.max_steps, device=args.device, out=out,
        progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume is not None, deterministic=args.deterministic,
        overwrite=args.overwrite, dist_timeout=args.dist_timeout,
    )


def format_summary(s: dict[str, Any]) -> str:
    val = f"  val AUC {s['val_auc']:.4f}" if "val_auc" in s else ""
    used = s.get("warmup_steps_used", s.get("warmup_steps"))
    warm = f"  warm-up {used} of {s['warmup_steps']} steps" if used != s.get("warmup_steps") else ""
    if s.get("lr_reached", 1.0) < 1.0:
        warm += f"  lr reached {100 * s['lr_reached']:.0f}% of --lr (warm-up longer than the run)"
    return (f"{s['method']:>8} {s['compression_actual']:>10.1f}x  AUC {s['test_auc']:.4f}  "
            f"logloss {s['test_logloss']:.4f}{val}  table {s['embedding_bytes'] / 2**20:.2f} MiB  "
            f"train {s['train_samples_per_s']:,.0f}/s  eval {s['eval_samples_per_s']:,.0f}/s{warm}")


def cmd_train(args: argparse.Namespace) -> int:
    """Under torchrun every rank trains; only rank 0 prints (and writes the run directory)."""
    summary = run_training(config_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json_dumps(summary))
    else:
        print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------------------------- demo
DEMO_METHODS = ("full", "hash", "qr", "cafe", "cafe-ml", "zch", "tt", "cafe-tt", "lowrank")
#: the demo table's one-line idea of each method (others: the first words of their module's docstring)
DEMO_IDEAS = {
    "full": "one row per id: the baseline",
    "hash": "ids of a field share rows by a hash",
    "qr": "row = quotient row x remainder row",
    "cafe": "hot ids get own rows, the rest hash",
    "cafe-ml": "cafe + a second hash row for warm ids",
    "zch": "hottest ids own rows (TorchRec's MCH)",
    "tt": "rows from small tensor-train cores",
    "cafe-tt": "hot ids own rows, the rest TT rows",
    "lowrank": "rows in a low-rank subspace per field",
    "mpcache": "int8/int4 rows + a float cache",
}
NEXT_STEPS = """\
What to try next:
  embcompress demo --compression 1000                  the same at a 10x smaller budget
  embcompress train --method cafe --compression 100 --val-fraction 0.1 --out runs/cafe
                                                       one run, with a run directory and validation rows
  embcompress methods cafe                             a method's options (--option KEY=VALUE)
  embcompress train --data criteo:train.txt --method hash --compression 1000
                                                       your own Criteo-format data (or csv:FILE --label ...)
  docs/cli.md explains every command and its errors; docs/methods.md every option."""


def demo_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text comparison: one line per method, test AUC against ``full``, and training samples/s
    (absolute: the runs follow one another, so their speeds are no ratio; the benchmarks interleave)."""
    from .embeddings import get_method
    from .embeddings.options import first_line
    full = next((r for r in rows if r.get("method") == "full" and "test_auc" in r), None)
    head = ("method", "idea", "ratio", "table", "test AUC", "vs full", "train samples/s")
    lines = []
    for r in rows:
        idea = DEMO_IDEAS.get(r["method"]) or first_line(get_method(r["method"]))[:38]
        if "test_auc" not in r:
            lines.append((r["method"], idea, "", "", "", "", r.get("note", "")))
            continue
        vs = (f"{r['test_auc'] - full['test_auc']:+.4f}" if full and r is not full
              and math.isfinite(r["test_auc"] + full["test_auc"]) else "")
        lines.append((r["method"], idea, f"{r['compression_actual']:,.0f}x", _size(r["embedding_bytes"]),
                      f"{r['test_auc']:.4f}", vs, f"{r['train_samples_per_s']:,.0f}"))
    return text_table(head, lines, left=2, rule=True)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def cmd_demo(args: argparse.Namespace) -> int:
    """Short DLRM trainings of several table types at one ratio on synthetic data, then a comparison."""
    from .data import load_dataset
    from .embeddings import get_method

    chosen = split_list(args.methods) or list(DEMO_METHODS)
    for method in chosen:
        get_method(method)  # an unknown name: the error lists the known ones, before any training
    opts = {"rows": args.rows, "seed": args.seed}
    dataset = load_dataset("synthetic", **opts)
    print(f"Training DLRM with {len(chosen)} embedding tables on {args.rows:,} synthetic rows (one epoch each; "
          f"the last 1/7 of the rows is the test set)...", flush=True)
    rows = []
    for method in chosen:
        cfg = TrainConfig(data="synthetic", data_options=opts, method=method,
                          compression=None if method == "full" else args.compression, batch_size=args.batch_size,
                          lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, device=args.device,
                          out=f"{args.out}/{method}" if args.out else None, overwrite=args.overwrite,
                          progress=not args.no_progress)
        try:
            s = run_training(cfg, dataset=dataset)
        except BudgetError as e:
            log.info("skipping %s: %s", method, e)
            rows.append({"method": method, "note": f"cannot reach {args.compression:g}x here"})
            continue
        print(f"  {format_summary(s)}", flush=True)
        rows.append(s)
    bayes = next((r.get("bayes_auc") for r in rows if "bayes_auc" in r), math.nan)
    print(f"\nTarget ratio {args.compression:g}x (full: 1x). Higher test AUC is better; the best any model can "
          f"reach on this data (Bayes-optimal) is {bayes:.4f}.\n")
    print(demo_table(rows))
    print("\nThe runs follow one another on a machine whose load changes, so their speeds are no comparison: "
          "benchmarks/cafe_speed.py and benchmarks/train_speed.py time methods interleaved.\n")
    print(NEXT_STEPS)
    return 0


# ---------------------------------------------------------------------------------------------- methods
def cmd_methods(args: argparse.Namespace) -> int:
    """Every method's declared options (or the named ones); --markdown writes docs/methods.md."""
    from .embeddings import get_method
    from .embeddings.options import describe, markdown
    names = args.names or sorted(methods())
    classes = [(name, get_method(name)) for name in names]
    print(markdown(classes) if args.markdown else "\n\n".join(describe(n, c) for n, c in classes))
    return 0


# ---------------------------------------------------------------------------------------------- data commands
def cmd_preprocess(args: argparse.Namespace) -> int:
    if args.format == "criteo":
        from .data.criteo import preprocess_criteo
        stats = preprocess_criteo(args.path, args.out, min_count=args.min_count, skip_bad_lines=args.skip_bad_lines,
                                  progress=not args.no_progress, overwrite=args.overwrite)
    else:
        from .data.csv import preprocess_csv
        if not args.label:
            raise ValueError("csv preprocessing needs --label")
        stats = preprocess_csv(args.path, args.out, label=args.label, categorical=split_list(args.categorical) or [],
                               numeric=split_list(args.numeric) or [], delimiter=args.delimiter or ",",
                               min_count=args.min_count, skip_bad_lines=args.skip_bad_lines,
                               progress=not args.no_progress, overwrite=args.overwrite)
    print(json_dumps(stats))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic_tsv
    opts = {k: getattr(args, k) for k in ("fields", "scale", "skew", "drift") if getattr(args, k) is not None}
    write_synthetic_tsv(args.out, args.rows, seed=args.seed, **opts)
    print(f"wrote {args.rows:,} Criteo-format rows to {args.out}")
    return 0


def file_out(text: str) -> str:
    """--out of a command that writes one file: refuse an existing directory."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    return text


def version_text() -> str:
    from . import __version__
    return f"embcompress {__version__} (torch {torch.__version__})"


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="embcompress", description="Train recommendation models with compressed embedding "
                    "tables and measure what the compression costs. Commands and errors: docs/cli.md.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, and show the traceback behind an error")
    parser.add_argument("--version", action="version", version=version_text(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train and evaluate one model")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="compare several table types at one ratio on synthetic data")
    p.add_argument("--rows", type=positive_int, default=300_000, help="synthetic rows (6/7 train, 1/7 test)")
    p.add_argument("--compression", type=positive_float, default=100.0, help="target compression ratio")
    p.add_argument("--methods", help=f"comma-separated table types (default: {','.join(DEMO_METHODS)})")
    p.add_argument("--batch-size", type=positive_int, default=256, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (Adagrad)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=300, help="learning-rate warm-up steps")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the data and the models")
    p.add_argument("--out", type=out_path, help="write each run under OUT/METHOD (default: nothing written)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs an earlier demo left under --out")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", type=device_arg, default="cpu", metavar="{cpu,cuda,cuda:N}", help="where to train")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list the table methods and the options each accepts")
    p.add_argument("names", nargs="*", help="methods to describe (default: all)")
    p.add_argument("--markdown", action="store_true", help="print docs/methods.md (Markdown tables)")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("preprocess", help="turn raw Criteo TSV or CSV into a memory-mapped dataset directory")
    p.add_argument("format", choices=["criteo", "csv"], help="input format")
    p.add_argument("path", help="input file")
    p.add_argument("--out", type=out_path, required=True, help="dataset directory to write")
    p.add_argument("--min-count", type=positive_int, default=1,
                   help="values seen fewer times map to the field's OOV id")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--label", help="csv: label column")
    p.add_argument("--categorical", help="csv: comma-separated categorical columns")
    p.add_argument("--numeric", help="csv: comma-separated numeric columns")
    p.add_argument("--delimiter", help="csv: field delimiter (default ',')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("synth", help="write synthetic Criteo-format TSV")
    p.add_argument("--rows", type=positive_int, required=True, help="rows to write")
    p.add_argument("--out", type=file_out, required=True, help="TSV file to write")
    p.add_argument("--fields", type=_number(int, 1, 26, name="field count"),
                   help="categorical fields, 1..26 (default 26)")
    p.add_argument("--scale", type=positive_float, help="Criteo Kaggle cardinalities times this (default 0.01)")
    p.add_argument("--skew", type=skew_arg, help="Zipf exponent, or criteo-sample (default 1.1)")
    p.add_argument("--drift", type=fraction, help="popularity drift over time, 0..1 (default 0)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="generator seed")
    p.set_defaults(func=cmd_synth)

    for register in extra_commands():
        register(sub)
    for p in sub.choices.values():  # -v after the command name too (SUPPRESS keeps a -v given before it)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log at INFO level, and show the traceback behind an error")
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


def raised_by_embcompress(e: BaseException) -> bool:
    """Whether a ``raise`` statement of this package raised ``e`` (a check with a message for the user),
    rather than a call into torch, numpy or the standard library (where a ValueError is a bug of ours)."""
    tb = e.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = tb.tb_frame.f_code.co_filename
    return (_PACKAGE_DIR in Path(path).resolve().parents
            and linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if not (isinstance(e, OSError) or raised_by_embcompress(e)):  # OSError: about the user's own paths
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"embcompress: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embcompress: interrupted", file=sys.stderr)
        return 130
