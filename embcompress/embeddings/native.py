"""Compiled CPU kernels (``hotsketch_native.cpp``), built with the system C++ compiler on first use.

The library is plain C ABI (no PyTorch headers, so no ninja and a one-second build), compiled with
``$CXX`` (default ``g++``) ``-O3 -std=c++17 -shared -fPIC`` into ``$EMBCOMPRESS_NATIVE_DIR`` (default
``~/.cache/embcompress/native``), under a name that carries a hash of the source and the compiler
flags, so an edited source is rebuilt and concurrent first uses do not clash (each writes a temporary
file and renames it). Its functions are registered as PyTorch custom ops (``torch.library``):
``torch.ops.embcompress.hotsketch_insert``, ``hotsketch_locate`` (HotSketch) and ``cms_add``,
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
from typing import Any, Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("hotsketch_native.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
_libraries: dict[str, ctypes.CDLL | None] = {}  # by source file: loaded once per process (None: unavailable)
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
    return loaded(SOURCE, lambda lib: (_declare(lib), _register(lib)))


def loaded(source: Path, declare: Callable[[ctypes.CDLL], Any]) -> ctypes.CDLL | None:
    """``source`` built and loaded once per process, ``declare`` (argument types, op registration) run on
    it first; None when turned off or without a working compiler (then the caller's PyTorch path runs)."""
    if not enabled():
        return None
    key = str(source)
    if key not in _libraries:
        lib = load(source)
        if lib is not None:
            declare(lib)
        _libraries[key] = lib
    return _libraries[key]


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
    """A reused int64 buffer of at least n elements (fresh multi-megabyte buffers cost a map and unmap
    per call)."""
    buf = getattr(_buffers, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.int64)
        setattr(_buffers, name, buf)
    return buf


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.hotsketch_insert.argtypes = [i32, p, p, p, i64, i64, i64, i64, f64, f64, f64, i32, i32, f64, i64, p, p, f64,
                                     p, p, i64, i64, p, p]
    lib.hotsketch_insert.restype = None
    lib.hotsketch_locate.argtypes = [i32, p, i64, i64, i64, i64, p, p, p, p]
    lib.hotsketch_locate.restype = None
    lib.cms_add.argtypes = [p, i64, i64, i64, p, p]
    lib.cms_add.restype = None
    lib.cms_estimate.argtypes = [p, i64, i64, i64, p, p]
    lib.cms_estimate.restype = None


# The ops are defined with torch.library's schema API (define + impl + register_fake) rather than
# torch.library.custom_op: the same dispatcher ops, but a call costs ~5 us instead of ~20 us (~150 us for
# an op that mutates its inputs, whose version bumps custom_op routes through Python), which at 16k
# ids a batch was a tenth of a HotSketch insert. Nothing differentiates through these ops.
_SCHEMAS = {
    "hotsketch_locate": "(Tensor table, Tensor ids, int seed_add) -> (Tensor, Tensor, Tensor)",
    "hotsketch_insert": "(Tensor(a!) table, Tensor(b!) row_used, Tensor(c!) mass, Tensor ids, Tensor? add, "
                        "float mass_add, int seed_add, float threshold, float decay, float decay_mass, "
                        "bool pressure_decay, bool preempt, float preempt_margin, Tensor? code, Tensor? waiting, "
                        "int used) "
                        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "cms_add": "(Tensor(a!) sketch, Tensor ids, Tensor counts) -> ()",
    "cms_estimate": "(Tensor sketch, Tensor ids) -> Tensor",
}
_registrations: list[torch.library.Library] = []  # kept alive: a dropped Library takes its ops with it
KERNELS: dict[str, Callable[..., Any]] = {}  # op name -> the function the dispatcher calls for it on the CPU


def op(name: str) -> Callable[..., Any]:
    """``torch.ops.embcompress.<name>`` for a trace (torch.compile / export); in eager mode the function
    it dispatches to, called directly: the dispatcher's round trip back into Python costs ~7 us a call,
    as much as the compiled locate of 1,000 ids."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.embcompress, name)
    return KERNELS[name]


def _unaliased(kernel: Callable[..., tuple[Tensor, ...]]) -> Callable[..., tuple[Tensor, ...]]:
    """``kernel`` with outputs that share no memory, as an op's schema promises (the eager kernel
    returns views of one tensor: one copy instead of five)."""
    def run(*args: Any) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in kernel(*args))
    return run


def key_bytes(table: Tensor) -> int:
    """Bytes of the id in a HotSketch table of int32 words (w, c, 4 or 3): 8 or 4."""
    return 8 if table.shape[-1] == 4 else 4


def _register(lib: ctypes.CDLL) -> None:
    if hasattr(torch.ops.embcompress, "hotsketch_insert"):
        return
    reg = torch.library.Library("embcompress", "FRAGMENT")
    _registrations.append(reg)
    for name, schema in _SCHEMAS.items():
        reg.define(name + schema)

    def hotsketch_insert(table: Tensor, row_used: Tensor, mass: Tensor, ids: Tensor, add: Tensor | None,
                         mass_add: float, seed_add: int, threshold: float, decay: float, decay_mass: float,
                         pressure_decay: bool, preempt: bool, preempt_margin: float, code: Tensor | None,
                         waiting: Tensor | None, used: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """HotSketch.insert's batch rule and maintenance on the sketch's buffers (in place). ``table``:
        HotSketch.table (w, c, words) int32; ``ids`` int64. Optional: ``code`` from ``hotsketch_locate``
        on the current state; ``waiting``, the last result's waiting entries when nothing else changed
        the sketch since (else None: every slot is scanned); ``used``, the rows in use (-1: count them).
        Returns (promoted ids, their rows, demoted ids, their rows, waiting entries), int64."""
        w, c, _ = table.shape
        rows = row_used.numel()
        out = _workspace("insert", 8 * rows + 4 + w * c)  # the results, copied out below
        counts = (ctypes.c_int64 * 3)()
        ids = ids.contiguous()
        lib.hotsketch_insert(key_bytes(table), table.data_ptr(), row_used.data_ptr(), mass.data_ptr(), w, c, rows,
                             seed_add, threshold, decay, decay_mass, pressure_decay, preempt, preempt_margin,
                             ids.numel(), ids.data_ptr(), None if add is None else add.contiguous().data_ptr(),
                             mass_add,
                             None if code is None else code.contiguous().data_ptr(),
                             None if waiting is None else waiting.contiguous().data_ptr(),
                             -1 if waiting is None else waiting.numel(), used, out.data_ptr(), counts)
        p, d, k = counts
        if p < 0:
            from .hotsketch import int32_range_error

            raise ValueError(int32_range_error(d, k))
        return out[: 2 * (p + d) + k].clone().split_with_sizes([p, p, d, d, k])  # type: ignore[return-value]

    def hotsketch_locate(table: Tensor, ids: Tensor, seed_add: int) -> tuple[Tensor, Tensor, Tensor]:
        """HotSketch.locate and .query in one pass over int64 ``ids``: (code: the slot holding the id, or
        -1 - its bucket; hot row or -1; score or 0)."""
        w, c, _ = table.shape
        ids = ids.contiguous()
        code, rows = torch.empty_like(ids), torch.empty_like(ids)
        scores = torch.empty(ids.shape, dtype=torch.float32)
        lib.hotsketch_locate(key_bytes(table), table.data_ptr(), w, c, seed_add, ids.numel(), ids.data_ptr(),
                             code.data_ptr(), rows.data_ptr(), scores.data_ptr())
        return code, rows, scores

    def cms_add(sketch: Tensor, ids: Tensor, counts: Tensor) -> None:
        """mpcache's count-min sketch (depth, width) int32: add ``counts`` at each id's columns."""
        ids, counts = ids.contiguous(), counts.long().contiguous()
        lib.cms_add(sketch.data_ptr(), sketch.shape[0], sketch.shape[1], ids.numel(), ids.data_ptr(), counts.data_ptr())

    def cms_estimate(sketch: Tensor, ids: Tensor) -> Tensor:
        """Smallest counter over the rows at each id's columns (int64)."""
        ids = ids.contiguous()
        out = torch.empty(ids.shape, dtype=torch.int64)
        lib.cms_estimate(sketch.data_ptr(), sketch.shape[0], sketch.shape[1], ids.numel(), ids.data_ptr(), out.data_ptr())
        return out

    # Shapes for tracing (torch.compile / export): the insert's result sizes depend on the data.
    def insert_fake(table, row_used, mass, ids, add, mass_add, seed_add, threshold, decay, decay_mass,
                    pressure_decay, preempt, preempt_margin, code, waiting,
                    used):  # type: ignore[no-untyped-def]
        ctx = torch.library.get_ctx()
        p, d, k = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
        return tuple(ids.new_empty(n, dtype=torch.int64) for n in (p, p, d, d, k))

    def locate_fake(table, ids, seed_add):  # type: ignore[no-untyped-def]
        return torch.empty_like(ids), torch.empty_like(ids), torch.empty(ids.shape, dtype=torch.float32)

    def cms_add_fake(sketch, ids, counts):  # type: ignore[no-untyped-def]
        return None

    def cms_estimate_fake(sketch, ids):  # type: ignore[no-untyped-def]
        return torch.empty(ids.shape, dtype=torch.int64)

    for kernel, fake in ((hotsketch_insert, insert_fake), (hotsketch_locate, locate_fake), (cms_add, cms_add_fake),
                         (cms_estimate, cms_estimate_fake)):
        KERNELS[kernel.__name__] = kernel
        reg.impl(kernel.__name__, _unaliased(kernel) if kernel is hotsketch_insert else kernel, "CPU")
        torch.library.register_fake(f"embcompress::{kernel.__name__}", fake, lib=reg)
