"""Seeded orthogonal rotations: one :class:`Rotation` object per matrix, rebuilt from a small dict.

Every rotation is ``R = diag(s) . B . D`` with three optional parts applied in that order to the
last axis of an activation (``x -> x @ R``):

- ``signs`` ``s`` (n,) of +-1 (QuaRot's randomized Hadamard is ``diag(s) . H``, see
  ``random_hadamard_matrix`` in spcl/QuaRot),
- ``block`` ``b``: a block-diagonal normalised Hadamard ``B`` with blocks of ``b`` (``b = n``: full),
- ``dense`` ``D`` (n, n): an explicit orthogonal matrix (random orthogonal, the perturbation ``P``
  of ``H . P``, or the DFRot refinement).

Applying costs O(n log n) for the Hadamard part and O(n^2) for a dense part, like a linear layer.

Kinds (``to_dict()['kind']``):

=====================  =====================================================================
``identity``           ``R = I`` (no rotation; useful as a copy's or a baseline's choice)
``hadamard``           ``R = H`` (normalised, deterministic; width must be m*2^k, m in 1,12,20,28)
``randomized_hadamard`` ``R = diag(s) . H`` with seeded random signs (QuaRot)
``block_hadamard``     ``R = diag(s) . blockdiag(H_b)``; works for any width with a block that
                       divides it (``block`` omitted: the largest one, i.e. a full randomized
                       Hadamard where the width allows). The portable choice for recipes.
``random_orthogonal``  ``R = Q`` from the QR of a seeded Gaussian, columns sign-fixed so that
                       ``diag(R_qr) > 0`` (the Haar measure; QuaRot/SpinQuant's random mode)
``perturbed``          ``R = H . P``, ``P`` the nearest orthogonal matrix (polar factor) to
                       ``I + eps * G``, ``G`` seeded Gaussian with entries N(0, 1/n) so that each row
                       of ``eps * G`` has norm ~eps at every width; ``eps`` in [0, 0.5] (0 gives H).
                       ``H`` is the ``base`` rotation (default ``block_hadamard``, same seed).
``dfrot``              ``R = R0 . D`` with ``R0`` a ``block_hadamard`` start and ``D`` learned from
                       calibration activations (see :mod:`mlx_dupq.rotation.dfrot`); ``D`` cannot be
                       regenerated from the seed, so it is saved as an array (:meth:`Rotation.arrays`).
=====================  =====================================================================

Randomness comes from ``numpy.random.default_rng([seed, stream])`` (stable across platforms and
numpy versions); dense factorisations run in float64 and are stored as float32. Dense kinds cost
O(n^3) to build (about 1 s at n = 1536, 12 s (QR) / 45 s (SVD) at n = 4864 on two cores).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import DupqError
from .hadamard import block_hadamard, block_sizes, hadamard_supported, largest_block

KINDS = (
    "identity",
    "hadamard",
    "randomized_hadamard",
    "block_hadamard",
    "random_orthogonal",
    "perturbed",
    "dfrot",
)
EPS_MAX = 0.5

# independent random streams per seed
_SIGNS, _GAUSS, _PERTURB = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Rotation:
    """An (n, n) orthogonal matrix ``R`` that applies itself as ``x -> x @ R``.

    signs: (n,) float32 of +-1, or None
    block: Hadamard block size dividing n, or 0 for no Hadamard part
    dense: (n, n) float32 orthogonal, or None
    meta:  the dict that rebuilds it (``kind``, ``size``, ``seed``, ``block``, ``eps``, ...)
    """

    size: int
    meta: dict
    signs: mx.array | None = None
    block: int = 0
    dense: mx.array | None = None
    stored: tuple[str, ...] = field(default=())  # parts that must be saved as arrays

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def apply(self, x: mx.array) -> mx.array:
        """(..., n) -> (..., n): ``x @ R``, computed in ``x``'s dtype."""
        if x.shape[-1] != self.size:
            raise ValueError(f"{self.kind} rotation of size {self.size} applied to an axis of {x.shape[-1]}")
        y = x
        if self.signs is not None:
            y = y * self.signs.astype(y.dtype)
        if self.block:
            y = block_hadamard(y, self.block)
        if self.dense is not None:
            y = y @ self.dense.astype(y.dtype)
        return y

    def matrix(self) -> mx.array:
        """The explicit (n, n) float32 matrix ``R``, built from its parts (not via :meth:`apply`)."""
        n = self.size
        s = mx.ones((n,)) if self.signs is None else self.signs.astype(mx.float32)
        if self.block:
            b, k = self.block, n // self.block
            hb = block_hadamard(mx.eye(b, dtype=mx.float32), b)
            # M[(p, a), (q, c)] = s[p, a] * delta(p, q) * H_b[a, c]: one broadcast, no per-block copies
            m = mx.eye(k)[:, None, :, None] * (s.reshape(k, b)[:, :, None, None] * hb[None, :, None, :])
            m = m.reshape(n, n)
        else:
            m = s[:, None] * mx.eye(n)
        if self.dense is not None:
            m = m @ self.dense.astype(mx.float32)
        return m

    def to_dict(self) -> dict:
        """A small JSON-able dict; :func:`make_rotation` rebuilds the same rotation from it."""
        return copy.deepcopy(self.meta)

    def arrays(self) -> dict[str, mx.array]:
        """Arrays that the dict alone cannot regenerate (``{"dense": D}`` for dfrot), else ``{}``."""
        return {name: getattr(self, name) for name in self.stored}

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.meta.items() if k not in ("kind", "size"))
        return f"Rotation({self.kind}, n={self.size}{', ' + extra if extra else ''})"


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream])


def random_signs(n: int, seed: int) -> mx.array:
    """(n,) float32 of seeded random +-1."""
    s = _rng(seed, _SIGNS).integers(0, 2, size=n) * 2 - 1
    return mx.array(s.astype(np.float32))


def _check_hadamard(n: int, kind: str) -> None:
    if not hadamard_supported(n):
        raise DupqError(
            f"width {n} has no {kind} transform (widths m*2^k with m in 1, 12, 20, 28); "
            f"use kind block_hadamard (blocks that fit: {', '.join(map(str, block_sizes(n)[-4:]))})"
        )


def identity(n: int) -> Rotation:
    """R = I."""
    return Rotation(n, {"kind": "identity", "size": n})


def hadamard(n: int) -> Rotation:
    """R = H, the normalised Hadamard of width n (deterministic)."""
    _check_hadamard(n, "hadamard")
    return Rotation(n, {"kind": "hadamard", "size": n}, block=n)


def randomized_hadamard(n: int, seed: int = 0) -> Rotation:
    """R = diag(s) . H with seeded random signs s (QuaRot)."""
    _check_hadamard(n, "randomized_hadamard")
    return Rotation(n, {"kind": "randomized_hadamard", "size": n, "seed": seed}, signs=random_signs(n, seed), block=n)


def block_hadamard_rotation(n: int, seed: int = 0, block: int | None = None) -> Rotation:
    """R = diag(s) . blockdiag(H_b); ``block`` None picks the largest supported block dividing n."""
    b = largest_block(n) if block is None else int(block)
    if block is None and b < 8:
        raise DupqError(f"width {n} has no Hadamard block of 8 or more (largest: {b}); use kind random_orthogonal")
    if n % b != 0 or not hadamard_supported(b):
        fits = ", ".join(map(str, [x for x in block_sizes(n) if x >= 8][-6:]))
        raise DupqError(f"Hadamard block {b} does not tile width {n}; use one of {fits} (or omit block)")
    meta = {"kind": "block_hadamard", "size": n, "seed": seed, "block": b}
    return Rotation(n, meta, signs=random_signs(n, seed), block=b)


def _haar(n: int, seed: int) -> np.ndarray:
    g = _rng(seed, _GAUSS).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


def random_orthogonal(n: int, seed: int = 0) -> Rotation:
    """R = Q of the QR of a seeded (n, n) Gaussian, sign-fixed (Haar-distributed)."""
    meta = {"kind": "random_orthogonal", "size": n, "seed": seed}
    return Rotation(n, meta, dense=mx.array(_haar(n, seed).astype(np.float32)))


def polar(a: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor of a square matrix (its nearest orthogonal matrix): U V^T."""
    u, _, vt = np.linalg.svd(a)
    return u @ vt


def perturbed(n: int, seed: int = 0, eps: float = 0.05, base: Mapping | None = None) -> Rotation:
    """R = H . P with P = polar(I + eps * G), G_ij ~ N(0, 1/n) seeded; eps in [0, 0.5]."""
    eps = float(eps)
    if not 0.0 <= eps <= EPS_MAX:
        raise DupqError(
            f"perturbation eps {eps:g} is out of range; "
            f"use a value in [0.01, {EPS_MAX}] (0 = no perturbation)"
        )
    base_spec = dict(base) if base is not None else {"kind": "block_hadamard", "seed": seed}
    if base_spec.get("kind") in ("perturbed", "dfrot"):
        raise DupqError("perturbed rotation base must be a fixed rotation (hadamard, block_hadamard, ...), not perturbed or dfrot")
    h = make_rotation(base_spec, n)
    meta = {"kind": "perturbed", "size": n, "seed": seed, "eps": eps, "base": h.to_dict()}
    if eps == 0.0:
        return Rotation(n, meta, signs=h.signs, block=h.block, dense=h.dense)
    g = _rng(seed, _PERTURB).standard_normal((n, n)) / np.sqrt(n)
    p = polar(np.eye(n) + eps * g)
    if h.dense is not None:
        p = np.array(h.dense, dtype=np.float64) @ p
    return Rotation(n, meta, signs=h.signs, block=h.block, dense=mx.array(p.astype(np.float32)))


def from_learned(start: Rotation, learned: mx.array, meta: dict) -> Rotation:
    """R = start . learned for a learned (n, n) orthogonal refinement (dfrot); ``learned`` is stored."""
    if start.dense is not None:
        raise ValueError("a learned rotation must start from a Hadamard-type rotation")
    meta = {**meta, "size": start.size, "start": start.to_dict()}
    return Rotation(start.size, meta, signs=start.signs, block=start.block,
                    dense=learned.astype(mx.float32), stored=("dense",))


def _spec_dict(spec: Any) -> dict:
    if isinstance(spec, str):
        return {"kind": spec}
    if isinstance(spec, Mapping):
        return dict(spec)
    if hasattr(spec, "to_dict"):
        return dict(spec.to_dict())
    raise DupqError(
        f"rotation spec {spec!r} is neither a kind name nor a dict; "
        f"use e.g. {{'kind': 'block_hadamard', 'seed': 0}}"
    )


_ALLOWED = {  # "seed" is accepted (and ignored) by the deterministic kinds so recipes can set it globally
    "identity": {"kind", "size", "seed"},
    "hadamard": {"kind", "size", "seed"},
    "randomized_hadamard": {"kind", "size", "seed"},
    "block_hadamard": {"kind", "size", "seed", "block"},
    "random_orthogonal": {"kind", "size", "seed"},
    "perturbed": {"kind", "size", "seed", "eps", "base"},
}


#: learned rotation kinds -> ``build(d, n, *, arrays, calib, quantizer) -> Rotation``; filled by the
#: modules that learn them (:mod:`mlx_dupq.rotation.dfrot`, imported by the package ``__init__``),
#: so this module needs no import of theirs.
LEARNERS: dict[str, Callable[..., "Rotation"]] = {}


def make_rotation(spec: Any, n: int, *, arrays: Mapping[str, mx.array] | None = None,
                  calib: mx.array | None = None, quantizer=None) -> Rotation:
    """Build the rotation of width ``n`` that ``spec`` describes.

    spec:      a kind name, or a dict as written by :meth:`Rotation.to_dict` (``size`` optional)
    arrays:    stored arrays of a learned rotation (``Rotation.arrays()``), to rebuild a dfrot
    calib:     (tokens, n) calibration activations, to *learn* a dfrot rotation
    quantizer: fake-quantizer callback for dfrot learning (see :func:`mlx_dupq.rotation.dfrot.dfrot`)
    """
    d = _spec_dict(spec)
    kind = d.get("kind")
    if kind not in KINDS:
        raise DupqError(f"unknown rotation kind {kind!r}; use one of {', '.join(KINDS)}")
    size = d.get("size", n)
    if size != n:
        raise DupqError(
            f"{kind} rotation was recorded for width {size} but is applied to width {n}; "
            "the pack does not match this model"
        )
    if kind in LEARNERS:  # a learned kind (dfrot): rebuilt from its stored matrix or learned from calib
        return LEARNERS[kind](d, n, arrays=arrays, calib=calib, quantizer=quantizer)
    unknown = set(d) - _ALLOWED[kind]
    if unknown:
        raise DupqError(
            f"unknown option(s) {sorted(unknown)} for rotation kind {kind}; "
            f"known: {', '.join(sorted(_ALLOWED[kind] - {'kind'}))}"
        )
    seed = int(d.get("seed", 0))
    if kind == "identity":
        return identity(n)
    if kind == "hadamard":
        return hadamard(n)
    if kind == "randomized_hadamard":
        return randomized_hadamard(n, seed)
    if kind == "block_hadamard":
        return block_hadamard_rotation(n, seed, d.get("block"))
    if kind == "random_orthogonal":
        return random_orthogonal(n, seed)
    return perturbed(n, seed, d.get("eps", 0.05), d.get("base"))
