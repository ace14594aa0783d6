"""How concentrated each categorical field is: the real Criteo sample against the synthetic generator.

    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/field_skew.py [--sample ../shared/data/criteo_kaggle_sample_10k.tsv]
    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/field_skew.py --skew criteo-sample   # the fitted preset
    PYTHONPATH=.:benchmarks .venv/bin/python benchmarks/field_skew.py --fit                  # refit the preset

CAFE gains over hashing when a few features carry most lookups of the fields that hashing squeezes
hardest. This compares, per field and at the same number of rows (the sample's), how many distinct
values appear, the share of lookups whose value appears at least twice, and the share taken by the 10
and the 100 most frequent values, for the real Criteo Kaggle sample and for the synthetic generator at
Kaggle's cardinalities (``scale=1``). Empty (missing) values of the real data are left out. Prints one
JSON line per field and a summary line (benchmarks/common.py).

``--fit`` finds, per field, the Zipf exponent (grid 0.50 to 2.50 in steps of 0.01) whose draws of as many
rows as the sample, at the Kaggle cardinality and with the generator's own sampler (mean over
``--fit-seeds`` draws), come closest to the sample in the shares of lookups taken by the 1, 10 and 100
most frequent values (sum of absolute differences), and prints the list that
``embcompress.data.synthetic.CRITEO_SAMPLE_SKEW`` holds.
"""

from __future__ import annotations

import argparse
from collections import Counter
from statistics import mean
from typing import Sequence

import numpy as np

from common import emit, log  # type: ignore[import-not-found]
from embcompress.data import make_synthetic
from embcompress.cli import skew_arg
from embcompress.data.synthetic import KAGGLE_CARDINALITIES, _zipf_ranks

FIELDS = 26
GROUPS = {"small (<= 30 values)": (0, 30), "mid (31-3,000)": (31, 3000), "large (> 3,000)": (3001, 10**12)}


def concentration(values: Sequence) -> dict[str, float]:
    counts = np.array(sorted(Counter(values).values(), reverse=True))
    n = counts.sum()
    return {"distinct": int(len(counts)), "repeat_share": float(counts[counts >= 2].sum() / n),
            "top1_share": float(counts[0] / n), "top10_share": float(counts[:10].sum() / n),
            "top100_share": float(counts[:100].sum() / n)}


FIT_KEYS = ("top1_share", "top10_share", "top100_share")


def fit_exponent(real: dict[str, float], cardinality: int, rows: int, seeds: int) -> float:
    """The exponent of the grid whose synthetic draws match ``real``'s top-k shares best."""
    best, best_err = 0.0, float("inf")
    for s in np.round(np.arange(0.5, 2.505, 0.01), 2):
        shares = np.zeros(len(FIT_KEYS))
        for seed in range(seeds):
            ranks = _zipf_ranks(np.random.default_rng([seed, cardinality]), cardinality, float(s), rows)
            c = concentration(ranks.tolist())
            shares += np.array([c[k] for k in FIT_KEYS]) / seeds
        err = float(np.abs(shares - np.array([real[k] for k in FIT_KEYS])).sum())
        if err < best_err:
            best, best_err = float(s), err
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", default="../shared/data/criteo_kaggle_sample_10k.tsv")
    ap.add_argument("--skew", type=skew_arg, default=1.1, help="the generator's Zipf exponent, or criteo-sample")
    ap.add_argument("--fit", action="store_true", help="fit one exponent per field to the sample (see above)")
    ap.add_argument("--fit-seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.sample) as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    real = [[r[14 + f] for r in rows if len(r) > 14 + f and r[14 + f]] for f in range(FIELDS)]
    if args.fit:
        fitted = []
        for f in range(FIELDS):
            fitted.append(fit_exponent(concentration(real[f]), KAGGLE_CARDINALITIES[f], len(rows), args.fit_seeds))
            log(f"C{f + 1}: exponent {fitted[-1]:.2f}")
        emit({"benchmark": "field_skew", "settings": vars(args), "rows": len(rows), "fitted_skew": fitted})
        return
    synth = make_synthetic(rows=len(rows), scale=1.0, skew=args.skew, seed=args.seed).sparse
    per_field = []
    for f in range(FIELDS):
        entry = {"field": f"C{f + 1}", "cardinality": KAGGLE_CARDINALITIES[f],
                 "real": concentration(real[f]), "synthetic": concentration(synth[:, f].tolist())}
        per_field.append(entry)
        r, s = entry["real"], entry["synthetic"]
        log(f"C{f + 1:<2} {KAGGLE_CARDINALITIES[f]:>9,} ids | top-10 share real {r['top10_share']:.2f} "
            f"synthetic {s['top10_share']:.2f} | top-100 {r['top100_share']:.2f} / {s['top100_share']:.2f}")
        emit({"benchmark": "field_skew", "settings": vars(args), "rows": len(rows), **entry})
    summary = {}
    for name, (lo, hi) in GROUPS.items():
        group = [e for e in per_field if lo <= e["cardinality"] <= hi]
        summary[name] = {"fields": [e["field"] for e in group], **{
            f"{side}_{key}": round(mean(e[side][key] for e in group), 3)
            for side in ("real", "synthetic") for key in ("top1_share", "top10_share", "top100_share", "repeat_share")}}
        log(f"{name}: {summary[name]}")
    emit({"benchmark": "field_skew", "settings": vars(args), "rows": len(rows), "summary": summary})


if __name__ == "__main__":
    main()
