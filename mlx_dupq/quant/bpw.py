"""Honest size accounting: bits actually stored per parameter of the float model.

The all-in bits per weight of a pack is::

    8 * (every stored byte: codes, scales, biases -- including the implied symmetric biases mlx's
         format forces us to store --, norms, unquantized tensors, duplicated copies)
    / (number of parameters of the float model)

The denominator is the *float* model's parameter count (from its shapes), never the packed
arrays' element count, so packing tricks cannot shrink it and layer copies add to the
numerator only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import mlx.core as mx

from ..errors import DupqError


def tensor_bits(arrays: Mapping[str, mx.array] | Iterable[mx.array]) -> int:
    """Bits stored by ``arrays`` (a name -> array dict or any iterable of arrays): 8 * sum(nbytes)."""
    values = arrays.values() if isinstance(arrays, Mapping) else arrays
    return 8 * sum(int(a.nbytes) for a in values)


def count_params(shapes: Mapping[str, Sequence[int]] | Iterable[Sequence[int]]) -> int:
    """Number of parameters of a float model from its tensor shapes (name -> shape, or shapes)."""
    values = shapes.values() if isinstance(shapes, Mapping) else shapes
    return sum(math.prod(int(d) for d in s) for s in values)


def entry_params(entry: Mapping) -> int:
    """Float parameters a packed weight stands for (its entry's ``shape``)."""
    return math.prod(int(d) for d in entry["shape"])


def bits_per_weight(stored_bits: int, n_params: int) -> float:
    """``stored_bits / n_params``; raises DupqError when there are no parameters to divide by."""
    if n_params <= 0:
        raise DupqError(f"cannot compute bits per weight of a model with {n_params} parameters; check the model's shapes")
    return stored_bits / n_params
