"""Paired-by-seed comparison of finished runs: sweep cells (``OUT/cells/*.json``) and ``train`` run
directories (``summary.json``), grouped by (label, ratio), differences against one label per seed.

    python benchmarks/zch_compare.py bench-out/zch/sweep-base bench-out/zch/sweep-zch --baseline cafe
    python benchmarks/zch_compare.py bench-out/zch/ablate --metric val_auc --baseline cafe-default

A sweep cell is labelled by its method (plus ``--label-options`` of it when given); a run directory by
its name less ``-seedN`` (or ``-sN``). One JSON line per (label, ratio): the metric per seed, its mean, and the mean
paired difference to the baseline with its standard error (sample s.d. / sqrt(pairs)); ``--markdown``
also prints them as one table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402


def records(paths: list[Path]) -> list[dict[str, Any]]:
    """(label, ratio, seed, summary) of every finished run under ``paths``."""
    out = []
    for root in paths:
        for cell in sorted(root.glob("cells/*.json")):
            d = json.loads(cell.read_text())
            if d.get("status") == "done":
                c = d["cell"]
                opts = d["summary"].get("method_options") or {}
                label = c["method"] + "".join(f" {k}={v}" for k, v in sorted(opts.items()))
                out.append({"label": label, "ratio": c["ratio"], "seed": c["seed"], "summary": d["summary"]})
        for summary in sorted(root.glob("*/summary.json")):
            s = json.loads(summary.read_text())
            m = re.fullmatch(r"(.+)-s(?:eed)?(\d+)", summary.parent.name)
            label, seed = (m.group(1), int(m.group(2))) if m else (summary.parent.name, s.get("seed", 0))
            out.append({"label": label, "ratio": s.get("compression_target"), "seed": seed, "summary": s})
    return out


def paired(values: dict[int, float], base: dict[int, float]) -> dict[str, Any]:
    seeds = sorted(set(values) & set(base))
    diffs = [values[s] - base[s] for s in seeds]
    if not diffs:
        return {}
    mean = sum(diffs) / len(diffs)
    se = (math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
          if len(diffs) > 1 else None)
    return {"pairs": len(diffs), "diffs": [round(d, 5) for d in diffs], "mean_diff": round(mean, 5),
            "se": None if se is None else round(se, 5), "wins": sum(d > 0 for d in diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep output directories or folders of run directories")
    ap.add_argument("--metric", default="test_auc", help="summary key to compare (test_auc, val_auc, ...)")
    ap.add_argument("--baseline", required=True, help="label the others are paired against")
    ap.add_argument("--markdown", action="store_true", help="also print a table: a row per label, a column per "
                    "ratio, the mean and the paired difference to the baseline (standard error, wins)")
    args = ap.parse_args()
    table: dict[tuple[str, Any], dict[int, float]] = defaultdict(dict)
    speed: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for r in records(args.dirs):
        if args.metric in r["summary"]:
            table[(r["label"], r["ratio"])][r["seed"]] = r["summary"][args.metric]
            speed[(r["label"], r["ratio"])].append(r["summary"].get("train_samples_per_s", float("nan")))
    rows = []
    for (label, ratio), values in sorted(table.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
        rec: dict[str, Any] = {"label": label, "ratio": ratio, "metric": args.metric,
                               "by_seed": {s: round(v, 5) for s, v in sorted(values.items())},
                               "mean": round(sum(values.values()) / len(values), 5),
                               "train_samples_per_s": round(sum(speed[(label, ratio)]) / len(values))}
        base = table.get((args.baseline, ratio))
        if base is not None and label != args.baseline:
            rec["vs"] = args.baseline
            rec.update(paired(values, base))
        emit(rec)
        rows.append(rec)
    if args.markdown:
        print(markdown(rows, args.baseline))


def markdown(rows: list[dict[str, Any]], baseline: str) -> str:
    """Mean per (label, ratio); below the baseline's own cells, the paired difference to it."""
    ratios = sorted({r["ratio"] for r in rows}, key=lambda x: float(x))
    labels = sorted({r["label"] for r in rows}, key=lambda lab: (lab != baseline, lab))
    cell = {(r["label"], r["ratio"]): r for r in rows}
    out = ["| method | " + " | ".join(f"{float(x):,g}×" for x in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for lab in labels:
        texts = []
        for x in ratios:
            r = cell.get((lab, x))
            if r is None:
                texts.append("")
                continue
            text = f"{r['mean']:.4f}"
            if r.get("mean_diff") is not None:
                se = "" if r.get("se") is None else f", s.e. {r['se']:.4f}"
                text += f" ({r['mean_diff']:+.4f}{se}; {r['wins']} of {r['pairs']})"
            texts.append(text)
        out.append(f"| {lab} | " + " | ".join(texts) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
