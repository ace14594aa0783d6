"""The feature map: what turns a raw row into the ids and dense values a model was trained on.

It lives in a dataset directory written by a preprocessor and is copied into every run directory, so a
trained model can score new raw rows without the training data. On disk (format in ``docs/data.md``):

``features.json``   field names and sizes, dense column names and their transform, how raw input is read
                    (Criteo TSV or CSV columns, delimiter, header, label rule), and the vocabulary rule.
``vocab/NN.parquet`` one file per categorical field NN (0-based, two digits or more), one column: the kept
                    raw values in id order, row i holding the value of id i + 1 (id 0 is out-of-vocabulary).
                    Criteo: column ``key`` int64, the 8-digit hex value as a number (upper- and lower-case
                    hex are the same number), -1 for the empty value. CSV: column ``value`` binary, the
                    field's bytes as written (the empty string is a value).

A dataset without raw input (synthetic data, ``save_dataset``) has a feature map without vocabularies:
its ids are the values.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError, read_json

FEATURES_FILE = "features.json"
VOCAB_DIR = "vocab"
FORMAT = "embcompress-features"
VERSION = 1
DENSE_TRANSFORM = "log(1 + max(x, 0)), empty = 0"
VOCAB_RULE = {
    "oov_id": 0,
    "order": "id 0 is out-of-vocabulary; the kept values (seen at least min_count times in the preprocessed "
             "file) follow in sorted order as ids 1..n",
    "empty": "the empty value is a value like any other (it means 'missing'); it sorts first, so when kept "
             "it is id 1",
    "unseen": "a value not in the vocabulary (unseen, or seen fewer than min_count times) maps to id 0",
}


def _vocab_name(field: int) -> str:
    return f"{VOCAB_DIR}/{field:02d}.parquet"


def write_feature_map(out_dir: str | os.PathLike, *, source: str, field_names: Sequence[str],
                      field_sizes: Sequence[int], dense_names: Sequence[str], input_format: dict[str, Any] | None,
                      vocabs: Sequence[np.ndarray] | None = None, min_count: int | None = None) -> dict[str, Any]:
    """Write ``features.json`` (and ``vocab/`` when ``vocabs`` is given: sorted int64 keys or bytes per
    field) into ``out_dir``; returns the JSON written."""
    out = Path(out_dir)
    fmap: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "source": source,
        "field_names": list(field_names), "field_sizes": [int(s) for s in field_sizes],
        "dense_names": list(dense_names), "num_dense": len(dense_names),
        "dense_transform": DENSE_TRANSFORM if input_format else None,
        "input": input_format, "vocabulary": None,
    }
    if vocabs is not None:
        (out / VOCAB_DIR).mkdir(exist_ok=True)
        files = []
        for f, keys in enumerate(vocabs):
            name = _vocab_name(f)
            col = "key" if keys.dtype.kind == "i" else "value"
            arr = pa.array(keys.astype(np.int64)) if col == "key" else pa.array(keys.tolist(), type=pa.binary())
            pq.write_table(pa.table({col: arr}), out / name, compression="zstd")
            files.append(name)
        fmap["vocabulary"] = {**VOCAB_RULE, "min_count": min_count, "files": files,
                              "key": "criteo-hex32" if source == "criteo" else "bytes"}
    (out / FEATURES_FILE).write_text(json.dumps(fmap, indent=1) + "\n")
    return fmap


def read_feature_map(directory: str | os.PathLike) -> dict[str, Any]:
    """``features.json`` of a dataset or run directory; DataError when missing or not one."""
    path = Path(directory) / FEATURES_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist: {directory} has no feature map (preprocessed or trained "
                        "by an older version?).")
    fmap = read_json(path)
    if not isinstance(fmap, dict) or fmap.get("format") != FORMAT:
        raise DataError(f"{path} is not an embcompress feature map.")
    if fmap.get("version") != VERSION:
        raise DataError(f"{path} has version {fmap.get('version')!r}; this code reads {VERSION}.")
    return fmap


def load_vocabularies(directory: str | os.PathLike, fmap: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Each field's kept values in id order (value of id i + 1 at position i): int64 keys for Criteo,
    bytes (numpy ``S`` arrays, the order the preprocessor sorted them in) for CSV."""
    root = Path(directory)
    fmap = fmap or read_feature_map(root)
    if not fmap.get("vocabulary"):
        raise DataError(f"{root} has no vocabularies: its data had no raw values (synthetic or arrays).")
    out = []
    for name in fmap["vocabulary"]["files"]:
        path = root / name
        try:
            col = pq.read_table(path).column(0)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read vocabulary {path}: {exc}.") from exc
        if pa.types.is_integer(col.type):
            out.append(col.to_numpy().astype(np.int64))
        else:
            values = col.to_pylist()
            out.append(np.array(values, dtype=np.bytes_) if values else np.empty(0, dtype="S1"))
    if len(out) != len(fmap["field_sizes"]) or any(len(v) + 1 != s for v, s in zip(out, fmap["field_sizes"])):
        raise DataError(f"the vocabularies in {root} do not match the field sizes in its {FEATURES_FILE}.")
    return out


def feature_map_of(dataset: Any) -> dict[str, Any]:
    """The feature map of a ``Dataset``: its directory's ``features.json`` when it has one, else one made
    from its field sizes and dense count (no vocabularies, no raw input)."""
    root, meta = getattr(dataset, "root", None), dataset.meta or {}
    if root is not None and (Path(root) / FEATURES_FILE).is_file():
        return read_feature_map(root)
    sizes = [int(s) for s in dataset.field_sizes]
    dense = meta.get("dense_names") or [f"dense_{i}" for i in range(int(dataset.num_dense))]
    return {"format": FORMAT, "version": VERSION, "source": meta.get("source", "arrays"),
            "field_names": meta.get("field_names") or [f"field_{i}" for i in range(len(sizes))],
            "field_sizes": sizes, "dense_names": list(dense), "num_dense": len(dense), "dense_transform": None,
            "input": None, "vocabulary": None}


def copy_feature_map(dataset: Any, run_dir: str | os.PathLike) -> None:
    """Give a run directory the feature map of the dataset it trains on (``dataset`` is a ``Dataset``):
    ``features.json`` plus its vocabularies, so the run loads and scores raw rows on its own."""
    run = Path(run_dir)
    root = getattr(dataset, "root", None)
    fmap = feature_map_of(dataset)
    if [int(s) for s in fmap["field_sizes"]] != [int(s) for s in dataset.field_sizes]:
        raise DataError(f"the feature map of {root} does not match its arrays' field sizes.")
    _write_copy(fmap, root, run)


def copy_run_features(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the feature map of a run (or dataset) directory ``src`` into ``dst``, e.g. a run derived from
    another one, so that ``dst`` loads and scores raw rows on its own."""
    _write_copy(read_feature_map(src), src, Path(dst))


def _write_copy(fmap: dict[str, Any], src: str | os.PathLike | None, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    if fmap.get("vocabulary"):
        staging = dst / f".{VOCAB_DIR}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(Path(src) / VOCAB_DIR, staging)
        shutil.rmtree(dst / VOCAB_DIR, ignore_errors=True)
        os.replace(staging, dst / VOCAB_DIR)
    (dst / f".{FEATURES_FILE}.tmp").write_text(json.dumps(fmap, indent=1) + "\n")
    os.replace(dst / f".{FEATURES_FILE}.tmp", dst / FEATURES_FILE)
