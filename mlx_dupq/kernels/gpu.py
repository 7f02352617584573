"""The Metal and CUDA backends: mlx_dupq/kernels/src/gqmv.body.h built with ``mx.fast.metal_kernel`` /
``mx.fast.cuda_kernel`` (body only, mlx_dupq/kernels/src/dq_portable.h as the header).

Building a kernel object does not touch a GPU; calling it does. The launch plan (rows per
threadgroup, threads, row chunking to fit shared memory) lives here, the choice of backend in
:mod:`mlx_dupq.kernels.dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .layout import KernelPack
from .reference import rotate_ref

KIND_NAMES = ("metal", "cuda")
INPUTS = ("x", "w", "scales", "biases", "meta", "idx", "coef", "signs")
# Metal declares thread-position attributes only for names the *body* mentions.
PROLOGUE = {
    "metal": (
        "uint3 dq_tid3 = thread_position_in_threadgroup;\n"
        "uint3 dq_gid3 = threadgroup_position_in_grid;\n"
        "uint3 dq_tpg3 = threads_per_threadgroup;\n"
    ),
    "cuda": "",
}
KERNELS_DIR = Path(__file__).resolve().parent / "src"  # the kernel sources (package data)
TG = 128  # threads per threadgroup (power of two)
LANES_MAX = 32  # threads sharing one output row (a warp / simdgroup's width)
XS_MAX = 6144  # floats of x staged in shared memory (24 KiB)
SLOTS_MAX = 16  # partial sums per thread


def kernel_source(kind: str) -> tuple[str, str]:
    """(header, body) text handed to mx.fast.<kind>_kernel."""
    header = (KERNELS_DIR / "dq_portable.h").read_text()
    body = (KERNELS_DIR / "gqmv.body.h").read_text()
    return header, PROLOGUE[kind] + body


def launch_template(dtype: mx.Dtype, n: int, n_out: int, rows: int, j: int, summed: bool, had: int,
                    stage: bool) -> list[tuple[str, object]]:
    """The template arguments of one launch (the kernel's compile-time constants)."""
    return [("T", dtype), ("N", n), ("O", n_out), ("M", rows), ("J", j), ("SUM", int(summed)),
            ("ROWS", rows_per_group(n)), ("HAD", had), ("XS", int(stage)), ("TG", TG)]


def rows_per_group(n: int) -> int:
    """Output rows per threadgroup: TG / lanes, where a row's lanes are the power of two >= its
    number of 32-weight chunks (N/32), at most LANES_MAX; small rows pack more rows per group."""
    lanes = min(LANES_MAX, 1 << max(0, (n // 32 - 1).bit_length()))
    return TG // lanes


def _pow2(k: int) -> bool:
    return k > 0 and k & (k - 1) == 0


@dataclass(frozen=True)
class Plan:
    """How :meth:`GpuBackend.gqmv` launches an (m, n) input: the Hadamard block fused in the kernel
    (0: none, or rotated before with mlx's ``hadamard_transform``), x staged in shared memory, and
    the rows of x per launch."""

    had: int
    stage: bool
    rows: int


def plan(m: int, n: int, j: int, summed: bool, had: int = 0) -> Plan:
    """The launch plan. Rows per launch: at most SLOTS_MAX partial sums per thread. A power-of-two
    Hadamard block is fused when one row of x fits shared memory (it needs x staged: then the rows
    per launch are limited to what fits); otherwise mlx rotates first. Without a Hadamard, x is
    staged when the launch's rows fit and read from memory otherwise (no extra launches: every
    launch reads all the weights once)."""
    per_row = 1 if summed else j
    if per_row > SLOTS_MAX:
        raise ValueError(f"{j} slots per row exceed the kernel's {SLOTS_MAX}; split the gather")
    if had and (not _pow2(had) or n > XS_MAX):
        had = 0
    rows = max(1, min(m, SLOTS_MAX // per_row))
    if had:
        rows = max(1, min(rows, XS_MAX // n))
    return Plan(had, had > 0 or rows * n <= XS_MAX, rows)


class GpuBackend:
    """gqmv on the GPU through mlx's custom-kernel API of ``kind`` ("metal" or "cuda")."""

    def __init__(self, kind: str):
        if kind not in KIND_NAMES:
            raise ValueError(f"unknown GPU kernel kind {kind!r}; use one of {KIND_NAMES}")
        self.name = kind
        self._kernel = None
        self.launches = 0

    def kernel(self):
        """The kernel object (built once; no GPU needed to build it)."""
        if self._kernel is None:
            header, body = kernel_source(self.name)
            factory = mx.fast.metal_kernel if self.name == "metal" else mx.fast.cuda_kernel
            self._kernel = factory(name="dupq_gqmv", input_names=list(INPUTS), output_names=["y"],
                                   source=body, header=header)
        return self._kernel

    def gqmv(self, x: mx.array, kp: KernelPack, idx: mx.array, coef: mx.array, summed: bool,
             signs: mx.array | None = None, had: int = 0) -> mx.array:
        """Same contract as :func:`~mlx_dupq.kernels.reference.gqmv_reference` (output in x's dtype)."""
        m, n = x.shape
        p = plan(m, n, idx.shape[1], summed, had)
        if had and not p.had:
            x = rotate_ref(x, signs, had).astype(x.dtype)  # mlx's own fast Hadamard, then the GEMV
        signs = mx.ones((n,), mx.float32) if signs is None else signs.astype(mx.float32)
        outs = []
        for r0 in range(0, m, p.rows):
            outs.append(self.launch(x[r0: r0 + p.rows], kp, idx[r0: r0 + p.rows].astype(mx.int32),
                                    coef[r0: r0 + p.rows].astype(mx.float32), summed, signs, p.had, p.stage))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs)

    def launch(self, xs: mx.array, kp: KernelPack, idx: mx.array, coef: mx.array, summed: bool,
               signs: mx.array, had: int, stage: bool) -> mx.array:
        """One kernel launch over a row chunk xs (rows, in) -> (rows, 1|J, out)."""
        rows, n = xs.shape
        j = idx.shape[1]
        self.launches += 1
        (y,) = self.kernel()(
            inputs=[xs, kp.w, kp.scales.astype(xs.dtype), kp.biases.astype(xs.dtype), kp.meta, idx, coef, signs],
            template=launch_template(xs.dtype, n, kp.n_out, rows, j, summed, had, stage),
            grid=(-(-kp.n_out // rows_per_group(n)) * TG, 1, 1),
            threadgroup=(TG, 1, 1),
            output_shapes=[(rows, 1 if summed else j, kp.n_out)],
            output_dtypes=[xs.dtype],
        )
        return y
