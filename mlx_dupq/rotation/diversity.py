"""Rotation diversity (F4.5): how different two rotations are, and picking dissimilar ones.

Two orthogonal (n, n) matrices both have Frobenius norm sqrt(n), so the angle between them as
vectors of R^(n*n) is ``theta = arccos(<R1, R2>_F / n) = arccos(tr(R1^T R2) / n)``: 0 for equal
rotations, ~pi/2 for independent random ones (their inner product is ~0). It is cheap (one
elementwise product) and is the "angular distance" the documents' copy-diversity selection uses.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .rotations import Rotation


def angular_distance(a: Rotation | mx.array, b: Rotation | mx.array) -> float:
    """Angle in radians between two (n, n) rotations seen as vectors: arccos(tr(A^T B) / n)."""
    ma = a.matrix() if isinstance(a, Rotation) else a
    mb = b.matrix() if isinstance(b, Rotation) else b
    if ma.shape != mb.shape:
        raise ValueError(f"rotations of different sizes {tuple(ma.shape)} and {tuple(mb.shape)}")
    c = float(mx.sum(ma.astype(mx.float32) * mb.astype(mx.float32))) / ma.shape[0]
    return math.acos(max(-1.0, min(1.0, c)))


def distance_matrix(rotations: list) -> list[list[float]]:
    """Pairwise angular distances, a symmetric (k, k) nested list with zeros on the diagonal."""
    k = len(rotations)
    mats = [r.matrix() if isinstance(r, Rotation) else r for r in rotations]
    d = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            d[i][j] = d[j][i] = angular_distance(mats[i], mats[j])
    return d


def most_dissimilar_pair(rotations: list) -> tuple[int, int]:
    """Indices (i, j), i < j, of the two rotations farthest apart."""
    if len(rotations) < 2:
        raise ValueError("need at least two rotations to pick a pair")
    d = distance_matrix(rotations)
    k = len(rotations)
    return max(((i, j) for i in range(k) for j in range(i + 1, k)), key=lambda ij: d[ij[0]][ij[1]])


def greedy_diverse(rotations: list, k: int) -> list[int]:
    """k indices: the most dissimilar pair, then repeatedly the rotation farthest from the chosen set
    (max-min angular distance). Deterministic; ties go to the lower index."""
    if not 1 <= k <= len(rotations):
        raise ValueError(f"cannot pick {k} of {len(rotations)} rotations")
    if k == 1:
        return [0]
    d = distance_matrix(rotations)
    chosen = list(most_dissimilar_pair(rotations))
    while len(chosen) < k:
        rest = [i for i in range(len(rotations)) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][c] for c in chosen), -i)))
    return chosen[:k]
