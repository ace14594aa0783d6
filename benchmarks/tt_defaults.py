"""tt at ~100x against full, paired by seed: the ablations behind tt's defaults (docs/tt.md).

    PYTHONPATH=. .venv/bin/python benchmarks/tt_defaults.py --data synthetic --seeds 0,1,2 \
        --configs full,tt100 --extra '{"share50": ["tt", 100, {"cache_max_share": 0.5}]}' --threads 1

Each (seed, config) trains DLRM with the training loop's defaults and prints one JSON line. With
``--holdout`` (the default) the last ``--holdout-fraction`` of the training rows are held out (the loop's
``val_fraction``) and the AUC printed is theirs, so defaults are chosen without the test rows.
``--no-holdout`` trains on all training rows and prints the test AUC (for the final figure only).
``--pair-init`` gives every method the same MLP initialisation at a seed (the training loop builds the
table first, so tables that draw different amounts of random numbers otherwise shift the MLP's init). ``--summary FILE`` reads
such JSON lines and prints each config's paired difference from ``full`` (mean, standard error, relative).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from typing import Any

import torch

from embcompress.data import load_dataset
from embcompress.data.arrays import Dataset
from embcompress.train import loop
from common import emit  # type: ignore[import-not-found]

CONFIGS: dict[str, tuple[str, float | None, dict[str, Any]]] = {
    "full": ("full", None, {}),
    "tt100": ("tt", 100, {}),
}


def data_options(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    if args.data == "synthetic":
        opts: dict[str, Any] = {"seed": seed}
        opts.update({k: v for k, v in (("rows", args.rows), ("scale", args.scale)) if v is not None})
        return opts
    return {"min_count": args.min_count} if args.min_count else {}


def pair_init() -> None:
    """Build tables under a forked RNG, so that at one seed every method's MLPs start from the same weights."""
    build_table = loop.build_table

    def forked(*a: Any, **kw: Any) -> Any:
        with torch.random.fork_rng():
            return build_table(*a, **kw)

    loop.build_table = forked


def run(args: argparse.Namespace) -> None:
    if args.pair_init:
        pair_init()
    configs = dict(CONFIGS)
    configs.update({k: (v[0], v[1], dict(v[2])) for k, v in json.loads(args.extra).items()})
    cache: dict[int, Dataset] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label in args.configs.split(","):
            method, ratio, opts = configs[label]
            key = seed if args.data == "synthetic" else 0
            if key not in cache:
                cache.clear()
                cache[key] = load_dataset(args.data, **data_options(args, seed))
            ds = cache[key]
            cfg = loop.TrainConfig(method=method, compression=ratio, method_options=opts, seed=seed,
                                   progress=False, batch_size=args.batch_size,
                                   val_fraction=args.holdout_fraction if args.holdout else 0.0,
                                   warmup_max_share=args.warmup_max_share, **({"lr": args.lr} if args.lr else {}))
            summary, model = loop.train_model(cfg, ds)
            table = loop.embedding_tables(model)[0]
            split = "val" if args.holdout else "test"
            emit({"benchmark": "tt_defaults", "data": args.data, "rows": ds.num_rows, "seed": seed, "config": label,
                  "method": method, "compression": ratio, "options": opts,
                  "split": split, "pair_init": args.pair_init, "auc": summary[f"{split}_auc"],
                  "logloss": summary[f"{split}_logloss"], "rows_train": summary["rows_train"], "compression_actual": summary["compression_actual"],
                  "train_samples_per_s": summary["train_samples_per_s"], "table": table.extra_repr()})


def summarise(paths: list[str]) -> None:
    """Paired (seed by seed) difference of each config from full, per (data, rows, split)."""
    runs: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        for line in open(path):
            if line.startswith("{"):
                r = json.loads(line)
                runs[(r["data"], r["rows"], r["split"], r.get("pair_init", False))][r["config"]][r["seed"]] = r["auc"]
    for key, by_config in runs.items():
        full = by_config.get("full", {})
        print(f"== {key}: full {' / '.join(f'{full[s]:.4f}' for s in sorted(full))}")
        for label, aucs in sorted(by_config.items()):
            seeds = sorted(set(aucs) & set(full))
            if label == "full" or not seeds:
                continue
            rel = [100 * (aucs[s] - full[s]) / full[s] for s in seeds]
            mean = sum(rel) / len(rel)
            se = math.sqrt(sum((x - mean) ** 2 for x in rel) / (len(rel) - 1) / len(rel)) if len(rel) > 1 else float("nan")
            print(f"{label:>24}: {' / '.join(f'{aucs[s]:.4f}' for s in seeds)}  rel {' / '.join(f'{x:+.2f}' for x in rel)}"
                  f"  mean {mean:+.2f}% (se {se:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--scale", type=float)
    ap.add_argument("--min-count", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default="full,tt100")
    ap.add_argument("--extra", default="{}", help='JSON {label: [method, ratio, options]}')
    ap.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--holdout-fraction", type=float, default=1 / 7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup-max-share", type=float, help="cap the warm-up at this share of the run (default: none)")
    ap.add_argument("--pair-init", action="store_true",
                    help="same MLP initialisation for every method at a seed (the table's RNG use forked off)")
    ap.add_argument("--summary", nargs="*", help="JSON-lines files to summarise instead of running")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.summary:
        summarise(args.summary)
    else:
        run(args)


if __name__ == "__main__":
    main()
