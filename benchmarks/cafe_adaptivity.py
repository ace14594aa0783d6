"""CAFE adaptivity: the hot set changes halfway through a stream; does CAFE follow it, and its AUC recover?

    PYTHONPATH=. .venv/bin/python benchmarks/cafe_adaptivity.py                        # sketch part, ~1 minute
    PYTHONPATH=. .venv/bin/python benchmarks/cafe_adaptivity.py --no-sketch --dlrm --threads 1   # DLRM part

Sketch part: two Zipf regimes over independent popularity orders (the new hot ids are mostly cold ids of
the first regime), batches of ``--batch`` frequency scores (one training step each); we report after each
step of the second regime the fraction of its true top-k that is hot, and the first step where it reaches
80%, for each decay and with the pressure rule on and off (off: the paper's mass rule alone).

DLRM part (``--dlrm``): progressive ("test-then-train") AUC on a synthetic stream whose popularity changes
once, halfway (``make_synthetic(drift=1, drift_stages=2)``: every field's ids are drawn through a new
popularity order from row ``rows/2`` on). DLRM trains one pass in time order (Adagrad, the loop's
defaults); each batch is scored by the training forward *before* the optimizer step on it (DLRM has no
dropout or batch norm, and a CAFE forward only queries its sketch, so these are exactly the predictions of
the model trained on all earlier rows). Per window of ``--window`` consecutive rows we report the AUC, the
Bayes AUC of the generator's true probabilities on the same rows (the regimes may differ in difficulty)
and their gap; for cafe also the share of lookups of hashed fields served by hot rows, and the fraction
of each regime's true top-k ids (k = hot rows; counted over that regime's rows, hashed fields only) that is
hot at the end of the window.

"Recovers" is measured as: the reference gap is the mean Bayes gap of the last ``--ref-windows`` windows of
the first regime; the AUC has recovered at the first window of the second regime from which on every
window's gap is within ``--tolerance`` of the reference. We report that window and the rows after the
change up to its end (None: it did not recover). Prints JSON lines (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import emit, log  # type: ignore[import-not-found]
from embcompress.embeddings.hotsketch import HotSketch

# Table configurations of the DLRM part: name -> (method, options).
CONFIGS = {
    "hash": ("hash", {}),
    "cafe": ("cafe", {}),
    "cafe-rules": ("cafe", {"pressure_decay": False, "preempt": False}),  # the paper's rules alone
    "cafe-freq": ("cafe", {"importance": "frequency"}),
    "full": ("full", {}),
}


def regime(n: int, universe: int, exponent: float, rng: np.random.Generator) -> torch.Tensor:
    p = np.arange(1, universe + 1, dtype=np.float64) ** -exponent
    order = rng.permutation(universe)  # rank -> id
    return torch.from_numpy(order[rng.choice(universe, size=n, p=p / p.sum())])


def sketch_run(first: torch.Tensor, second: torch.Tensor, new_top: torch.Tensor, k: int, threshold: float,
               args: argparse.Namespace, decay: float, pressure: bool) -> dict:
    sk = HotSketch(int(k * args.buckets_per_row), k, threshold, decay=decay, decay_mass=args.decay_mass,
                   pressure_decay=pressure, preempt=pressure)
    for b in first.split(args.batch):
        sk.insert(b)
    old_hot = sk.num_hot()
    curve, reached, migrations = [], None, 0
    for step, b in enumerate(second.split(args.batch), 1):
        up = sk.insert(b)
        migrations += up.promoted_ids.numel()
        frac = float((sk.query(new_top)[0] >= 0).float().mean())
        curve.append(round(frac, 3))
        if reached is None and frac >= 0.8:
            reached = step
    return {"decay": decay, "pressure_rule": pressure, "hot_before_switch": old_hot,
            "steps_to_80pct_new_topk_hot": reached, "final_fraction": curve[-1],
            "promotions_after_switch": migrations, "curve_every_25_steps": curve[::25]}


def regime_top(sparse: np.ndarray, starts: np.ndarray, hashed: np.ndarray, k: int) -> torch.Tensor:
    """The k most frequent global ids of hashed fields in ``sparse`` (rows, F) local ids."""
    ids = (sparse[:, hashed].astype(np.int64) + starts[hashed]).ravel()
    uniq, counts = np.unique(ids, return_counts=True)
    return torch.from_numpy(uniq[np.argsort(-counts, kind="stable")[:k]])


def dlrm_stream(ds, name: str, args: argparse.Namespace) -> dict:
    """One pass of test-then-train over ``ds``; per-window AUC (and, for cafe, hot-row statistics)."""
    from embcompress.train.loop import TrainConfig, build_model, build_optimizers

    method, mopts = CONFIGS[name]
    cfg = TrainConfig(method=method, compression=None if method == "full" else args.dlrm_ratio,
                      method_options=mopts, batch_size=args.dlrm_batch, lr=args.lr, seed=args.dlrm_seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds)
    opts = build_optimizers(model, cfg)  # Adagrad; embcompress.attach hooks the table onto it
    table = model.embedding
    cafe = method == "cafe"
    rows, window, half = len(ds.labels), args.window, len(ds.labels) // 2
    starts = np.concatenate([[0], np.cumsum(ds.field_sizes)[:-1]]).astype(np.int64)
    hashed = np.zeros(len(ds.field_sizes), dtype=bool)
    tops: dict[str, torch.Tensor] = {}
    if cafe:
        hashed = (table.rows < table.sizes).numpy()
        k = table.num_hot_rows
        tops = {"old": regime_top(ds.sparse[:half], starts, hashed, k),
                "new": regime_top(ds.sparse[half:], starts, hashed, k)}
    preds = np.empty(rows, dtype=np.float32)
    hot_share: list[float] = []  # per window, from the table's training_stats()
    frac_hot: dict[str, list[float]] = {key: [] for key in tops}
    model.train()
    start = time.perf_counter()
    for lo in range(0, rows, args.dlrm_batch):
        hi = min(lo + args.dlrm_batch, rows)
        dense = torch.from_numpy(ds.dense[lo:hi])
        sparse = torch.from_numpy(ds.sparse[lo:hi].astype(np.int64))
        labels = torch.from_numpy(ds.labels[lo:hi])
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        logits = model(dense, sparse)
        preds[lo:hi] = torch.sigmoid(logits.detach()).numpy()  # scored before training on this batch
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        for opt in opts:
            opt.step()
        if cafe and hi % window == 0:
            hot_share.append(table.training_stats()["hot_share"])  # the window's hashed-field lookups
            for key, top in tops.items():
                frac_hot[key].append(round(float((table.sketch.query(top)[0] >= 0).float().mean()), 3))
    seconds = time.perf_counter() - start
    from sklearn.metrics import roc_auc_score

    windows = []
    for w, lo in enumerate(range(0, rows - window + 1, window)):
        y, p, q = ds.labels[lo:lo + window], preds[lo:lo + window], ds.probs[lo:lo + window]
        auc, bayes = float(roc_auc_score(y, p)), float(roc_auc_score(y, q))
        rec = {"window": w, "regime": 1 + int(lo >= half), "auc": round(auc, 4), "bayes_auc": round(bayes, 4),
               "gap": round(bayes - auc, 4)}
        if cafe:
            rec["hot_share"] = round(hot_share[w], 3)
            rec.update({f"{key}_topk_hot": frac_hot[key][w] for key in frac_hot if w < len(frac_hot[key])})
        windows.append(rec)
    out = {"config": name, "method": method, "options": mopts, "samples_per_s": round(rows / seconds),
           "seconds": round(seconds, 1), "windows": windows}
    if hasattr(table, "memory_bytes"):
        out["ratio_actual"] = round(sum(ds.field_sizes) * table.embedding_dim * 4 / table.memory_bytes(), 1)
    if cafe:
        out["hot_rows"], out["threshold"] = table.num_hot_rows, float(table.sketch.threshold)
    return out


def first_sustained(ok: list[bool]) -> int | None:
    """Index of the first True from which all are True (None if the last is False)."""
    return next((i for i in range(len(ok)) if all(ok[i:])), None)


def recovery(windows: list[dict], args: argparse.Namespace) -> dict:
    """The reference gap (end of regime 1) and the first regime-2 window from which every gap is within
    ``tolerance`` of it (rows after the change until the end of that window); None if never. With a
    no-change control, the same against the control's gap on the same window (``excess``)."""
    first = [w for w in windows if w["regime"] == 1]
    second = [w for w in windows if w["regime"] == 2]
    ref = float(np.mean([w["gap"] for w in first[-args.ref_windows:]]))
    at = first_sustained([w["gap"] <= ref + args.tolerance for w in second])
    out = {"ref_gap": round(ref, 4), "tolerance": args.tolerance,
           "gap_first_window_after_change": second[0]["gap"] if second else None,
           "gap_end_of_regime2": round(float(np.mean([w["gap"] for w in second[-args.ref_windows:]])), 4),
           "recovered_window": None if at is None else second[at]["window"],
           "rows_to_recover": None if at is None else (at + 1) * args.window}
    if second and "excess" in second[0]:
        at = first_sustained([w["excess"] <= args.tolerance for w in second])
        out.update({"excess_end_of_regime2": round(float(np.mean([w["excess"] for w in second[-args.ref_windows:]])), 4),
                    "recovered_vs_control_window": None if at is None else second[at]["window"],
                    "rows_to_recover_vs_control": None if at is None else (at + 1) * args.window})
    return out


def dlrm_part(args: argparse.Namespace) -> None:
    from embcompress.data import make_synthetic

    logging.basicConfig(level=logging.WARNING)
    torch.sparse.check_sparse_tensor_invariants.disable()  # as the loop does: our tables build valid ones
    if args.window % args.dlrm_batch:
        raise SystemExit("--window must be a multiple of --dlrm-batch (windows are whole batches)")
    rows = 2 * args.regime_windows * args.window  # the change falls on a window boundary
    data_opts = {"rows": rows, "scale": args.dlrm_scale, "drift": 1.0, "drift_stages": 2, "seed": args.dlrm_seed}
    ds = make_synthetic(**data_opts)
    # The no-change control: drift_stages=1 draws the same random numbers, so its first half is the same
    # rows (and the same training run); its second half continues the first regime.
    control = make_synthetic(**{**data_opts, "drift_stages": 1}) if args.control else None
    if control is not None:
        assert np.array_equal(control.sparse[: rows // 2], ds.sparse[: rows // 2])
    settings = {k: v for k, v in vars(args).items()
                if k.startswith(("dlrm", "window", "regime", "ref", "tol", "lr", "control", "configs", "threads"))}
    for name in args.configs.split(","):
        r = dlrm_stream(ds, name, args)
        if control is not None:
            c = dlrm_stream(control, name, args)
            for w, cw in zip(r["windows"], c["windows"]):
                w["control_gap"] = cw["gap"]
                w["excess"] = round(w["gap"] - cw["gap"], 4)
                if "hot_share" in cw:
                    w["control_hot_share"] = cw["hot_share"]
            r["control_samples_per_s"] = c["samples_per_s"]
        r.update(recovery(r["windows"], args))
        log(f"{name}: {r['samples_per_s']} rows/s, ref gap {r['ref_gap']}, first gap after change "
            f"{r['gap_first_window_after_change']}, end gap {r['gap_end_of_regime2']}, recovered at window "
            f"{r['recovered_window']} ({r['rows_to_recover']} rows); excess over control at the end "
            f"{r.get('excess_end_of_regime2')}, recovered vs control at window {r.get('recovered_vs_control_window')}")
        emit({"benchmark": "cafe_adaptivity_dlrm", "settings": settings, "data": data_opts,
              "field_ids": int(sum(ds.field_sizes)), **r})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="steps per regime")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--universe", type=int, default=500_000)
    ap.add_argument("--exponent", type=float, default=1.1)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--buckets-per-row", type=float, default=1.0)
    ap.add_argument("--decays", default="0.98,0.99")
    ap.add_argument("--decay-mass", type=float, default=10.0)
    ap.add_argument("--threshold", type=float, default=None, help="default: half the k-th count of a regime")
    ap.add_argument("--no-sketch", action="store_true", help="skip the sketch part")
    ap.add_argument("--dlrm", action="store_true", help="run the DLRM part (progressive AUC)")
    ap.add_argument("--configs", default="hash,cafe,cafe-rules", help=f"of {','.join(CONFIGS)}")
    ap.add_argument("--window", type=int, default=32_768, help="rows per AUC window")
    ap.add_argument("--regime-windows", type=int, default=10, help="windows per regime (rows = 2 x this x window)")
    ap.add_argument("--dlrm-scale", type=float, default=0.05)
    ap.add_argument("--dlrm-ratio", type=float, default=1000)
    ap.add_argument("--dlrm-batch", type=int, default=128)
    ap.add_argument("--dlrm-seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.05, help="Adagrad learning rate (the loop's default)")
    ap.add_argument("--ref-windows", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the no-change control run of each config (halves the time)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_sketch:
        sketch_part(args)
    if args.dlrm:
        dlrm_part(args)


def sketch_part(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    first, second = regime(n, args.universe, args.exponent, rng), regime(n, args.universe, args.exponent, rng)
    uniq, counts = torch.unique(second, return_counts=True)
    top = torch.argsort(counts, descending=True)[: args.k]
    threshold = args.threshold or counts[top[-1]].item() / 2
    runs = [sketch_run(first, second, uniq[top], args.k, threshold, args, float(d), p)
            for d in args.decays.split(",") for p in (True, False)]
    for r in runs:
        log(str({k: v for k, v in r.items() if k != "curve_every_25_steps"}))
    emit({"benchmark": "cafe_adaptivity", "settings": {**vars(args), "threshold": threshold}, "runs": runs})


if __name__ == "__main__":
    main()
