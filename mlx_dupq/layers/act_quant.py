"""Fake-quantized linear inputs at run time (docs/quality.md, F3): ``ActQuantInput(linear, spec)(x) == linear(q(x))``.

Where the wrapper goes: QuaRot quantizes activations *after* the online rotation (the point of
rotating is that the rotated activation has no outliers), so for a ``RotatedInput`` the wrapper is
installed *inside* it, between the rotation and the linear::

    RotatedInput(linear) -> RotatedInput(ActQuantInput(linear))     # x -> q(x @ R) -> linear

Any linear-like module works inside: nn.Linear, nn.QuantizedLinear, DupqLinear and the switch
(expert) layers, whose extra arguments (``indices``, ...) are passed through. ``lm_head`` and
routers are skipped (their inputs stay in float). Static ranges are keyed by the module's path in
the model (``model.layers.0.mlp.down_proj``), wherever the wrapper sits.

Install the wrappers after loading the weights: the wrapped linear's parameters move under
``<path>.linear.*``. The spec and the range are plain Python values, not parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..specs import LM_HEAD_PATTERN, ROUTER_PATTERN, ActSpec
from ..errors import DupqError
from ..quant.act import fake_quant, massive_mask, static_range
from .online_rotation import RotatedInput
from .quant_linear import DupqLinear, DupqSwitchLinear

DEFAULT_SKIP = f"{LM_HEAD_PATTERN}|{ROUTER_PATTERN}"
MAX_SAMPLES = 1 << 18  # calibration values kept per linear (a uniform subsample beyond that)


class _Observer:
    """Calibration inputs of one linear: the exact max |x| and a uniform subsample of |x|."""

    def __init__(self, spec: ActSpec, max_samples: int, seed: int):
        self.spec = spec
        self.max_samples = max_samples
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.samples = np.zeros((0,), dtype=np.float32)

    def add(self, x: mx.array) -> None:
        xf = x.astype(mx.float32).reshape(-1, x.shape[-1])
        if self.spec.keep_massive:  # the range is for what gets quantized
            xf = mx.where(massive_mask(xf, self.spec.massive_rule), 0.0, xf)
        a = np.abs(np.array(xf)).reshape(-1)
        n, cap = a.size, self.max_samples
        total = self.seen + n
        if total > cap:  # stratified merge: each side keeps its share of the cap
            keep_old = min(self.samples.size, round(cap * self.seen / total))
            keep_new = min(n, cap - keep_old)
            old = self.rng.choice(self.samples, keep_old, replace=False) if keep_old < self.samples.size else self.samples
            new = self.rng.choice(a, keep_new, replace=False) if keep_new < n else a
            amax = max(float(a.max()), float(self.samples.max()) if self.samples.size else 0.0)
            self.samples = np.concatenate([old, new, [amax]]).astype(np.float32)  # never lose the max
        else:
            self.samples = np.concatenate([self.samples, a])
        self.seen = total


class _KeptLog:
    """A plain holder (a list attribute would become part of the module's parameter tree)."""

    def __init__(self):
        self.values: list[float] = []


class ActQuantInput(nn.Module):
    """Wrap a linear-like module: (..., n) -> linear(fake_quant(x)), extra arguments passed on.

    static_range: the calibrated clip value (static mode). ``kept`` records the share of entries
    kept in float as massive on each call, but only while ``track`` is True (it syncs).
    """

    def __init__(self, linear: nn.Module, spec: ActSpec, static_range: float | None = None):
        super().__init__()
        if spec.mode == "static" and static_range is None and not spec.passthrough:
            raise DupqError("static activation quantization needs a calibrated range for every linear; "
                            "pass static_ranges (see calibrate_static_ranges) or use mode = \"dynamic\"")
        self.linear = linear
        self._spec = spec
        self._range = None if static_range is None else float(static_range)
        self._observer: _Observer | None = None
        self.track = False
        self._kept = _KeptLog()

    @property
    def kept(self) -> list[float]:
        """Share of entries kept in float, one value per call made while ``track`` was on."""
        return self._kept.values

    @property
    def spec(self) -> ActSpec:
        return self._spec

    @property
    def static_range(self) -> float | None:
        return self._range

    def __call__(self, x: mx.array, *args, **kwargs):
        if self._observer is not None:  # calibrating: record the float input, do not quantize
            self._observer.add(x)
            return self.linear(x, *args, **kwargs)
        y, kept = fake_quant(x, self._spec, self._range)
        if self.track:
            self._kept.values.append(float(kept.item()))
        return self.linear(y, *args, **kwargs)


def _is_linear(m: nn.Module) -> bool:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return isinstance(m, (nn.Linear, nn.QuantizedLinear, DupqLinear, SwitchLinear, QuantizedSwitchLinear,
                          DupqSwitchLinear))


def act_targets(model: nn.Module, skip: str | Callable[[str], bool] | None = DEFAULT_SKIP) -> dict[str, tuple[str, nn.Module]]:
    """``{model path: (where the wrapper goes, module there)}`` for every linear not skipped.

    skip: a regular expression searched in the path, or a predicate ``path -> bool``; the default
    skips lm_head and routers. A RotatedInput at ``p`` puts the wrapper at ``p.linear``.
    """
    if skip is None:
        skipped = lambda p: False  # noqa: E731
    elif callable(skip):
        skipped = skip
    else:
        pattern = re.compile(skip)
        skipped = lambda p: pattern.search(p) is not None  # noqa: E731
    mods = dict(model.named_modules())
    out: dict[str, tuple[str, nn.Module]] = {}
    for path, m in mods.items():
        parent_path = path.rpartition(".")[0]
        if isinstance(mods.get(parent_path), (RotatedInput, ActQuantInput)) and path.endswith(".linear"):
            continue  # the inner linear of a wrapper: handled through the wrapper's path
        if isinstance(m, RotatedInput):
            inner = m.linear
            if isinstance(inner, ActQuantInput) or _is_linear(inner):
                if not skipped(path):
                    out[path] = (f"{path}.linear", inner)
        elif isinstance(m, ActQuantInput) or _is_linear(m):
            if not skipped(path):
                out[path] = (path, m)
    return out


def apply_act_quant(model: nn.Module, spec: ActSpec, static_ranges: Mapping[str, float] | None = None,
                    skip: str | Callable[[str], bool] | None = DEFAULT_SKIP) -> list[str]:
    """Wrap every linear (except lm_head / routers, or what ``skip`` says) as ActQuantInput.

    static_ranges: ``{model path: clip value}``, required for every wrapped linear in static mode.
    Returns the wrapped model paths. Applying it twice is an error (use :func:`remove_act_quant`).
    """
    targets = act_targets(model, skip)
    wrapped = []
    for path, (where, m) in targets.items():
        if isinstance(m, ActQuantInput):
            raise DupqError(f"{path} already has an activation quantizer; call remove_act_quant first")
        r = (static_ranges or {}).get(path)
        if spec.mode == "static" and not spec.passthrough and r is None:
            raise DupqError(f"no static activation range for {path}; calibrate with calibrate_static_ranges "
                            "on this model or use mode = \"dynamic\"")
        wrapped.append((where, ActQuantInput(m, spec, r)))
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))
    return list(targets)


def remove_act_quant(model: nn.Module) -> list[str]:
    """Unwrap every ActQuantInput (the inverse of :func:`apply_act_quant`); returns where they were."""
    found = [(p, m.linear) for p, m in model.named_modules() if isinstance(m, ActQuantInput)]
    if found:
        model.update_modules(tree_unflatten(found))
    return [p for p, _ in found]


def act_quant_modules(model: nn.Module) -> dict[str, ActQuantInput]:
    """``{model path: wrapper}`` of the installed activation quantizers."""
    return {path: where_m[1] for path, where_m in act_targets(model, None).items()
            if isinstance(where_m[1], ActQuantInput)}


def calibrate_static_ranges(model: nn.Module, tokens: mx.array, spec: ActSpec,
                            skip: str | Callable[[str], bool] | None = DEFAULT_SKIP, batch: int = 4,
                            max_samples: int = MAX_SAMPLES, seed: int = 0) -> dict[str, float]:
    """Static clip values ``{model path: float}`` from running ``tokens`` (n, L) int through ``model``.

    The inputs are recorded in float (installed quantizers are paused), behind any online
    rotation, and reduced by :func:`mlx_dupq.quant.act.static_range` (max / percentile / KL, times
    clip_ratio). Up to ``max_samples`` values per linear are kept (a uniform subsample, plus the max).
    The model is left as it was.
    """
    if tokens.ndim == 1:
        tokens = tokens[None]
    targets = act_targets(model, skip)
    if not targets:
        raise DupqError("the model has no linear layers to calibrate activation ranges for")
    temp = [(where, ActQuantInput(m, ActSpec())) for path, (where, m) in targets.items()
            if not isinstance(m, ActQuantInput)]
    if temp:
        model.update_modules(tree_unflatten(temp))
    try:
        quantizers = act_quant_modules(model)
        for i, (path, q) in enumerate(sorted(quantizers.items())):
            q._observer = _Observer(spec, max_samples, seed + i)
        for i in range(0, tokens.shape[0], batch):
            mx.eval(model(tokens[i : i + batch]))
        ranges = {path: static_range(q._observer.samples, spec) for path, q in quantizers.items()
                  if path in targets}
    finally:
        for q in act_quant_modules(model).values():
            q._observer = None
        if temp:
            model.update_modules(tree_unflatten([(where, w.linear) for where, w in temp]))
    return dict(sorted(ranges.items()))


def massive_share(model: nn.Module) -> dict[str, float]:
    """Mean share of entries kept in float per wrapper, over the calls made while ``track`` was on."""
    return {p: float(np.mean(q.kept)) for p, q in act_quant_modules(model).items() if q.kept}
