"""Large scale: the full Criteo Kaggle id space (33.76M ids), full against cafe at 1000x and 10000x.

    # the issue's run (hours on 2 cores): 10M rows, one epoch each
    PYTHONPATH=. .venv/bin/python benchmarks/large_scale.py --rows 10000000
    # a reduced run: 1M rows, 150 steps of 4096 per configuration
    PYTHONPATH=. .venv/bin/python benchmarks/large_scale.py --rows 1000000 --max-steps 150

The synthetic data (scale 1.0: the 26 Kaggle cardinalities as they are) is generated once and saved as a
memory-mapped dataset directory (--data-dir, reused when it already holds the same rows), then every
configuration trains in its own child process so that its peak RSS (``resource.getrusage``'s ru_maxrss,
which covers the data pages it touched, the table, the optimizer state and the model) is its own. Each
child reports peak RSS, RSS after opening the data, table bytes, training and evaluation samples/s, test
AUC and the Bayes-optimal AUC of the same test rows. The parent prints one JSON line and fails if a
configuration's peak RSS exceeds --limit-gb (24 by default: the issue's bound).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from embcompress.cli import skew_arg
from common import REPO, add_threads_arg, apply_threads, current_rss_bytes, emit, log, peak_rss_bytes

CONFIGS = "full:1,cafe:1000,cafe:10000"


def child(args: argparse.Namespace) -> None:
    """Train one configuration on the saved data; print its figures as one JSON line."""
    from embcompress.data import open_dataset
    from embcompress.train.loop import TrainConfig, run_training

    apply_threads(args)
    method, ratio = args.child.split(":")
    ds = open_dataset(args.data_dir)
    rss_data = current_rss_bytes()
    cfg = TrainConfig(data=args.data_dir, method=method, compression=None if method == "full" else float(ratio),
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps, progress=False)
    s = run_training(cfg, dataset=ds)
    out = {k: s[k] for k in ("method", "compression_target", "compression_actual", "embedding_bytes", "test_auc",
                             "test_logloss", "train_samples_per_s", "eval_samples_per_s", "steps", "rows_train",
                             "rows_test", "train_seconds", "bayes_auc") if k in s}
    out.update(peak_rss_bytes=peak_rss_bytes(), rss_after_data_open_bytes=rss_data)
    print(json.dumps(out), flush=True)


def ensure_data(path: Path, rows: int, seed: int, skew: float | str = 1.1) -> float:
    """Generate and save the data unless ``path`` already holds it; returns the seconds spent."""
    meta = path / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        opts = m.get("options", {})
        if m.get("rows") == rows and opts.get("scale") == 1.0 and opts.get("seed") == seed and opts.get("skew", 1.1) == skew:
            log(f"reusing {path}")
            return 0.0
    from embcompress.data import make_synthetic, save_dataset

    log(f"generating {rows:,} rows over the full Kaggle id space (skew {skew}) into {path} ...")
    start = time.perf_counter()
    save_dataset(make_synthetic(rows=rows, scale=1.0, seed=seed, skew=skew), path)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--max-steps", type=int, help="cap training steps per configuration (default: one epoch)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=300, help="0 reproduces the runs made before warm-up")
    ap.add_argument("--configs", default=CONFIGS, help=f"METHOD:RATIO,... (default {CONFIGS})")
    ap.add_argument("--data-dir", default=str(REPO / "bench-out" / "large-data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skew", type=skew_arg, default=1.1,
                    help="the generator's Zipf exponent, or criteo-sample (per-field, fitted to the real sample)")
    ap.add_argument("--limit-gb", type=float, default=24.0)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: METHOD:RATIO to run in this process
    add_threads_arg(ap)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    apply_threads(args)

    gen_seconds = ensure_data(Path(args.data_dir), args.rows, args.seed, args.skew)
    results = []
    for conf in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", conf, "--data-dir", args.data_dir,
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps)]
        cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        log(f"training {conf} ...")
        load = round(os.getloadavg()[0], 2)
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if p.returncode != 0:
            results.append({"config": conf, "error": p.stderr.strip().splitlines()[-1:] or ["(no stderr)"]})
            log(f"{conf} failed: {p.stderr[-2000:]}")
            continue
        r = {"config": conf, "load_before": load, "load_after": round(os.getloadavg()[0], 2),
             **json.loads(p.stdout.strip().splitlines()[-1])}
        r["peak_rss_gb"] = round(r["peak_rss_bytes"] / 2**30, 3)
        r["within_limit"] = r["peak_rss_bytes"] <= args.limit_gb * 2**30
        log(f"{conf}: peak RSS {r['peak_rss_gb']} GB, train {r['train_samples_per_s']:,.0f}/s, "
            f"AUC {r['test_auc']:.4f} (Bayes {r.get('bayes_auc', float('nan')):.4f})")
        results.append(r)
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    emit({"benchmark": "large_scale", "settings": {**settings, "data_generation_seconds": round(gen_seconds, 1)},
          "results": results})
    if any(not r.get("within_limit", False) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
