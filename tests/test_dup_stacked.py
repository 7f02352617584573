"""CPU decode of DupLinear: all copies in one stacked quantized matmul (layers/dup_linear.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_dupq.config import QuantSpec
from mlx_dupq.dup.copies import load_copies, pack_copies
from mlx_dupq.dup.specs import CopySpec
from mlx_dupq.layers.dup_linear import DupLinear, copy_kernel


def _layer(spec: QuantSpec, mode: str, mix=None, specs=None, out=96, n=128):
    w = mx.random.normal((out, n), key=mx.random.key(3))
    specs = specs or [CopySpec(), CopySpec(scale_mult=1.05),
                      CopySpec(scale_mult=0.95) if spec.symmetric else CopySpec(grid_offset=0.25)]
    packed = pack_copies(w, spec, specs, mode=mode)
    return DupLinear(load_copies(w.shape, packed), mode, mix=mix)


def _per_copy(layer: DupLinear, x: mx.array) -> mx.array:
    object.__setattr__(layer, "_stacked", lambda x: None)  # the one-matmul-per-copy path
    try:
        return layer(x)
    finally:
        object.__delattr__(layer, "_stacked")


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(3, 32), QuantSpec(2, 128, symmetric=True)])
@pytest.mark.parametrize("mode,mix", [("parallel", None), ("parallel", "scalar"), ("parallel", "channel"),
                                      ("residual", None)])
def test_stacked_equals_per_copy(spec, mode, mix):
    mixes = {"scalar": mx.array([0.5, 0.3, 0.2]), "channel": mx.random.uniform(shape=(3, 96), key=mx.random.key(1))}
    layer = _layer(spec, mode, mixes.get(mix))
    x = mx.random.normal((1, 128), key=mx.random.key(2))
    with mx.stream(mx.cpu):
        y = layer(x)
        assert layer._stack[1] is not None, "stack built for same-format copies"
        ref = _per_copy(layer, x)
    assert mx.allclose(y, ref, atol=1e-4, rtol=1e-4).item()


def test_stack_shares_codes_and_follows_replaced_arrays():
    layer = _layer(QuantSpec(2, 64), "residual")
    x = mx.random.normal((2, 128), key=mx.random.key(4))
    y0 = layer(x)
    st = layer._stack[1]
    assert st.weight.shape[0] == 3 * 96
    for c in layer.copies:  # each copy reads its rows of the stack: arrays are views, not copies
        assert copy_kernel(c).weight.shape == (96, 128 * 2 // 32)
    # replacing a copy's codes rebuilds the stack (no stale kernel)
    c0 = layer.copies[0]
    c0["weight"] = mx.zeros_like(c0["weight"])
    y1 = layer(x)
    assert layer._stack[1] is not st
    assert mx.allclose(y1, _per_copy(layer, x), atol=1e-4).item()
    assert not mx.allclose(y0, y1).item()


def test_no_stack_for_prefill_mixed_formats_or_shared_codes():
    x = mx.random.normal((32, 128), key=mx.random.key(5))
    layer = _layer(QuantSpec(2, 64), "parallel")
    layer(x)  # 32 rows: the dense prefill rule, no stack
    assert getattr(layer, "_stack", None) is None
    mixed = _layer(QuantSpec(2, 64), "parallel", specs=[CopySpec(), CopySpec(quant=QuantSpec(3, 64))])
    mixed(x[:1])
    assert mixed._stack[1] is None  # different bit widths: one matmul per copy
    shared = _layer(QuantSpec(2, 64), "parallel", specs=[CopySpec(), CopySpec(scale_mult=1.05, shared_codes=True)])
    y = shared(x[:1])
    assert shared._stack[1] is None  # shared codes stay held once
    assert mx.allclose(y, _per_copy(shared, x[:1]), atol=1e-4).item()


def test_quantile_scale_copies():
    from mlx_dupq.dup.copies import make_copies, quantile_clip
    from mlx_dupq.quant.qtensor import dequantize

    w = mx.random.normal((64, 128), key=mx.random.key(7))
    w = w.at[0, 5].add(12.0)  # one outlier in group 0 of row 0
    spec = QuantSpec(2, 64)
    full, q95 = make_copies(w, spec, [CopySpec(), CopySpec(quantile=0.95)])
    assert abs(float(q95.scales[0, 0].item())) < 0.5 * abs(float(full.scales[0, 0].item()))  # the outlier no longer sets the range
    # the bulk of the weights is represented better; the clipped outlier worse
    err = lambda qt: mx.abs(dequantize(qt) - w)  # noqa: E731
    mask = mx.ones(w.shape).at[0, 5].add(-1.0)
    assert float((err(q95) * mask).sum().item()) < float((err(full) * mask).sum().item())
    c = quantile_clip(w, spec, 0.95)
    assert float(c.max().item()) < 12.0 and c.shape == w.shape
    assert CopySpec.from_dict(CopySpec(quantile=0.97).to_dict()).quantile == 0.97
    assert "quantile" not in CopySpec().to_dict()  # the default leaves existing plan dicts unchanged
    with pytest.raises(Exception, match="quantile"):
        CopySpec(quantile=0.5)
