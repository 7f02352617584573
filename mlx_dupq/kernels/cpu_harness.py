"""Build and call mlx_dupq/kernels/src/cpu_harness.cpp: the GPU kernel bodies compiled as C++ for the CPU.

:func:`load_harness` compiles the harness once per source content (g++ or ``$CXX``) into
``$MLX_DUPQ_CACHE/kernels/<hash>/libdq_cpu.so`` and loads it with ctypes; it raises
:class:`HarnessUnavailable` with the reason when there is no compiler or the build fails.
:func:`gqmv_cpu` runs the gqmv body on numpy copies of the inputs (float32 activations and
group parameters). What this does and does not prove: docs/kernels.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .gpu import KERNELS_DIR, TG, GpuBackend, rows_per_group
from .layout import KernelPack

SOURCES = ("dq_portable.h", "gqmv.body.h", "cpu_harness.cpp", "build_cpu.sh")
ERRORS = {-1: "divergent barrier (some threads returned while others wait)",
          -2: "a size exceeds the CPU capacity of a shared/local array", -3: "bad launch parameters"}


class HarnessUnavailable(RuntimeError):
    """The CPU harness cannot be built here (no compiler, or missing sources)."""


def _cache_dir() -> Path:
    root = os.environ.get("MLX_DUPQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlx_dupq"))
    return Path(root) / "kernels"


@cache
def load_harness() -> ctypes.CDLL:
    """Compile (once per source hash) and load the harness library."""
    missing = [s for s in SOURCES if not (KERNELS_DIR / s).exists()]
    if missing:
        raise HarnessUnavailable(f"kernel sources {missing} not found under {KERNELS_DIR} (a broken install: reinstall mlx-dupq)")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise HarnessUnavailable(f"no C++ compiler ({cxx!r} not on PATH); install g++ or set CXX")
    digest = hashlib.sha256(b"".join((KERNELS_DIR / s).read_bytes() for s in SOURCES)).hexdigest()[:16]
    lib = _cache_dir() / digest / "libdq_cpu.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["sh", str(KERNELS_DIR / "build_cpu.sh"), str(tmp)], capture_output=True, text=True,
                             env=dict(os.environ, CXX=cxx))
        if res.returncode != 0:
            raise HarnessUnavailable(f"building the CPU kernel harness failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.dq_cpu_gqmv.restype = ctypes.c_int
    dll.dq_cpu_w_reads.restype = ctypes.c_long
    return dll


def last_w_reads() -> int:
    """How many 32-bit words of the packed weights the last :func:`gqmv_cpu` call read (all threads)."""
    return int(load_harness().dq_cpu_w_reads())


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def gqmv_cpu(x: mx.array, kp: KernelPack, idx: mx.array, coef: mx.array, summed: bool,
             signs: mx.array | None = None, had: int = 0, *, rows: int = 4, tg: int = 32,
             stage_x: bool = True) -> mx.array:
    """The gqmv kernel body run by the CPU harness: x (M, in), idx/coef (M, J) -> (M, 1|J, out)."""
    dll = load_harness()
    m, n = x.shape
    j = idx.shape[1]
    arrs = [
        np.ascontiguousarray(np.array(x.astype(mx.float32))),
        np.ascontiguousarray(np.array(kp.w)),
        np.ascontiguousarray(np.array(kp.scales.astype(mx.float32))),
        np.ascontiguousarray(np.array(kp.biases.astype(mx.float32))),
        np.ascontiguousarray(np.array(kp.meta).astype(np.int32)),
        np.ascontiguousarray(np.array(idx).astype(np.int32)),
        np.ascontiguousarray(np.array(coef.astype(mx.float32))),
        np.ascontiguousarray(np.ones(n, np.float32) if signs is None else np.array(signs.astype(mx.float32))),
    ]
    y = np.zeros((m, 1 if summed else j, kp.n_out), np.float32)
    p = np.array([n, kp.n_out, m, j, int(summed), rows, had, int(stage_x or had > 0), tg], np.int32)
    rc = dll.dq_cpu_gqmv(*[_ptr(a) for a in arrs], _ptr(y), _ptr(p))
    if rc != 0:
        raise RuntimeError(f"CPU kernel harness: {ERRORS.get(rc, rc)}")
    return mx.array(y)


class HarnessBackend(GpuBackend):
    """The GPU backends' launch plan (row chunks, staging, Hadamard fallback) with each launch run
    by the CPU harness: the kernel body exactly as a GPU would get it, on the CPU (slow)."""

    custom = True

    def __init__(self):
        load_harness()  # fail early (HarnessUnavailable) when it cannot be built
        self.name = "harness"
        self.launches = 0

    def launch(self, xs, kp, idx, coef, summed, signs, had, stage):
        self.launches += 1
        y = gqmv_cpu(xs, kp, idx, coef, summed, signs, had, rows=rows_per_group(xs.shape[1]), tg=TG, stage_x=stage)
        return y.astype(xs.dtype)
