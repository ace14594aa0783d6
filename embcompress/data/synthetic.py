"""A Criteo-like synthetic data generator with a known answer (docs/design.md, "Data").

Every categorical field f has n_f ids (the Kaggle cardinalities times ``scale``). A row draws a popularity
rank per field from a truncated Zipf law (exponent ``skew``) and maps it to an id with a per-field affine
bijection, so that popularity is not id order. Labels come from a hidden factorisation machine: each
(field, id) has a first-order weight and a K-dim latent vector derived from a counter-based hash of
(seed, field, id), so 33.76M ids cost no memory; 13 dense features add a linear effect. The true click
probability is kept in ``Dataset.probs`` so tests and benchmarks know the Bayes-optimal AUC.

Rows are generated in fixed blocks, each with its own seeded stream, so row i is the same whatever
``rows`` is and whichever path (in memory or TSV) produced it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from .arrays import Dataset, sparse_dtype

log = logging.getLogger(__name__)

KAGGLE_CARDINALITIES: list[int] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip

BLOCK_ROWS = 1 << 16  # rows per independently seeded block
LATENT_DIM = 4
NUM_STAGES = 8  # drift stages by default: popularity changes at NUM_STAGES - 1 points along the rows
_TABLE_MAX = 1 << 20  # fields up to this size get precomputed weight tables; larger ones hash per row
# Hidden-model constants, tuned so the defaults give ~25% positives and a Bayes AUC near 0.8.
_BIAS = -1.45
_LIN_SCALE = 1.0
_FM_SCALE = 0.9
_DENSE_SCALE = 0.35

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash: splitmix64's finaliser, vectorised on uint64 (wrap-around intended)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: a bijection on uint32, used to turn ids into distinct hex strings."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x85EBCA6B)
        x ^= x >> np.uint32(13)
        x *= np.uint32(0xC2B2AE35)
        x ^= x >> np.uint32(16)
    return x


def _value_params(seed: int, f: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-order weight (len(ids),) and latent vectors (len(ids), K) of (field f, id), unit variance."""
    key = np.uint64((seed * 1_000_003 + f * 7919 + 1) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        h = _splitmix64(ids.astype(np.uint64) * np.uint64(0x100000001B3) ^ key)
        h2 = _splitmix64(h)
    # Four 16-bit lanes of h -> latent dims; a sum of two uniforms per dim looks roughly Gaussian.
    lanes = np.stack([(h >> np.uint64(16 * j)) & np.uint64(0xFFFF) for j in range(LATENT_DIM)], axis=1)
    lanes2 = np.stack([(h2 >> np.uint64(16 * j)) & np.uint64(0xFFFF) for j in range(LATENT_DIM)], axis=1)
    u = (lanes.astype(np.float32) + lanes2.astype(np.float32)) / 65535.0 - 1.0  # in [-1, 1], var 1/6
    v = u * np.float32(math.sqrt(6.0))
    w = ((h2 >> np.uint64(11)).astype(np.float64) / 2.0**53 * 2.0 - 1.0).astype(np.float32) * np.float32(math.sqrt(3.0))
    return w, v


# Per-field Zipf exponents fitted to the real Criteo Kaggle sample (../shared/data, 9,999 rows) by
# ``benchmarks/field_skew.py --fit``: for each field, the exponent whose 9,999 synthetic draws at the Kaggle
# cardinality come closest to the sample's shares of lookups taken by the 1, 10 and 100 most frequent
# values. The real mid-size fields (100-3,000 values) are far more concentrated than one exponent of 1.1
# makes them, and the large ones less (benchmarks/README.md, "field_skew.py").
CRITEO_SAMPLE_SKEW: list[float] = [
    2.01, 1.08, 1.03, 1.07, 2.5, 2.04, 0.81, 2.29, 2.5, 1.12, 0.84, 1.03, 0.85,
    1.51, 0.95, 1.04, 1.55, 0.99, 1.51, 0.65, 1.04, 1.98, 1.7, 1.16, 1.59, 1.07,
]  # fmt: skip
SKEW_PRESETS: dict[str, list[float]] = {"criteo-sample": CRITEO_SAMPLE_SKEW}

Skew = Union[float, str, Sequence[float]]


def resolve_skews(fields: int, skew: Skew) -> list[float]:
    """One Zipf exponent per field from ``skew``: a number (every field), a preset name of
    :data:`SKEW_PRESETS` (26 values, cycled past 26 fields like the cardinalities) or one value per field."""
    if isinstance(skew, str) and skew in SKEW_PRESETS:
        preset = SKEW_PRESETS[skew]
        skews = [float(preset[f % len(preset)]) for f in range(fields)]
    elif isinstance(skew, (str, int, float)):
        try:
            skews = [float(skew)] * fields
        except ValueError:
            raise ValueError(f"skew must be a number, one per field or one of {sorted(SKEW_PRESETS)}; "
                             f"got {skew!r}") from None
    else:
        skews = [float(x) for x in skew]
        if len(skews) != fields:
            raise ValueError(f"skew has {len(skews)} values for {fields} fields")
    if not all(x > 0 for x in skews):
        raise ValueError(f"skew must be positive, got {skew}")
    return skews


@dataclass
class SyntheticSpec:
    rows: int
    cardinalities: list[int]
    skew: list[float]  # per field
    drift: float
    seed: int
    dense: int
    drift_stages: int = NUM_STAGES  # equal stretches of rows; stage s >= 1 has its own popularity order

    @property
    def fields(self) -> int:
        return len(self.cardinalities)

    def field_rng(self, f: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 1, f])


def resolve_cardinalities(fields: int, scale: float, cardinalities: list[int] | None) -> list[int]:
    """Kaggle cardinalities (cycled past 26 fields) times ``scale``, at least 2 per field."""
    if cardinalities is not None:
        cards = [int(c) for c in cardinalities]
    else:
        cards = [max(2, int(round(KAGGLE_CARDINALITIES[f % 26] * scale))) for f in range(fields)]
    if any(c < 1 for c in cards):
        raise ValueError(f"every cardinality must be positive, got {cards}")
    return cards


class _HiddenModel:
    """Per-field constants of the generator: bijections, field importances, weight tables."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        F = spec.fields
        self.mult = np.empty(F, dtype=np.int64)
        self.offsets = np.empty((NUM_STAGES, F), dtype=np.int64)
        for f, n in enumerate(spec.cardinalities):
            a = int(rng.integers(1, max(n, 2)))
            while math.gcd(a, n) != 1:  # an affine map mod n is a bijection iff gcd(a, n) == 1
                a = a % n + 1
            self.mult[f] = a
            self.offsets[:, f] = rng.integers(0, n, size=NUM_STAGES)
        # Field importances vary over an order of magnitude so that some fields matter more.
        self.importance = np.exp(rng.normal(0.0, 0.6, size=F)).astype(np.float32)
        self.importance /= np.sqrt(np.mean(self.importance**2))
        self.dense_beta = rng.normal(0.0, 1.0, size=spec.dense).astype(np.float32)
        self.dense_mu = rng.uniform(0.5, 3.0, size=spec.dense)
        self.dense_sigma = rng.uniform(0.5, 1.5, size=spec.dense)
        self.dense_missing = rng.choice([0.0, 0.05, 0.2, 0.4], size=spec.dense, p=[0.4, 0.3, 0.2, 0.1])
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {
            f: _value_params(spec.seed, f, np.arange(n)) for f, n in enumerate(spec.cardinalities) if n <= _TABLE_MAX
        }

    def params(self, f: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if f in self.tables:
            w, v = self.tables[f]
            return w[ids], v[ids]
        return _value_params(self.spec.seed, f, ids)


def _zipf_ranks(rng: np.random.Generator, n: int, s: float, size: int) -> np.ndarray:
    """Ranks in [0, n) with P(r) roughly proportional to (r + 1)^-s, by the continuous inverse CDF."""
    u = rng.random(size)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1.0))
    else:
        e = 1.0 - s
        x = (1.0 - u * (1.0 - (n + 1.0) ** e)) ** (1.0 / e)
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def generate_block(model: _HiddenModel, block: int) -> dict[str, np.ndarray]:
    """Rows [block*BLOCK_ROWS, ...) clipped to spec.rows: raw dense ints with a missing mask, ids, labels,
    probabilities. Everything random comes from a stream seeded by (seed, block)."""
    spec = model.spec
    lo = block * BLOCK_ROWS
    hi = min(lo + BLOCK_ROWS, spec.rows)
    # Always draw a whole block and cut it afterwards, so that row i does not depend on ``rows``
    # (except through drift's stage boundaries, which are fractions of ``rows``).
    B, F, k = BLOCK_ROWS, spec.fields, LATENT_DIM
    rng = np.random.default_rng([spec.seed, 2, block])
    S = spec.drift_stages
    stage = np.minimum((np.arange(lo, lo + B, dtype=np.int64) * S) // max(spec.rows, 1), S - 1)
    ids = np.empty((B, F), dtype=np.int64)
    lin = np.zeros(B, dtype=np.float32)
    vsum = np.zeros((B, k), dtype=np.float32)
    vsq = np.zeros(B, dtype=np.float32)
    for f, n in enumerate(spec.cardinalities):
        r = _zipf_ranks(rng, n, spec.skew[f], B)
        # Drift: a row in stage s uses stage s's bijection with probability `drift`, else stage 0's.
        use_stage = np.where(rng.random(B) < spec.drift, stage, 0) if spec.drift > 0 else 0
        off = model.offsets[use_stage, f]
        ids[:, f] = (r * model.mult[f] + off) % n
        w, v = model.params(f, ids[:, f])
        a = model.importance[f]
        lin += a * w
        v = v * np.float32(math.sqrt(a))
        vsum += v
        vsq += np.einsum("bk,bk->b", v, v)
    z = rng.standard_normal((B, spec.dense))
    raw = np.floor(np.exp(model.dense_mu + model.dense_sigma * z)).astype(np.int64) - 1  # >= -1, like Kaggle
    missing = rng.random((B, spec.dense)) < model.dense_missing
    # FM pairwise term: sum_{f<g} <v_f, v_g> = (|sum v|^2 - sum |v|^2) / 2.
    fm = 0.5 * (np.einsum("bk,bk->b", vsum, vsum) - vsq)
    logit = (
        _BIAS
        + _LIN_SCALE * lin / math.sqrt(F)
        + _FM_SCALE * fm / math.sqrt(F * (F - 1) / 2 * k + 1e-9)
        + _DENSE_SCALE * (z.astype(np.float32) @ model.dense_beta) / math.sqrt(max(spec.dense, 1))
    )
    probs = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    labels = (rng.random(B) < probs).astype(np.float32)
    out = {"dense_raw": raw, "dense_missing": missing, "ids": ids, "labels": labels, "probs": probs}
    return {key: v[: hi - lo] for key, v in out.items()}


def dense_transform(raw: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """log(1 + max(x, 0)) as float32; missing values become 0 (shared with the Criteo reader)."""
    x = np.log1p(np.maximum(raw, 0).astype(np.float32))  # float32 throughout: the result is float32 anyway
    if missing is not None:
        x[missing] = 0.0
    return x


def _spec(rows: int, fields: int, scale: float, skew: Skew, drift: float, seed: int, dense: int,
          cardinalities: list[int] | None, drift_stages: int = NUM_STAGES) -> SyntheticSpec:  # fmt: skip
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be in [0, 1], got {drift}")
    if not 1 <= int(drift_stages) <= NUM_STAGES:
        raise ValueError(f"drift_stages must be in [1, {NUM_STAGES}], got {drift_stages}")
    cards = resolve_cardinalities(fields, scale, cardinalities)
    skews = resolve_skews(len(cards), skew)
    return SyntheticSpec(rows=int(rows), cardinalities=cards, skew=skews, drift=drift, seed=seed, dense=dense,
                         drift_stages=int(drift_stages))


def make_synthetic(
    rows: int = 200_000,
    fields: int = 26,
    scale: float = 0.01,
    skew: Skew = 1.1,
    drift: float = 0.0,
    seed: int = 0,
    dense: int = 13,
    cardinalities: list[int] | None = None,
    drift_stages: int = NUM_STAGES,
) -> Dataset:
    """An in-memory synthetic dataset. The defaults (scale 0.01: ~338k ids) suit a quick demo.

    With ``drift`` > 0 the rows fall into ``drift_stages`` equal stretches (at most ``NUM_STAGES``); in
    stretch s a row draws its ids through stretch s's popularity order with probability ``drift`` (else
    stretch 0's). ``drift_stages=2, drift=1`` is one complete change of the hot set halfway.
    """
    spec = _spec(rows, fields, scale, skew, drift, seed, dense, cardinalities, drift_stages)
    model = _HiddenModel(spec)
    F = spec.fields
    dense_arr = np.empty((spec.rows, dense), dtype=np.float32)
    sparse = np.empty((spec.rows, F), dtype=sparse_dtype(spec.cardinalities))
    labels = np.empty(spec.rows, dtype=np.float32)
    probs = np.empty(spec.rows, dtype=np.float32)
    for block in range(math.ceil(spec.rows / BLOCK_ROWS)):
        lo = block * BLOCK_ROWS
        out = generate_block(model, block)
        hi = lo + len(out["labels"])
        dense_arr[lo:hi] = dense_transform(out["dense_raw"], out["dense_missing"])
        sparse[lo:hi] = out["ids"]
        labels[lo:hi] = out["labels"]
        probs[lo:hi] = out["probs"]
    meta = {
        "source": "synthetic",
        "options": dict(rows=spec.rows, fields=F, scale=scale, skew=skew, drift=drift, seed=seed, dense=dense,
                        **({} if drift_stages == NUM_STAGES else {"drift_stages": int(drift_stages)})),
        "cardinalities": spec.cardinalities,
        "positive_rate": float(labels.mean()) if spec.rows else None,
    }
    return Dataset(dense=dense_arr, sparse=sparse, labels=labels, field_sizes=list(spec.cardinalities),
                   meta=meta, probs=probs)  # fmt: skip


def bayes_auc(data) -> float:
    """AUC of the true click probabilities against the labels: what a perfect model would score."""
    from sklearn.metrics import roc_auc_score  # sklearn is a dev/benchmark dependency, not a runtime one

    if data.probs is None:
        raise ValueError("this data has no true probabilities (only synthetic data does)")
    return float(roc_auc_score(np.asarray(data.labels), np.asarray(data.probs)))


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex8(values: np.ndarray) -> np.ndarray:
    """uint32 values -> (n, 8) uint8 array of lowercase hex digits (vectorised)."""
    v = values.astype(np.uint32)
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    return _HEX[(v[:, None] >> shifts) & np.uint32(0xF)]


def write_synthetic_tsv(
    path: str | os.PathLike,
    rows: int,
    fields: int = 26,
    scale: float = 0.01,
    skew: Skew = 1.1,
    drift: float = 0.0,
    seed: int = 0,
    dense: int = 13,
    cardinalities: list[int] | None = None,
    progress: bool = True,
    categorical_missing: float = 0.05,
    drift_stages: int = NUM_STAGES,
) -> dict:
    """Write the same rows as ``make_synthetic`` in raw Criteo format (label, dense ints, 8-hex
    categoricals). Some dense and categorical values are left empty (missingness is noise: the label
    does not see it). Each field's ids map to hex by a bijective 32-bit mixer, so distinct ids stay
    distinct. Returns a small summary dict."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from tqdm import tqdm

    spec = _spec(rows, fields, scale, skew, drift, seed, dense, cardinalities, drift_stages)
    model = _HiddenModel(spec)
    rng_missing = np.random.default_rng([seed, 3])
    cat_missing = np.where(rng_missing.random(spec.fields) < 0.3, categorical_missing * 4, 0.0)
    salts = rng_missing.integers(0, 2**32, size=spec.fields, dtype=np.uint64).astype(np.uint32)
    names = ["label"] + [f"I{j + 1}" for j in range(dense)] + [f"C{f + 1}" for f in range(spec.fields)]
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    tmp = f"{path}.part"
    positives = 0
    with open(tmp, "wb") as fh, tqdm(total=spec.rows, unit="rows", disable=not progress, desc="synth tsv") as bar:
        for block in range(math.ceil(spec.rows / BLOCK_ROWS)):
            out = generate_block(model, block)
            B = len(out["labels"])
            blk_rng = np.random.default_rng([seed, 4, block])
            cols = [pa.array(out["labels"].astype(np.int8))]
            for j in range(dense):
                cols.append(pa.array(out["dense_raw"][:, j], mask=out["dense_missing"][:, j]))
            for f in range(spec.fields):
                with np.errstate(over="ignore"):
                    code = _fmix32(out["ids"][:, f].astype(np.uint32) ^ salts[f])
                hexes = np.ascontiguousarray(hex8(code)).view("S8").ravel()
                miss = blk_rng.random(B) < cat_missing[f]
                cols.append(pa.array(hexes, type=pa.binary(8), mask=miss).cast(pa.string()))
            pacsv.write_csv(pa.Table.from_arrays(cols, names=names), fh, opts)
            positives += int(out["labels"].sum())
            bar.update(B)
    os.replace(tmp, path)
    return {"rows": spec.rows, "positive_rate": positives / max(spec.rows, 1), "cardinalities": spec.cardinalities}
