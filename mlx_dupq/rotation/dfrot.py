"""DFRot-style optimised rotation: refine a randomized Hadamard so quantization hurts less.

DFRot (Xiang et al., "DFRot: Achieving Outlier-Free and Massive Activation-Free for Rotated LLMs
with Refined Rotation", code github.com/JingyangXiang/DFRot) observes that a randomized Hadamard
spreads ordinary outliers well but leaves a *larger* quantization error than no rotation on the
few tokens with massive activations, and those tokens matter. It refines ``R0`` (a randomized
Hadamard) by alternating two steps on calibration activations ``X`` (tokens, n), with the
massive-activation tokens multiplied by ``gamma``:

1. ``B = Q(X R)``                  quantize the rotated activations (fixed R)
2. ``dR = argmin_{orth} ||X R dR - B||_F = U V^T`` with ``U S V^T = svd((X R)^T B)``
   (orthogonal Procrustes), ``R <- R dR``

Scaling a token by ``gamma`` scales its per-token quantization error by ``gamma``, so the
objective minimised here is the weighted squared error

    L(R) = sum_t w_t ||x_t R - Q(x_t R)||^2,   w_t = gamma^2 for massive tokens, 1 otherwise,

which equals DFRot's for any scale-equivariant quantizer and stays well defined for others (the
Procrustes step uses the same weights). We keep the best ``R`` seen, so ``L`` never ends above its
start, and stop after ``patience`` steps without improvement.

Choices where the paper's code is model-specific (written down here, measured by the benches):

- massive tokens: ``max_j |x_tj| > massive_ratio * mean(|X|)`` (docs/quality.md, F3.3, default 100), measured in
  the unrotated basis. DFRot's scripts use a per-model error threshold instead.
- ``gamma="adaptive"``: the weight that gives the massive tokens the same share of the start
  objective as all other tokens together, ``sqrt(E_normal / E_massive)``, clipped to the
  documents' range [50, 200].
- default quantizer: per-token symmetric absmax fake-quant at 4 bits (DFRot's activation setting);
  pass any callback ``(tokens, n) -> (tokens, n)`` instead (e.g. weight rows at 2 bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import mlx.core as mx
import numpy as np

from ..errors import DupqError
from .rotations import LEARNERS, Rotation, from_learned, make_rotation

Quantizer = Callable[[mx.array], mx.array]
GAMMA_RANGE = (50.0, 200.0)


def per_token_quantizer(bits: int = 4, clip_ratio: float = 1.0) -> Quantizer:
    """Symmetric per-token absmax fake-quant: (tokens, n) -> (tokens, n), levels in [-2^(b-1), 2^(b-1)-1]."""
    if int(bits) < 2:
        raise DupqError(f"dfrot's per-token quantizer needs at least 2 bits, got {bits}; pass bits >= 2")
    qmax = 2 ** (int(bits) - 1) - 1

    def quantize(y: mx.array) -> mx.array:
        s = mx.max(mx.abs(y), axis=-1, keepdims=True) * (clip_ratio / qmax)
        s = mx.where(s == 0, 1.0, s)
        return mx.clip(mx.round(y / s), -qmax - 1, qmax) * s

    quantize.__name__ = f"per_token_w{int(bits)}"
    return quantize


def massive_tokens(x: mx.array, ratio: float = 100.0) -> mx.array:
    """(tokens, n) -> (tokens,) bool: tokens whose largest |x| exceeds ``ratio`` times mean |x|."""
    a = mx.abs(x.astype(mx.float32))
    return mx.max(a, axis=-1) > ratio * mx.mean(a)


def token_errors(y: mx.array, quantizer: Quantizer) -> mx.array:
    """(tokens, n) -> (tokens,) squared quantization error per token, float32."""
    y = y.astype(mx.float32)
    return mx.sum(mx.square(y - quantizer(y)), axis=-1)


def objective(x: mx.array, rotation: mx.array, weights: mx.array, quantizer: Quantizer) -> float:
    """L(R) = sum_t w_t ||x_t R - Q(x_t R)||^2 for (tokens, n) x, (n, n) R, (tokens,) w."""
    return float(mx.sum(weights * token_errors(x @ rotation, quantizer)))


def _gamma(gamma, start_err: mx.array, mask: mx.array) -> float:
    if gamma == "adaptive":
        n_mass = int(mx.sum(mask))
        if n_mass == 0 or n_mass == mask.size:
            return GAMMA_RANGE[0]
        e_mass = float(mx.sum(mx.where(mask, start_err, 0.0)))
        e_norm = float(mx.sum(mx.where(mask, 0.0, start_err)))
        g = math.sqrt(e_norm / e_mass) if e_mass > 0 else GAMMA_RANGE[1]
        return float(min(max(g, GAMMA_RANGE[0]), GAMMA_RANGE[1]))
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        g = -1.0
    if not g >= 1.0:
        raise DupqError(
            f"dfrot gamma {gamma!r} is not valid; "
            "use a number >= 1 (the documents use 50, 100, 150, 200) or 'adaptive'"
        )
    return g


def dfrot(
    x: mx.array,
    quantizer: Quantizer | None = None,
    *,
    gamma: float | str = 100,
    steps: int = 100,
    seed: int = 0,
    start: Mapping | None = None,
    bits: int = 4,
    massive_ratio: float = 100.0,
    patience: int = 10,
) -> Rotation:
    """Learn a DFRot rotation of width n from calibration activations.

    x:         (tokens, n) activations at the point the rotation acts on (e.g. RMSNorm outputs)
    quantizer: callback (tokens, n) -> (tokens, n) fake-quant; default per-token ``bits``-bit
    gamma:     weight on massive-activation tokens (>= 1) or ``"adaptive"``
    start:     rotation spec of ``R0`` (default ``block_hadamard`` with ``seed``: a full
               randomized Hadamard where the width allows); must have no dense part
    Returns a ``dfrot`` :class:`Rotation` ``R = R0 . D``; its dict records the gamma used, the
    number of massive tokens and the objective before and after.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise DupqError(
            f"dfrot needs calibration activations shaped (tokens, hidden), got {tuple(x.shape)}; "
            "collect activations first"
        )
    n = x.shape[-1]
    x = x.astype(mx.float32)
    q = quantizer if quantizer is not None else per_token_quantizer(bits)
    r0 = make_rotation(dict(start) if start is not None else {"kind": "block_hadamard", "seed": seed}, n)
    if r0.dense is not None:
        raise DupqError(
            f"dfrot must start from a Hadamard-type rotation, not {r0.kind}; "
            "use block_hadamard or randomized_hadamard"
        )
    xs = r0.apply(x)
    mask = massive_tokens(x, massive_ratio)
    g = _gamma(gamma, token_errors(xs, q), mask)
    w = mx.where(mask, g * g, 1.0).astype(mx.float32)

    eye = mx.eye(n, dtype=mx.float32)
    r = np.eye(n)
    best_r, best = r, objective(xs, eye, w, q)
    start_loss, stall, steps_run = best, 0, 0
    for steps_run in range(1, int(steps) + 1):
        r32 = mx.array(r.astype(np.float32))
        y = xs @ r32
        c = (y * w[:, None]).T @ q(y)  # (n, n) weighted cross-covariance
        u, _, vt = np.linalg.svd(np.array(c, dtype=np.float64))
        r = r @ (u @ vt)
        loss = objective(xs, mx.array(r.astype(np.float32)), w, q)
        if loss < best:
            best_r, best, stall = r, loss, 0
        else:
            stall += 1
            if stall >= patience:
                break
    # re-orthonormalise the accumulated float64 product before storing it as float32
    u, _, vt = np.linalg.svd(best_r)
    learned = mx.array((u @ vt).astype(np.float32))
    meta = {
        "kind": "dfrot",
        "seed": int(seed),
        "gamma": gamma if gamma == "adaptive" else float(gamma),
        "gamma_used": g,
        "steps": int(steps),
        "steps_run": steps_run,
        "massive_ratio": float(massive_ratio),
        "massive_tokens": int(mx.sum(mask)),
        "quantizer": getattr(q, "__name__", "custom"),
        "objective_start": start_loss,
        "objective_end": best,
    }
    if quantizer is None:
        meta["bits"] = int(bits)
    return from_learned(r0, learned, meta)


_LEARN_KEYS = ("gamma", "steps", "seed", "start", "bits", "massive_ratio")


def dfrot_from_dict(d: dict, n: int, *, arrays: Mapping[str, mx.array] | None = None,
                    calib: mx.array | None = None, quantizer: Quantizer | None = None) -> Rotation:
    """Rebuild a dfrot rotation from its dict + stored matrix, or learn it from ``calib``."""
    if arrays is not None and "dense" in arrays:
        dense = arrays["dense"]
        if tuple(dense.shape) != (n, n):
            raise DupqError(
                f"stored dfrot matrix has shape {tuple(dense.shape)}, expected ({n}, {n}); "
                "the pack is inconsistent, re-convert it"
            )
        r0 = make_rotation(d.get("start", {"kind": "block_hadamard", "seed": d.get("seed", 0)}), n)
        meta = {k: v for k, v in d.items() if k not in ("size", "start")}
        return from_learned(r0, dense, meta)
    if calib is None:
        raise DupqError(
            "a dfrot rotation needs its stored matrix (from the pack) or calibration activations to learn it; "
            "pass arrays= or calib="
        )
    if calib.shape[-1] != n:
        raise DupqError(
            f"dfrot calibration activations have width {calib.shape[-1]}, expected {n}; "
            "collect them at the rotated layer's input"
        )
    kw = {k: d[k] for k in _LEARN_KEYS if k in d}
    return dfrot(calib, quantizer, **kw)


LEARNERS["dfrot"] = dfrot_from_dict
