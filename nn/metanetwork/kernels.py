"""Fused C kernels for the edge work of a layer on CPU (``edge_kernels.c``), built on first use, via ctypes.

Why C: on CPU the layer is bound by memory traffic and page faults, not flops. The blocked eager loop of
:mod:`nn.metanetwork.fused` still runs ~40 aten ops per block, each a pass over a ``(2B, H)`` tensor with a
fresh buffer (a 2 MB buffer costs ~500 page faults each time it is allocated). ``edge_forward`` does one
pass over the edges with every intermediate of a row in registers/L1: layer norm, the ``H x H`` edge
matrix-vector product, both directions, the activation, running sum / sum of squares / max / min *with the
number of hits of the max and min* (so tied extremes share their gradient without a second pass), and the
gated edge update. ``edge_backward`` is the matching single pass; only the weight gradient is left to one
``addmm`` per block (MKL is faster at that outer-product sum than a per-edge loop).

The library is compiled with the system C compiler (``cc``/``gcc``, ``-O3 -march=native``; another target with
``METANETWORK_KERNEL_MARCH``, e.g. ``x86-64-v3`` for an AVX2 build on an AVX-512 machine) once per
``(H, activation)`` into ``$METANETWORK_KERNEL_DIR`` (default ``~/.cache/graph_meta_pruning/kernels``),
keyed by the source, flags and CPU, and reused by later processes (about 1 s to build). Where no compiler
is available, or for float64 / CUDA tensors, :func:`get_kernels` returns None and the eager path runs.
``METANETWORK_KERNELS=0`` disables the kernels.

``-fno-trapping-math`` matters on CPUs without AVX-512. The hot per-row loops have conditionals (the clamp in
``exp``, the max/min hit counts, the max/min masks of the gradient). With AVX-512's masked operations GCC
vectorises them anyway; with AVX2 it must evaluate both arms and blend, which trapping math forbids, so
those loops ran scalar (GCC's ``-fopt-info-vec-missed``: "control flow in loop"). Nothing here traps or
reads the floating-point status, so the flag changes no result.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("edge_kernels.c")
ACT_CODES = {"silu": 0, "relu": 1, "tanh": 2}
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11"]
MAX_HIDDEN = 1024  # per-row scratch lives on the stack: 10 arrays of H floats


def _cpu_tag() -> str:
    """Distinguishes CPUs for ``-march=native`` builds in a shared cache directory."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _cache_dir() -> Path:
    return Path(os.environ.get("METANETWORK_KERNEL_DIR", Path.home() / ".cache" / "graph_meta_pruning" / "kernels"))


def _build(hidden: int, activation: str) -> Path:
    """Path of the shared library for ``(hidden, activation)``, compiling it if it is not cached yet."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found")
    flags = FLAGS + [f"-march={os.environ.get('METANETWORK_KERNEL_MARCH') or 'native'}", f"-DHD={hidden}",
                     f"-DACT={ACT_CODES[activation]}"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler] + flags).encode() + _cpu_tag().encode())
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"edge_kernels_h{hidden}_{activation}_{key.hexdigest()[:16]}.so"
    if not lib.exists():
        # build next to the target and rename: concurrent processes never load a half-written library
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                           text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _ranges(num_rows: int, parts: int) -> List[slice]:
    """``parts`` contiguous, nearly equal ranges of rows (fewer when there are few rows)."""
    parts = max(1, min(parts, num_rows // 1024))
    bounds = [num_rows * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge_kernels")


def _run(fn: Callable[[int, slice], None], ranges: List[slice]) -> None:
    """``fn(part, rows)`` for every range; in parallel threads (ctypes releases the GIL during the C call)."""
    if len(ranges) == 1:
        fn(0, ranges[0])
        return
    for future in [_pool(len(ranges)).submit(fn, i, r) for i, r in enumerate(ranges)]:
        future.result()


class EdgeKernels:
    """ctypes wrappers of ``edge_forward`` / ``edge_backward`` for one ``(H, activation)``.

    Edges are split into ``torch.get_num_threads()`` contiguous ranges processed in parallel; each range
    accumulates into its own node tables (no atomics), which are merged afterwards (node-sized work).
    """

    def __init__(self, path: Path, hidden: int) -> None:
        self.hidden = hidden
        lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fwd, self._bwd = lib.edge_forward, lib.edge_backward
        self._fwd.argtypes = [i64, i64] + [ptr] * 11
        self._bwd.argtypes = [i64, i64] + [ptr] * 12
        self._fwd.restype = self._bwd.restype = None

    @staticmethod
    def _p(t: Optional[Tensor]) -> Optional[int]:
        if t is None:
            return None
        assert t.is_contiguous() and t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64)
        return t.data_ptr()

    def forward(self, e: Tensor, ps: Tensor, pt: Tensor, a: Tensor, b: Tensor, w_t: Tensor, src: Tensor,
                dst: Tensor, pre: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Shapes: e ``(E, H)``; ps, pt, a, b ``(N, H)``; w_t ``(H, H)`` (W transposed, contiguous); src, dst
        int64 ``(E,)``; pre ``(E, 2H)`` or None (written: the pre-activations of both directions).

        Returns ``(stats (6, 2N, H), e_new (E, H))``: sum, sum of squares, max, max hits, min, min hits of
        the activations per target slot (rows ``[:N]`` along the edges, ``[N:]`` against them).
        """
        E, N, p = e.shape[0], ps.shape[0], self._p
        ranges = _ranges(E, torch.get_num_threads())
        stats = e.new_zeros(len(ranges), 6, 2 * N, e.shape[1])
        stats[:, 2].fill_(-float("inf"))
        stats[:, 4].fill_(float("inf"))
        e_new = torch.empty_like(e)

        def part(i: int, r: slice) -> None:
            self._fwd(r.stop - r.start, N, p(e[r]), p(ps), p(pt), p(a), p(b), p(w_t), p(src[r]), p(dst[r]),
                      p(stats[i]), p(pre[r]) if pre is not None else None, p(e_new[r]))

        _run(part, ranges)
        if len(ranges) == 1:
            return stats[0], e_new
        # merge the ranges: sums add; an extreme keeps the hits of the ranges that attain it
        total, squares, mx, cnt_max, mn, cnt_min = stats.unbind(1)
        best_max, best_min = mx.amax(0), mn.amin(0)
        merged = torch.stack([total.sum(0), squares.sum(0), best_max, (cnt_max * (mx == best_max)).sum(0),
                              best_min, (cnt_min * (mn == best_min)).sum(0)])
        return merged, e_new

    def backward(self, e: Tensor, g_e_new: Tensor, pre: Tensor, a: Tensor, b: Tensor, w: Tensor, src: Tensor,
                 dst: Tensor, coef: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """e, g_e_new ``(E, H)``; pre ``(E, 2H)``; a, b ``(N, H)``; w ``(H, H)``; coef ``(6, 2N, H)``.

        Returns ``(grads (4, N, H) = g_ps, g_pt, g_a, g_b;  g_w (H, H);  g_e (E, H))``.
        """
        (E, H), N, p = e.shape, a.shape[0], self._p
        ranges = _ranges(E, torch.get_num_threads())
        grads = e.new_zeros(len(ranges), 4, N, H)
        g_w = e.new_zeros(len(ranges), H, H)
        g_e = torch.empty_like(e)

        def part(i: int, r: slice) -> None:
            self._bwd(r.stop - r.start, N, p(e[r]), p(g_e_new[r]), p(pre[r]), p(a), p(b), p(w), p(src[r]),
                      p(dst[r]), p(coef), p(grads[i]), p(g_w[i]), p(g_e[r]))

        _run(part, ranges)
        return grads.sum(0), g_w.sum(0), g_e


@functools.lru_cache(maxsize=None)
def _load(hidden: int, activation: str) -> Optional[EdgeKernels]:
    try:
        return EdgeKernels(_build(hidden, activation), hidden)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("metanetwork C kernels unavailable (%s); using the eager path", str(detail)[-300:])
        return None


def get_kernels(hidden: int, activation: str, dtype: torch.dtype, device: torch.device) -> Optional[EdgeKernels]:
    """The kernels for this layer, or None where the eager path must run (see the module docstring)."""
    if device.type != "cpu" or dtype != torch.float32 or activation not in ACT_CODES or hidden > MAX_HIDDEN:
        return None
    if os.environ.get("METANETWORK_KERNELS", "1") == "0":
        return None
    return _load(hidden, activation)
