"""Compiled CPU kernels (``hotsketch_native.cpp``), built with the system C++ compiler on first use.

The library is plain C ABI (no PyTorch headers, so no ninja and a one-second build), compiled with
``$CXX`` (default ``g++``) ``-O3 -std=c++17 -shared -fPIC`` into ``$EMBCOMPRESS_NATIVE_DIR`` (default
``~/.cache/embcompress/native``), under a name that carries a hash of the source and the compiler
flags, so an edited source is rebuilt and concurrent first uses do not clash (each writes a temporary
file and renames it). Its functions are registered as PyTorch custom ops (``torch.library``):
``torch.ops.embcompress.hotsketch_insert``, ``hotsketch_locate``, ``hotsketch_query`` (HotSketch) and ``cms_add``,
``cms_estimate`` (mpcache's count-min sketch). Where no compiler exists or the build
fails, :func:`library` returns None and the callers keep their vectorised PyTorch path, which is also
the reference the compiled kernels are tested against. ``EMBCOMPRESS_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("hotsketch_native.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
_state: dict[str, object] = {}
_buffers = threading.local()  # per thread: calls from two threads never share a buffer


def enabled() -> bool:
    return os.environ.get("EMBCOMPRESS_NATIVE", "1") != "0"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embcompress" / "native"
    return Path(os.environ.get("EMBCOMPRESS_NATIVE_DIR", default))


def build(directory: Path | None = None, source: Path = SOURCE) -> Path:
    """Compile ``source`` (default: this library; also ``mpcache_native.cpp``) if not built yet and return
    its path; raises OSError / CalledProcessError."""
    compiler = os.environ.get("CXX", "g++")
    text = source.read_bytes()
    tag = hashlib.sha256(text + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"{source.stem}-{tag}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(source)], check=True, capture_output=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded library with its ops registered, or None (disabled, or no working compiler)."""
    if not enabled():
        return None
    if "lib" not in _state:
        lib = load()
        if lib is not None:
            _declare(lib)
            _register(lib)
        _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def load(source: Path = SOURCE) -> ctypes.CDLL | None:
    """``source`` built (:func:`build`) and loaded, or None where that fails (logged; callers keep the result)."""
    try:
        return ctypes.CDLL(str(build(source=source)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.info("embcompress: no compiled kernels (%s %s); using the PyTorch path", e,
                 detail.decode(errors="replace")[:500])
        return None


def _workspace(name: str, n: int) -> Tensor:
    """A reused int64 buffer of n elements (fresh multi-megabyte buffers cost a map and unmap per call)."""
    buf = getattr(_buffers, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.int64)
        setattr(_buffers, name, buf)
    return buf[:n]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.hotsketch_insert.argtypes = [i32, p, p, p, p, p, i64, i64, i64, i64, f64, f64, f64, i32, i32, i64, p, p,
                                     f64, p, p, p, i64, p, p, p, p, p, p]
    lib.hotsketch_insert.restype = None
    lib.hotsketch_locate.argtypes = [i32, p, i64, i64, i64, i64, p, p, p, p]
    lib.hotsketch_locate.restype = None
    lib.hotsketch_query.argtypes = [p, p, i64, p, p, p, p]
    lib.hotsketch_query.restype = None
    lib.cms_add.argtypes = [p, i64, i64, i64, p, p]
    lib.cms_add.restype = None
    lib.cms_estimate.argtypes = [p, i64, i64, i64, p, p]
    lib.cms_estimate.restype = None


def _register(lib: ctypes.CDLL) -> None:
    if hasattr(torch.ops.embcompress, "hotsketch_insert"):
        return

    @torch.library.custom_op("embcompress::hotsketch_insert", mutates_args=("keys", "scores", "hot_row", "row_used", "mass"),
                             device_types="cpu")
    def hotsketch_insert(keys: Tensor, scores: Tensor, hot_row: Tensor, row_used: Tensor, mass: Tensor, ids: Tensor,
                         add: Tensor | None, mass_add: float, seed_add: int, threshold: float, decay: float,
                         decay_mass: float, pressure_decay: bool, preempt: bool, flat: Tensor | None,
                         found: Tensor | None, waiting: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """HotSketch.insert's batch rule and maintenance on the sketch's buffers (in place). Optional:
        ``flat`` and ``found`` from ``hotsketch_locate`` on the current state; ``waiting``, the last
        result's waiting entries when nothing else changed the sketch since (saves a scan of every slot).
        Returns (promoted ids, their rows, demoted ids, their rows, waiting entries)."""
        w, c = keys.shape
        rows = row_used.numel()
        out = _workspace("changes", 4 * (2 * rows + 1)).view(4, -1)  # results are copied out below
        left = _workspace("waiting", w * c)
        counts = torch.zeros(3, dtype=torch.int64)
        waiting = None if waiting is None else waiting.contiguous()
        ids = ids.contiguous()
        add = None if add is None else add.contiguous()
        lib.hotsketch_insert(keys.element_size(), keys.data_ptr(), scores.data_ptr(), hot_row.data_ptr(),
                             row_used.data_ptr(), mass.data_ptr(), w, c, rows, seed_add, threshold, decay,
                             decay_mass, int(pressure_decay), int(preempt), ids.numel(), ids.data_ptr(),
                             None if add is None else add.data_ptr(), mass_add,
                             None if flat is None else flat.contiguous().data_ptr(),
                             None if found is None else found.contiguous().data_ptr(),
                             None if waiting is None else waiting.data_ptr(), -1 if waiting is None else waiting.numel(),
                             left.data_ptr(), out[0].data_ptr(),
                             out[1].data_ptr(), out[2].data_ptr(), out[3].data_ptr(), counts.data_ptr())
        p, d, k = counts.tolist()
        return out[0, :p].clone(), out[1, :p].clone(), out[2, :d].clone(), out[3, :d].clone(), left[:k].clone()

    @torch.library.custom_op("embcompress::hotsketch_locate", mutates_args=(), device_types="cpu")
    def hotsketch_locate(keys: Tensor, ids: Tensor, seed_add: int) -> tuple[Tensor, Tensor, Tensor]:
        """(bucket, flat slot or the bucket's first, found) of each id, as HotSketch.locate."""
        w, c = keys.shape
        ids = ids.contiguous()
        bucket, flat = torch.empty_like(ids), torch.empty_like(ids)
        found = torch.empty(ids.shape, dtype=torch.bool)
        lib.hotsketch_locate(keys.element_size(), keys.data_ptr(), w, c, seed_add, ids.numel(), ids.data_ptr(),
                             bucket.data_ptr(), flat.data_ptr(), found.data_ptr())
        return bucket, flat, found

    @torch.library.custom_op("embcompress::hotsketch_query", mutates_args=(), device_types="cpu")
    def hotsketch_query(hot_row: Tensor, scores: Tensor, flat: Tensor, found: Tensor) -> tuple[Tensor, Tensor]:
        """(hot row or -1, score or 0) of located ids, as HotSketch.query."""
        flat, found = flat.contiguous(), found.contiguous()
        rows, out = torch.empty(flat.shape, dtype=torch.int64), torch.empty(flat.shape, dtype=torch.float32)
        lib.hotsketch_query(hot_row.data_ptr(), scores.data_ptr(), flat.numel(), flat.data_ptr(), found.data_ptr(),
                            rows.data_ptr(), out.data_ptr())
        return rows, out

    @torch.library.custom_op("embcompress::cms_add", mutates_args=("sketch",), device_types="cpu")
    def cms_add(sketch: Tensor, ids: Tensor, counts: Tensor) -> None:
        """mpcache's count-min sketch (depth, width) int32: add ``counts`` at each id's columns."""
        ids, counts = ids.contiguous(), counts.long().contiguous()
        lib.cms_add(sketch.data_ptr(), sketch.shape[0], sketch.shape[1], ids.numel(), ids.data_ptr(), counts.data_ptr())

    @torch.library.custom_op("embcompress::cms_estimate", mutates_args=(), device_types="cpu")
    def cms_estimate(sketch: Tensor, ids: Tensor) -> Tensor:
        """Smallest counter over the rows at each id's columns (int64)."""
        ids = ids.contiguous()
        out = torch.empty(ids.shape, dtype=torch.int64)
        lib.cms_estimate(sketch.data_ptr(), sketch.shape[0], sketch.shape[1], ids.numel(), ids.data_ptr(), out.data_ptr())
        return out

    # Shapes for tracing (torch.compile / export): the insert's result sizes depend on the data.
    @hotsketch_insert.register_fake
    def _(keys, scores, hot_row, row_used, mass, ids, add, mass_add, seed_add, threshold, decay, decay_mass,
          pressure_decay, preempt, flat, found, waiting):  # type: ignore[no-untyped-def]
        ctx = torch.library.get_ctx()
        p, d, k = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
        return tuple(keys.new_empty(n, dtype=torch.int64) for n in (p, p, d, d, k))

    @hotsketch_locate.register_fake
    def _(keys, ids, seed_add):  # type: ignore[no-untyped-def]
        return torch.empty_like(ids), torch.empty_like(ids), torch.empty(ids.shape, dtype=torch.bool)

    @hotsketch_query.register_fake
    def _(hot_row, scores, flat, found):  # type: ignore[no-untyped-def]
        return torch.empty(flat.shape, dtype=torch.int64), torch.empty(flat.shape, dtype=torch.float32)

    @cms_add.register_fake
    def _(sketch, ids, counts):  # type: ignore[no-untyped-def]
        return None

    @cms_estimate.register_fake
    def _(sketch, ids):  # type: ignore[no-untyped-def]
        return torch.empty(ids.shape, dtype=torch.int64)
