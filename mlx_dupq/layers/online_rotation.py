"""Run-time rotation of a linear layer's input, for rotations that cannot be folded offline.

``RotatedInput(linear, R)(x) == linear(x @ R)``. With the weight folded as ``W <- W R`` offline
(:func:`mlx_dupq.rotation.fold.rotate_linear_input`), the pair computes the original function
while the quantized weight and the activation both live in the rotated basis (QuaRot's online
Hadamard before down_proj; partial rotation of chosen layers).

A pack records the rotations as ``{module_path: rotation_dict}`` in config.json; the loader
rebuilds the model, loads (and quantizes) its weights, and then calls
:func:`apply_online_rotations`. Install the wrappers *after* loading: the wrapped linear's
parameters move under ``<path>.linear.*``. The rotation's arrays are not module parameters,
so they are neither trained nor saved with the weights (learned ones travel via ``arrays``).

On a custom-kernel backend (metal / cuda, :mod:`mlx_dupq.kernels.route`) a decode call with a
(randomized / block) Hadamard rotation and a packed linear runs as one fused kernel
(``hadamard_qmv``); elsewhere the rotation and the linear run as above.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn

from ..errors import DupqError
from ..kernels import route
from ..rotation.rotations import Rotation, make_rotation


class RotatedInput(nn.Module):
    """Wrap any linear-like module (nn.Linear, nn.QuantizedLinear, custom): (..., n) -> linear(x @ R)."""

    def __init__(self, linear: nn.Module, rotation: Rotation):
        super().__init__()
        self.linear = linear
        self.rotation = rotation  # not an mx.array: kept out of the parameter tree

    def __call__(self, x: mx.array) -> mx.array:
        y = route.rotated(self, x)  # Hadamard fused with the matmul on a custom-kernel backend
        return self.linear(self.rotation.apply(x)) if y is None else y


def in_features(module: nn.Module) -> int | None:
    """Input width of a linear-like module, or None when it cannot be told."""
    if isinstance(module, nn.QuantizedLinear):
        return module.scales.shape[-1] * module.group_size
    n = getattr(module, "in_features", None)
    if isinstance(n, int):
        return n
    w = module.get("weight") if isinstance(module, dict) else None
    if isinstance(w, mx.array) and w.dtype in (mx.float32, mx.float16, mx.bfloat16):
        return w.shape[-1]
    return None


def _locate(model: nn.Module, path: str):
    """(parent, key, module) for a dotted module path; integer parts index lists."""
    parent, key, node = None, None, model
    for part in path.split("."):
        parent = node
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            key, node = int(part), node[int(part)]
        elif isinstance(node, dict) and part in node:
            key, node = part, node[part]
        else:
            raise DupqError(
                f"online rotation for {path}: the model has no module there; "
                "the pack's config.json does not match this model"
            )
    if not isinstance(node, nn.Module):
        raise DupqError(
            f"online rotation for {path}: that is not a module; "
            "the pack's config.json does not match this model"
        )
    return parent, key, node


def apply_online_rotations(model: nn.Module, entries: Mapping[str, object],
                           arrays: Mapping[str, Mapping[str, mx.array]] | None = None) -> list[str]:
    """Wrap each listed module as ``RotatedInput``; returns the wrapped paths.

    entries: ``{module_path: rotation_dict | Rotation}`` (e.g. ``model.layers.0.mlp.down_proj``)
    arrays:  ``{module_path: Rotation.arrays()}`` for learned rotations (dfrot)
    """
    done = []
    built: dict[str, Rotation] = {}  # one Rotation per distinct dict (partial rotation repeats them)
    for path, spec in entries.items():
        parent, key, module = _locate(model, path)
        if isinstance(module, RotatedInput):
            raise DupqError(f"{path} already has an online rotation; apply the pack's rotations once")
        n = in_features(module)
        if isinstance(spec, Rotation):
            rot = spec
        else:
            size = spec.get("size", n) if isinstance(spec, Mapping) else n
            if size is None:
                raise DupqError(f"online rotation for {path}: its width is unknown; record 'size' in the rotation dict")
            learned = (arrays or {}).get(path)
            if learned is not None:
                rot = make_rotation(spec, size, arrays=learned)
            else:
                cache_key = json.dumps([spec, size], sort_keys=True, default=str)
                if cache_key not in built:
                    built[cache_key] = make_rotation(spec, size)
                rot = built[cache_key]
        if n is not None and rot.size != n:
            raise DupqError(
                f"online rotation for {path} has width {rot.size} but the module takes {n} inputs; "
                "the pack does not match this model"
            )
        wrapped = RotatedInput(module, rot)
        if isinstance(parent, list):
            parent[key] = wrapped
        else:
            setattr(parent, key, wrapped)
        done.append(path)
    return done


def online_rotations(model: nn.Module) -> dict[str, dict]:
    """``{module_path: rotation_dict}`` of every installed RotatedInput (what config.json records)."""
    return {
        path: m.rotation.to_dict()
        for path, m in model.named_modules()
        if isinstance(m, RotatedInput)
    }
