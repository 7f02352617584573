"""Which kernel backend runs: decided here, once.

Order: metal -> cuda -> reference, by what the running mlx offers (:func:`probe`, cached; it
asks ``mx.metal.is_available()`` / ``mx.cuda.is_available()`` and never launches a kernel).
``MLX_DUPQ_KERNELS=reference|metal|cuda`` forces one (an unavailable forced GPU backend is an
error); ``harness`` (never chosen by itself) runs the GPU kernel bodies on the CPU through the
C++ harness -- slow, for checking the kernels inside real models.

A GPU backend is wrapped in :class:`CheckedBackend`: the first use of each kernel
configuration (formats, summed or gathered, Hadamard or not, dtype) runs the kernel on a small
random input of that configuration and compares it with the reference; on an error or a
mismatch it warns and that configuration runs on the reference from then on.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import cache

import mlx.core as mx

from ..errors import DupqError
from .layout import KernelPack, kernel_pack
from .reference import gqmv_reference

ENV = "MLX_DUPQ_KERNELS"
CHOICES = ("reference", "metal", "cuda", "harness")
CHECK_OUT, CHECK_IN, CHECK_ROWS = 8, 512, 2


class ReferenceBackend:
    """Plain mx (dequantize, then matmul): correct everywhere, not fast."""

    name = "reference"
    custom = False  # layers keep their own mlx path (mx.quantized_matmul) under this backend

    def gqmv(self, x, kp, idx, coef, summed, signs=None, had=0):
        return gqmv_reference(x, kp, idx, coef, summed, signs, had).astype(x.dtype)


@cache
def probe() -> tuple[str, ...]:
    """Backends the running mlx offers, in preference order (always ends with "reference")."""
    found = []
    try:
        if mx.metal.is_available():
            found.append("metal")
    except Exception:  # noqa: BLE001 -- a broken probe means "not offered"
        pass
    cuda = getattr(mx, "cuda", None)
    try:
        if cuda is not None and cuda.is_available():
            found.append("cuda")
    except Exception:  # noqa: BLE001
        pass
    return (*found, "reference")


def choose() -> str:
    """The backend name to use: the environment's choice, else the first that :func:`probe` offers."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in CHOICES:
            raise DupqError(f"{ENV}={forced!r} is not a kernel backend; use one of {', '.join(CHOICES)}")
        if forced not in probe() and forced != "harness":
            raise DupqError(f"{ENV}={forced} but this mlx offers only {', '.join(probe())}; unset {ENV} or use reference")
        return forced
    return probe()[0]


def _tol(dtype: mx.Dtype) -> float:
    return 1e-3 if dtype == mx.float32 else 3e-2


def check_case(kp: KernelPack, summed: bool, had: int, dtype: mx.Dtype, j: int):
    """A small random input of the same configuration: (x, kp, idx, coef, signs)."""
    from ..layers.quant_linear import quantize_tensor

    n = CHECK_IN * had // math.gcd(CHECK_IN, had) if had else CHECK_IN  # a width the Hadamard block tiles
    layers = [quantize_tensor(mx.random.normal((CHECK_OUT, n)), spec.fit(n)) for spec in kp.specs]
    small = kernel_pack(layers, dtype=dtype)
    e = kp.num
    idx = mx.array([[(m * j + k) % e for k in range(j)] for m in range(CHECK_ROWS)], dtype=mx.int32)
    coef = mx.random.uniform(0.5, 1.5, (CHECK_ROWS, j))
    signs = mx.where(mx.random.uniform(shape=(n,)) < 0.5, -1.0, 1.0)
    x = mx.random.normal((CHECK_ROWS, n)).astype(dtype)
    return x, small, idx, coef, signs


class CheckedBackend:
    """A GPU backend that checks each configuration against the reference on first use."""

    def __init__(self, inner, reference=None):
        self.inner = inner
        self.reference = reference or ReferenceBackend()
        self.name = inner.name
        self.custom = True
        self.verdicts: dict[tuple, bool] = {}

    def _key(self, x, kp, idx, summed, had):
        return (tuple(s.label() for s in kp.specs), bool(summed), int(had), str(x.dtype), idx.shape[1] > 1)

    def _check(self, key, x, kp, idx, summed, had) -> bool:
        case = check_case(kp, summed, had, x.dtype, idx.shape[1])
        try:
            got = self.inner.gqmv(*case[:4], summed, case[4], had)
            want = gqmv_reference(*case[:4], summed, case[4], had)
            err = float(mx.max(mx.abs(got.astype(mx.float32) - want)))
            scale = max(1.0, float(mx.max(mx.abs(want))))
            ok = bool(got.shape == want.shape and err <= _tol(x.dtype) * scale)
            why = f"max error {err:.3g} (scale {scale:.3g})"
        except Exception as e:  # noqa: BLE001 -- any failure means "do not use this kernel"
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn(f"{self.name} kernel failed its self-check for {key} ({why}); using the reference kernel",
                          RuntimeWarning, stacklevel=4)
        return ok

    def accepts(self, x, kp, idx, summed, had=0) -> bool:
        """Whether this configuration passed its self-check (run now if it has not been)."""
        key = self._key(x, kp, idx, summed, had)
        if key not in self.verdicts:
            self.verdicts[key] = self._check(key, x, kp, idx, summed, had)
        return self.verdicts[key]

    def gqmv(self, x, kp, idx, coef, summed, signs=None, had=0):
        chosen = self.inner if self.accepts(x, kp, idx, summed, had) else self.reference
        return chosen.gqmv(x, kp, idx, coef, summed, signs, had)


_active = None


def make_backend(name: str):
    """A backend object by name (GPU ones wrapped in :class:`CheckedBackend`)."""
    if name == "reference":
        return ReferenceBackend()
    if name == "harness":
        from .cpu_harness import HarnessBackend

        return CheckedBackend(HarnessBackend())
    from .gpu import GpuBackend

    return CheckedBackend(GpuBackend(name))


def backend():
    """The backend in use (chosen once per process by :func:`choose`)."""
    global _active
    if _active is None:
        _active = make_backend(choose())
    return _active


def custom_active() -> bool:
    """True when the backend in use runs custom kernels (layers then route decode through them)."""
    return bool(getattr(backend(), "custom", True))


def accepts(x: mx.array, kp: KernelPack, slots: int, summed: bool, had: int = 0) -> bool:
    """Whether the backend in use runs this configuration with its own kernel (False after a failed
    self-check: layers then keep their mlx path instead of the slower reference twin)."""
    b = backend()
    check = getattr(b, "accepts", None)
    return True if check is None else check(x, kp, mx.zeros((1, slots), mx.int32), summed, had)


def set_backend(b=None):
    """Use backend ``b`` (object with ``name`` and ``gqmv``, or a name); None re-chooses on next use."""
    global _active
    _active = make_backend(b) if isinstance(b, str) else b
