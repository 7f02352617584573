"""Which kernel backend runs: decided here, once.

Order: metal -> cuda -> reference, by what the running mlx offers (:func:`probe`, cached; it
asks ``mx.metal.is_available()`` / ``mx.cuda.is_available()`` and never launches a kernel).
``MLX_DUPQ_KERNELS=reference|metal|cuda`` forces one (an unavailable forced GPU backend is an
error); ``harness`` (never chosen by itself) runs the GPU kernel bodies on the CPU through the
C++ harness -- slow, for checking the kernels inside real models.

A GPU backend is wrapped in :class:`CheckedBackend`: the first use of each kernel
configuration -- the pack (its formats and shape), the rows and slots of the call, summed or
gathered, Hadamard block, dtype: exactly what selects the compiled kernels -- runs those kernels
on the real pack with a random input of the call's shape and compares them with the reference;
on an error or a mismatch it warns and that configuration runs on the reference from then on.
"""

from __future__ import annotations

import os
import warnings
from functools import cache

import mlx.core as mx

from ..errors import DupqError
from .cpu_harness import HarnessBackend
from .gpu import GpuBackend
from .layout import KernelPack
from .reference import gqmv_reference

ENV = "MLX_DUPQ_KERNELS"
CHOICES = ("reference", "metal", "cuda", "harness")


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


def check_cases(kp: KernelPack, rows: int, j: int, dtype: mx.Dtype, had: int):
    """Random inputs for the real pack, shaped like the call being checked: [(x, idx, coef, signs)].

    The slots take one expert / copy of each distinct format first, so the cases reach every bit
    width the pack holds (as many launches of the call's shape as that needs), then the others.
    """
    firsts: dict[str, int] = {}
    for e, spec in enumerate(kp.specs):
        firsts.setdefault(spec.label(), e)
    order = list(firsts.values()) + [e for e in range(kp.num) if e not in firsts.values()]
    slots = rows * j
    cases = []
    for start in range(0, max(len(firsts), 1), slots):
        idx = mx.array([[order[(start + r * j + k) % len(order)] for k in range(j)] for r in range(rows)],
                       dtype=mx.int32)
        coef = mx.random.uniform(0.5, 1.5, (rows, j))
        signs = mx.where(mx.random.uniform(shape=(kp.n_in,)) < 0.5, -1.0, 1.0) if had else None
        cases.append((mx.random.normal((rows, kp.n_in)).astype(dtype), idx, coef, signs))
    return cases


class CheckedBackend:
    """A GPU backend that checks each configuration against the reference on first use."""

    def __init__(self, inner, reference=None):
        self.inner = inner
        self.reference = reference or ReferenceBackend()
        self.name = inner.name
        self.custom = True
        self.verdicts: dict[tuple, bool] = {}

    def _key(self, x, kp, idx, summed, had):
        """What selects the compiled kernels: the pack (formats, shape), rows, slots, mode, Hadamard, dtype."""
        rows = x.size // x.shape[-1] if x.ndim else 1
        return (tuple(s.label() for s in kp.specs), kp.n_out, kp.n_in, rows, idx.shape[1], bool(summed), int(had),
                str(x.dtype))

    def _check(self, key, x, kp, idx, summed, had) -> bool:
        rows, j = key[3], key[4]
        try:
            ok, why = True, ""
            for cx, cidx, coef, signs in check_cases(kp, rows, j, x.dtype, had):
                got = self.inner.gqmv(cx, kp, cidx, coef, summed, signs, had)
                want = gqmv_reference(cx, kp, cidx, coef, summed, signs, had)
                err = float(mx.max(mx.abs(got.astype(mx.float32) - want)))
                scale = max(1.0, float(mx.max(mx.abs(want))))
                if not (got.shape == want.shape and err <= _tol(x.dtype) * scale):
                    ok, why = False, f"max error {err:.3g} (scale {scale:.3g}) with experts {cidx.tolist()}"
                    break
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
        return CheckedBackend(HarnessBackend())
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
