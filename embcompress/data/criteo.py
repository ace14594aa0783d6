"""Reader and streaming preprocessor for the raw Criteo format (Kaggle Display Advertising, Terabyte).

A line is 40 tab-separated fields: ``label, I1..I13, C1..C26``. Integer fields may be empty or negative;
categorical fields are 8-digit hex strings or empty. Lines end in LF or CRLF; the last may lack one.
Dense features become float32 ``log(1 + max(x, 0))`` (empty = 0). Categorical hex strings are decoded to
their 32-bit value; an empty categorical is its own value (key -1), see ``_pipeline`` for the id order.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ._pipeline import ParsedChunk, chunk_from_keys, count_lines, run_two_pass
from .synthetic import dense_transform

log = logging.getLogger(__name__)

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_CATEGORICAL
COLUMN_NAMES = ["label"] + [f"I{i}" for i in range(1, NUM_DENSE + 1)] + [f"C{i}" for i in range(1, NUM_CATEGORICAL + 1)]
EMPTY_KEY = -1
INPUT_FORMAT = {"format": "criteo", "delimiter": "\t", "header": False, "columns": COLUMN_NAMES, "label": "label",
                "labels": "0 or 1", "categorical": "8-digit hex (either case) or empty",
                "dense": "integer or empty"}  # fmt: skip

# Hex digit value of each byte, 255 for a byte that is not a hex digit.
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
_POW16 = (16 ** np.arange(7, -1, -1)).astype(np.int64)

_INT_RE = re.compile(rb"[+-]?[0-9]{1,18}")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{8}")

_READ_OPTS = dict(use_threads=True, block_size=1 << 22)
_PARSE_OPTS = pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=False)
_CONVERT_OPTS = pacsv.ConvertOptions(
    column_types={"label": pa.int64(), **{f"I{i}": pa.int64() for i in range(1, 14)},
                  # Dictionary-typed: arrow hashes the values while parsing, cheaper than encoding after.
                  **{f"C{i}": pa.dictionary(pa.int32(), pa.binary()) for i in range(1, 27)}},  # fmt: skip
    null_values=[""],
    strings_can_be_null=False,
    check_utf8=False,
)


def decode_hex8(arr: pa.Array) -> np.ndarray | None:
    """Keys of a binary array of 8-hex strings or empties (empty -> -1); None if any value is malformed."""
    arr = arr.cast(pa.binary()) if arr.type != pa.binary() else arr
    n = len(arr)
    _, offs_buf, data_buf = arr.buffers()
    offs = np.frombuffer(offs_buf, dtype=np.int32)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    lens = np.diff(offs)
    full = lens == 8
    if not np.all(full | (lens == 0)):
        return None
    keys = np.full(n, EMPTY_KEY, dtype=np.int64)
    starts = offs[:-1][full]
    nib = _NIBBLE[data[starts[:, None] + np.arange(8)]]  # (m, 8)
    if nib.size and nib.max() == 255:
        return None
    keys[full] = nib.astype(np.int64) @ _POW16
    return keys


def parse_chunk_fast(buf: bytes, first_line: int = 1, lines: int | None = None,
                     has_label: bool = True) -> ParsedChunk | None:
    """Vectorised parse of whole lines; None when anything is off (the caller then re-scans slowly).
    ``has_label=False``: lines without the label column (39 fields); labels come back NaN."""
    names = COLUMN_NAMES if has_label else COLUMN_NAMES[1:]
    try:
        table = pacsv.read_csv(pa.BufferReader(pa.py_buffer(buf)),
                               read_options=pacsv.ReadOptions(column_names=names, **_READ_OPTS),
                               parse_options=_PARSE_OPTS, convert_options=_CONVERT_OPTS)  # fmt: skip
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    n = table.num_rows
    if n != (count_lines(buf) if lines is None else lines):  # e.g. a stray CR that arrow took for a line end
        return None
    if has_label:
        label = table.column("label")
        if label.null_count:
            return None
        labels = label.to_numpy()
        if n and (labels.min() < 0 or labels.max() > 1):
            return None
    else:
        labels = np.full(n, np.nan, dtype=np.float32)
    raw = np.empty((n, NUM_DENSE), dtype=np.int64)
    for j in range(NUM_DENSE):
        raw[:, j] = table.column(f"I{j + 1}").fill_null(0).to_numpy()
    row_idx = np.empty((n, NUM_CATEGORICAL), dtype=np.int32)
    dicts = []
    for f in range(NUM_CATEGORICAL):
        # Each parsed block has its own dictionary; unify them so the chunk has one per field.
        enc = table.column(f"C{f + 1}").unify_dictionaries()
        dictionary = enc.chunk(0).dictionary if enc.num_chunks else pa.array([], pa.binary())
        keys = decode_hex8(dictionary)
        if keys is None:
            return None
        dicts.append(keys)
        row_idx[:, f] = np.concatenate([c.indices.to_numpy() for c in enc.chunks]) if n else []
    return ParsedChunk(labels.astype(np.float32), dense_transform(raw), dicts, row_idx)


def _check_line(fields: list[bytes], has_label: bool = True) -> str | None:
    """Why a split line is malformed, or None (``fields`` has a label in front; without one, a dummy)."""
    if len(fields) != NUM_COLUMNS:
        given = len(fields) - (0 if has_label else 1)
        return f"expected {NUM_COLUMNS - (0 if has_label else 1)} tab-separated fields, found {given}"
    if has_label and fields[0] not in (b"0", b"1"):
        return f"label must be 0 or 1, found {fields[0][:20]!r}"
    for j in range(1, 1 + NUM_DENSE):
        v = fields[j]
        if v and not _INT_RE.fullmatch(v):
            if re.fullmatch(rb"[+-]?[0-9]+", v):
                return f"I{j} value {v[:30]!r} is too large: dense values may have at most 18 digits"
            return f"I{j} must be an integer or empty, found {v[:20]!r}"
    for f in range(NUM_CATEGORICAL):
        v = fields[1 + NUM_DENSE + f]
        if v and not _HEX_RE.fullmatch(v):
            return f"C{f + 1} must be an 8-digit hex string or empty, found {v[:20]!r}"
    return None


def parse_chunk_slow(buf: bytes, first_line: int = 1, has_label: bool = True) -> ParsedChunk:
    """Line-by-line parse that records (line number, reason) for every malformed line and keeps the rest."""
    lines = buf.split(b"\n")
    if buf.endswith(b"\n"):
        lines.pop()
    labels, dense, cats, bad = [], [], [], []
    for i, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = line[:-1]
        fields = line.split(b"\t") if has_label else [b""] + line.split(b"\t")
        reason = _check_line(fields, has_label)
        if reason is not None:
            bad.append((first_line + i, reason))
            continue
        labels.append(int(fields[0]) if has_label else np.nan)
        dense.append([int(v) if v else 0 for v in fields[1 : 1 + NUM_DENSE]])
        cats.append([int(v, 16) if v else EMPTY_KEY for v in fields[1 + NUM_DENSE :]])
    n = len(labels)
    raw = np.array(dense, dtype=np.int64).reshape(n, NUM_DENSE)
    keys = np.array(cats, dtype=np.int64).reshape(n, NUM_CATEGORICAL)
    return chunk_from_keys(np.array(labels, dtype=np.float32), dense_transform(raw),
                           [keys[:, f] for f in range(NUM_CATEGORICAL)], bad)  # fmt: skip


def preprocess_criteo(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    min_count: int = 1,
    chunk_rows: int = 500_000,
    skip_bad_lines: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Preprocess a raw Criteo TSV (plain, gzip or zstd) into a dataset directory (see ``arrays``) with
    its feature map (``features``), streaming in chunks of about ``chunk_rows`` lines. Per field, ids are
    0 = OOV (values seen fewer than ``min_count`` times), then the kept values (empty first, then by hex
    value). A malformed line raises ``DataError`` naming the file and line, or with ``skip_bad_lines`` is
    dropped and counted. An existing dataset at ``out_dir`` is replaced only with ``overwrite``. Returns
    statistics (also in meta.json)."""
    meta = {"source": "criteo", "path": os.path.abspath(path),
            "options": {"min_count": min_count, "skip_bad_lines": skip_bad_lines},
            "dense_names": COLUMN_NAMES[1:14], "field_names": COLUMN_NAMES[14:]}  # fmt: skip
    return run_two_pass(path, out_dir, parse_fast=parse_chunk_fast, parse_slow=parse_chunk_slow,
                        num_dense=NUM_DENSE, num_fields=NUM_CATEGORICAL, min_count=min_count,
                        chunk_rows=chunk_rows, skip_bad_lines=skip_bad_lines, progress=progress, meta=meta,
                        input_format=INPUT_FORMAT, overwrite=overwrite)  # fmt: skip
