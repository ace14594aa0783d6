"""Streaming preprocessor for generic delimited files (Avazu and the like).

Columns are named by header name, or by 0-based index when ``header=False``. Categorical values are
arbitrary strings (as bytes), numeric values are floats transformed like Criteo's dense features
(``log(1 + max(x, 0))``, empty = 0). Ids per column follow ``_pipeline``: 0 = OOV, then the kept values in
byte order (the empty string, when present and kept, is id 1). Quoted fields are allowed; quoted line
breaks inside a field are not (lines are cut at every newline). The file may be gzip- or
zstd-compressed.

Labels (:func:`label_of`): a click is ``1`` (also ``1.0``, ``+1``, ``true``), no click is ``0`` (``0.0``,
``false``) or ``-1``; case and surrounding spaces do not matter. One file may not use both ``0`` and
``-1``: with both, which one means "no click" is ambiguous, and it is refused.
"""

from __future__ import annotations

import csv as _csv
import logging
import math
import os
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ._pipeline import ParsedChunk, chunk_from_keys, count_lines, open_input, run_two_pass
from .errors import DataError

log = logging.getLogger(__name__)

Column = str | int


def _first_line(path: str | os.PathLike) -> tuple[bytes, int]:
    """The first line (without its line end) and the (uncompressed) byte offset just after it."""
    with open_input(path) as (fh, _):
        line = fh.readline()
    return line.rstrip(b"\r\n"), len(line)


_TRUE, _FALSE = {"1", "true", "+1"}, {"0", "false", "-1"}


def label_of(text: str | bytes) -> tuple[int, str] | None:
    """(0 or 1, the spelling's class) of a label value, or None when it is no label. The class is
    "-1" for minus one, "0" for every other "no click" spelling, "1" for a click; see the module
    docstring for the rule."""
    t = (text.decode("latin-1") if isinstance(text, bytes) else text).strip().lower()
    if t in _TRUE or t in _FALSE:
        return (1, "1") if t in _TRUE else (0, "-1" if t == "-1" else "0")
    try:
        x = float(t)
    except ValueError:
        return None
    return {1.0: (1, "1"), 0.0: (0, "0"), -1.0: (0, "-1")}.get(x)


class LabelRule:
    """Maps label values to 0/1 and refuses a file that spells "no click" both as 0 and as -1."""

    def __init__(self, column: str) -> None:
        self.column, self.seen = column, set()

    def __call__(self, values: list) -> np.ndarray | None:
        """0/1 of each value; None if one is not a label."""
        out = np.empty(len(values), dtype=np.float32)
        for i, v in enumerate(values):
            got = label_of(v)
            if got is None:
                return None
            out[i] = got[0]
            self.seen.add(got[1])
        if {"0", "-1"} <= self.seen:
            raise DataError(f"label column {self.column!r} uses both 0 and -1: which one means 'no click' is "
                            "ambiguous; write labels as 0/1, -1/1 or false/true.")
        return out


def _resolve(names: list[str], col: Column, header: bool) -> str:
    if isinstance(col, int) and not isinstance(col, bool):
        if not 0 <= col < len(names):
            raise DataError(f"Column index {col} is out of range: the file has {len(names)} columns.")
        return names[col]
    if col not in names:
        hint = "" if header else " (with header=False, name columns by 0-based index)"
        raise DataError(f"Column {col!r} is not in the file's header {names}{hint}.")
    return col


class CsvParser:
    """Parses chunks of whole lines of a delimited file with columns ``names``; ``label=None`` for rows
    without labels (labels come back NaN)."""

    def __init__(self, names: list[str], label: str | None, categorical: list[str], numeric: list[str],
                 delimiter: str):
        self.names, self.label, self.categorical, self.numeric = names, label, categorical, numeric
        self.delimiter = delimiter
        self.pos = {n: i for i, n in enumerate(names)}
        self.label_rule = LabelRule(label or "")
        types = {**({label: pa.dictionary(pa.int32(), pa.binary())} if label is not None else {}),
                 **{c: pa.float64() for c in numeric},
                 **{c: pa.dictionary(pa.int32(), pa.binary()) for c in categorical}}  # fmt: skip
        self.read_opts = dict(column_names=names, use_threads=True, block_size=1 << 22)
        self.parse_opts = pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False)
        self.convert_opts = pacsv.ConvertOptions(
            column_types=types, include_columns=[*types],
            null_values=[""], strings_can_be_null=False, quoted_strings_can_be_null=False, check_utf8=False,
        )  # fmt: skip

    def fast(self, buf: bytes, first_line: int = 1, lines: int | None = None) -> ParsedChunk | None:
        try:
            t = pacsv.read_csv(pa.BufferReader(pa.py_buffer(buf)), read_options=pacsv.ReadOptions(**self.read_opts),
                               parse_options=self.parse_opts, convert_options=self.convert_opts)  # fmt: skip
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        n = t.num_rows
        if n != (count_lines(buf) if lines is None else lines):
            return None
        if self.label is None:
            return self._chunk(t, n, np.full(n, np.nan, dtype=np.float32))
        lab = t.column(self.label).unify_dictionaries()
        if lab.null_count:
            return None
        labels = np.empty(0, dtype=np.float32)
        if n:
            mapped = self.label_rule(lab.chunk(0).dictionary.to_pylist())
            if mapped is None:
                return None
            labels = mapped[np.concatenate([ch.indices.to_numpy() for ch in lab.chunks])]
        return self._chunk(t, n, labels)

    def _chunk(self, t: pa.Table, n: int, labels: np.ndarray) -> ParsedChunk | None:
        raw = np.empty((n, len(self.numeric)), dtype=np.float64)
        for j, c in enumerate(self.numeric):
            raw[:, j] = t.column(c).fill_null(0.0).to_numpy()
        if not np.isfinite(raw).all():
            return None
        row_idx = np.empty((n, len(self.categorical)), dtype=np.int32)
        dicts = []
        for f, c in enumerate(self.categorical):
            enc = t.column(c).unify_dictionaries()
            d = enc.chunk(0).dictionary if enc.num_chunks else pa.array([], pa.binary())
            dicts.append(np.array(d.to_pylist(), dtype=np.bytes_) if len(d) else np.empty(0, dtype="S1"))
            row_idx[:, f] = np.concatenate([ch.indices.to_numpy() for ch in enc.chunks]) if n else []
        return ParsedChunk(labels.astype(np.float32), _transform(raw), dicts, row_idx)

    def _check(self, row: list[str]) -> str | None:
        if len(row) != len(self.names):
            return f"expected {len(self.names)} fields, found {len(row)}"
        if self.label is not None and label_of(row[self.pos[self.label]]) is None:
            return (f"label {self.label!r} must be 0/1, -1/1, 0.0/1.0 or false/true, found "
                    f"{row[self.pos[self.label]][:20]!r}")
        for c in self.numeric:
            v = row[self.pos[c]]
            if not v:
                continue
            try:
                ok = math.isfinite(float(v))
            except ValueError:
                ok = False
            if not ok:
                return f"column {c!r} must be a finite number or empty, found {v[:20]!r}"
        return None

    def slow(self, buf: bytes, first_line: int = 1, lines: int | None = None) -> ParsedChunk:
        text = buf.decode("latin-1").split("\n")  # latin-1 round-trips every byte
        if buf.endswith(b"\n"):
            text.pop()
        labels, raw, cats, bad = [], [], [], []
        for i, line in enumerate(text):
            row = next(_csv.reader([line.removesuffix("\r")], delimiter=self.delimiter), [])
            reason = self._check(row)
            if reason is not None:
                bad.append((first_line + i, reason))
                continue
            labels.append(self.label_rule([row[self.pos[self.label]]])[0] if self.label is not None else np.nan)
            raw.append([float(row[self.pos[c]] or 0.0) for c in self.numeric])
            cats.append([row[self.pos[c]].encode("latin-1") for c in self.categorical])
        n = len(labels)
        raw_arr = np.array(raw, dtype=np.float64).reshape(n, len(self.numeric))
        keys = [np.array([r[f] for r in cats], dtype=np.bytes_) if n else np.empty(0, "S1")
                for f in range(len(self.categorical))]  # fmt: skip
        return chunk_from_keys(np.array(labels, dtype=np.float32), _transform(raw_arr), keys, bad)


def _transform(raw: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(raw, 0.0)).astype(np.float32)


def preprocess_csv(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    label: Column,
    categorical: Sequence[Column],
    numeric: Sequence[Column] = (),
    delimiter: str = ",",
    header: bool = True,
    min_count: int = 1,
    skip_bad_lines: bool = False,
    progress: bool = True,
    chunk_rows: int = 500_000,
    overwrite: bool = False,
) -> dict:
    """Preprocess a delimited text file into a dataset directory with its feature map; see the module
    docstring. An existing dataset at ``out_dir`` is replaced only with ``overwrite``."""
    first, after_first = _first_line(path)
    split = next(_csv.reader([first.decode("utf-8", errors="replace")], delimiter=delimiter), [])
    names = split if header else [f"column_{i}" for i in range(len(split))]
    if header and len(set(names)) != len(names):
        raise DataError(f"The header of {path} has duplicate column names.")
    label_n = _resolve(names, label, header)
    cat_n = [_resolve(names, c, header) for c in categorical]
    num_n = [_resolve(names, c, header) for c in numeric]
    if len({label_n, *cat_n, *num_n}) != 1 + len(cat_n) + len(num_n):
        raise DataError("A column is named more than once among label, categorical and numeric.")
    if not cat_n:
        raise DataError("At least one categorical column is needed.")
    parser = CsvParser(names, label_n, cat_n, num_n, delimiter)
    meta = {"source": "csv", "path": os.path.abspath(path), "dense_names": num_n, "field_names": cat_n,
            "options": {"label": label_n, "delimiter": delimiter, "header": header, "min_count": min_count,
                        "skip_bad_lines": skip_bad_lines}}  # fmt: skip
    input_format = {"format": "csv", "delimiter": delimiter, "header": header, "columns": names, "label": label_n,
                    "categorical": cat_n, "numeric": num_n,
                    "labels": "1/0, 1/-1, 1.0/0.0 or true/false (not both 0 and -1)"}  # fmt: skip
    return run_two_pass(path, out_dir, parse_fast=parser.fast, parse_slow=parser.slow, num_dense=len(num_n),
                        num_fields=len(cat_n), min_count=min_count, chunk_rows=chunk_rows,
                        skip_bad_lines=skip_bad_lines, progress=progress, meta=meta, input_format=input_format,
                        start_offset=after_first if header else 0, first_line=2 if header else 1,
                        overwrite=overwrite)  # fmt: skip
