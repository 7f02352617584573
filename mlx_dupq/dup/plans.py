"""Duplication plans (F5.1): which decoder layers get how many copies, and how copies differ.

Every constructor returns a :class:`~mlx_dupq.dup.specs.DupPlan` naming decoder layers by index
only (the embedding and lm_head are never duplicated, F5.6). Counts are *total* copies per layer:
``copies=2`` means the layer runs twice. The copies of a layer are differentiated by
:func:`diversify` unless a list of CopySpecs is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import DupqError
from .scores import LayerScore
from .specs import DIVERSITY, GRID_OFFSETS, CopySpec, DupPlan, diversify  # noqa: F401  (re-exported)

SCALE_MULTS = (1.0, 1.05, 0.95)


def _plan(counts: Mapping[int, int | Sequence[CopySpec]], by: str, **kw) -> DupPlan:
    copies = {k: (diversify(c, by) if isinstance(c, int) else list(c)) for k, c in counts.items()}
    return DupPlan(copies=copies, **kw)


def _ranked(scores: Sequence[LayerScore] | Sequence[float]) -> list[int]:
    """Layer indices, highest score first (ties: the later layer first)."""
    vals = [s.score if isinstance(s, LayerScore) else float(s) for s in scores]
    return sorted(range(len(vals)), key=lambda k: (-vals[k], -k))


def global_plan(n_layers: int, copies: int = 2, by: str = "scale", **kw) -> DupPlan:
    """Every decoder layer duplicated (``copies`` total each; the seed's "every layer x1" is 2)."""
    return _plan({k: copies for k in range(n_layers)}, by, **kw)


def selective_plan(scores, fraction: float = 0.3, copies: int = 2, by: str = "scale", **kw) -> DupPlan:
    """The top ``fraction`` (0.3..0.5 in the seed) of layers by score, ``copies`` each (at least one layer)."""
    if not 0.0 < fraction <= 1.0:
        raise DupqError(f"selective fraction {fraction} is out of range; use a share in (0, 1], e.g. 0.3")
    n = max(1, round(fraction * len(scores)))
    return _plan({k: copies for k in _ranked(scores)[:n]}, by, **kw)


def critical_plan(scores, top_n: int = 3, copies: int = 3, by: str = "scale", **kw) -> DupPlan:
    """The ``top_n`` highest-scoring layers, ``copies`` (3) each."""
    if top_n < 1:
        raise DupqError(f"critical top-N needs N >= 1, got {top_n}")
    return _plan({k: copies for k in _ranked(scores)[:top_n]}, by, **kw)


def last_n_plan(n_layers: int, n: int, copies: int = 2, by: str = "scale", **kw) -> DupPlan:
    """The last ``n`` decoder layers, ``copies`` (1..5) each."""
    if not 1 <= copies <= 5:
        raise DupqError(f"last-N plans use 1..5 copies, got {copies}")
    if not 1 <= n <= n_layers:
        raise DupqError(f"last-N needs 1 <= N <= {n_layers} layers, got {n}")
    return _plan({k: copies for k in range(n_layers - n, n_layers)}, by, **kw)


def progressive_plan(n_layers: int, front: int = 1, middle: int = 2, back: int = 3, by: str = "scale", **kw) -> DupPlan:
    """Thirds of the model get different copy counts (front / middle / back); counts of 1 are left out."""
    third = n_layers / 3
    counts = {}
    for k in range(n_layers):
        c = front if k < round(third) else (middle if k < round(2 * third) else back)
        if c > 1:
            counts[k] = c
    return _plan(counts, by, **kw)


def explicit_plan(copies: Mapping[int, int | Sequence[CopySpec]], by: str = "scale", **kw) -> DupPlan:
    """A plan given per layer: ``{layer: count or [CopySpec, ...]}``."""
    return _plan(dict(copies), by, **kw)
