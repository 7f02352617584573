"""The CPU dense-experts path of MoE blocks (:class:`mlx_dupq.layers.cpu.DensePrefillSwitchGLU`):
every expert on every token, the picked rows taken; against mlx-lm's gather path."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_dupq.layers.cpu import DensePrefillSwitchGLU, use_dense_prefill
from mlx_dupq.layers.quant_linear import build_module, quantize_tensor
from mlx_dupq.quant.rtn import rtn_quantize
from mlx_dupq.refine.e2e import mark_trainable
from mlx_dupq.refine.fakequant import FakeQuantSwitchLinear
from mlx_dupq.refine.train_codes import CODES, unpack_codes
from mlx_dupq.specs import QuantSpec

D, H = 64, 32


def _block(kind: str, experts: int, bias: bool = False) -> SwitchGLU:
    """A SwitchGLU with random experts: float, mlx-quantized (2-bit g32) or dupq-format (ternary,
    group 128: wider than the kernel's; 3-bit g64)."""
    mx.random.seed(1)
    sw = SwitchGLU(D, H, experts, bias=bias)
    for p in (sw.up_proj, sw.gate_proj, sw.down_proj):
        p.weight = mx.random.normal(p.weight.shape) * 0.2
        if bias:
            p.bias = mx.random.normal(p.bias.shape) * 0.1
    if kind == "mlx":
        for name in ("up_proj", "gate_proj", "down_proj"):
            setattr(sw, name, getattr(sw, name).to_quantized(group_size=32, bits=2))
    elif kind == "fake":  # what block reconstruction trains (codes fixed: scales, offsets)
        for name in ("up_proj", "gate_proj", "down_proj"):
            p = getattr(sw, name)
            qt = rtn_quantize(p.weight, QuantSpec(bits=2, group_size=32))
            setattr(sw, name, FakeQuantSwitchLinear(qt, p.get("bias")))
    elif kind == "dupq":
        for name, spec in (("up_proj", QuantSpec(bits=1.58, group_size=128, symmetric=True)),
                           ("gate_proj", QuantSpec(bits=3, group_size=64)), ("down_proj", QuantSpec(bits=2, group_size=32))):
            p = getattr(sw, name)
            arrays, entry = quantize_tensor(p.weight, spec, dtype=mx.float32)
            m = build_module("switch_linear", tuple(p.weight.shape), entry, bias=bias)
            m.load_weights(list(arrays.items()) + ([("bias", p.bias)] if bias else []), strict=False)
            setattr(sw, name, m)
    mx.eval(sw.parameters())
    return sw


def _inputs(experts: int, k: int, tokens: int) -> tuple[mx.array, mx.array]:
    x = mx.random.normal((2, tokens, D), key=mx.random.key(2))
    rng = np.random.default_rng(3)
    idx = np.stack([rng.permutation(experts)[:k] for _ in range(2 * tokens)]).reshape(2, tokens, k)
    return x, mx.array(idx.astype(np.uint32))


def _spy(monkeypatch, sw) -> list:
    """Record every ``dense_weight`` call of ``sw``'s projections."""
    calls = []
    for cls in {type(p) for p in (sw.up_proj, sw.gate_proj, sw.down_proj)}:
        orig = cls.dense_weight
        monkeypatch.setattr(cls, "dense_weight", lambda self, dtype, orig=orig: calls.append(1) or orig(self, dtype))
    return calls


def _close(a, b) -> None:
    """Same loss and gradients to float32 rounding (relative to each gradient's largest entry)."""
    assert a[1].keys() == b[1].keys() and a[1]
    np.testing.assert_allclose(a[0].item(), b[0].item(), rtol=1e-5)
    for k in a[1]:
        want = np.array(b[1][k])
        np.testing.assert_allclose(np.array(a[1][k]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=k)


def _loss_and_grads(sw, x, idx, r):
    params = {k: v for k, v in tree_flatten(sw.trainable_parameters())}

    def f(p):
        sw.update(tree_unflatten(list(p.items())))
        return (sw(x, idx) * r).sum()

    loss, grads = mx.value_and_grad(f)(params)
    mx.eval(loss, grads)
    return loss, grads


@pytest.mark.parametrize("kind, bias", [("float", False), ("mlx", False), ("dupq", False), ("dupq", True),
                                        ("float", True), ("fake", False), ("fake", True)])
def test_dense_experts_equal_the_gather_path(kind, bias, monkeypatch):
    """Outputs and the gradients of what trains (float weights; scales and biases of a pack) agree
    with mlx-lm's gather path to float rounding, on many tokens."""
    sw = _block(kind, experts=6, bias=bias)
    assert use_dense_prefill(sw) >= 1 and type(sw) is DensePrefillSwitchGLU
    calls = _spy(monkeypatch, sw)
    if kind in ("float", "fake"):
        sw.unfreeze()
    else:
        mark_trainable(sw, ("scales", "biases"))
    x, idx = _inputs(6, 4, 24)
    r = mx.random.normal((2, 24, 4, D), key=mx.random.key(4))
    dense = _loss_and_grads(sw, x, idx, r)
    assert len(calls) == 3  # the dense path ran
    sw.__class__ = SwitchGLU
    gather = _loss_and_grads(sw, x, idx, r)
    _close(dense, gather)


def test_decode_and_many_experts_keep_the_gather_path(monkeypatch):
    """A decode step (few token-expert pairs) and a block whose tokens pick under 1 in 4 of the experts
    never build the dense weights: bit-identical to mlx-lm's path."""
    for experts, k, tokens in ((6, 4, 1), (16, 2, 24)):
        sw = _block("mlx", experts)
        use_dense_prefill(sw)
        calls = _spy(monkeypatch, sw)
        x, idx = _inputs(experts, k, tokens)
        y = sw(x, idx)
        sw.__class__ = SwitchGLU
        assert mx.array_equal(y, sw(x, idx))
        assert not calls


@pytest.mark.parametrize("kind", ["mlx", "dupq"])
def test_unpacked_codes_of_switch_layers_give_the_same_loss_and_gradients(kind, monkeypatch):
    """The e2e stage's codes-unpacked switch layers: the same loss and gradients, bit for bit, as the
    dense path's own ``mx.dequantize``; restore() puts the classes back and drops the codes."""
    sw = _block(kind, experts=6)
    use_dense_prefill(sw)
    mark_trainable(sw, ("scales", "biases"))
    x, idx = _inputs(6, 4, 24)
    r = mx.random.normal((2, 24, 4, D), key=mx.random.key(4))
    calls = _spy(monkeypatch, sw)
    plain = _loss_and_grads(sw, x, idx, r)
    assert len(calls) == 3
    classes = [type(p) for p in (sw.up_proj, sw.gate_proj, sw.down_proj)]
    restore = unpack_codes(sw)
    assert all(hasattr(p, CODES) for p in (sw.up_proj, sw.gate_proj, sw.down_proj))
    fast = _loss_and_grads(sw, x, idx, r)
    restore()
    assert [type(p) for p in (sw.up_proj, sw.gate_proj, sw.down_proj)] == classes
    assert not any(hasattr(p, CODES) for p in (sw.up_proj, sw.gate_proj, sw.down_proj))
    assert mx.array_equal(plain[0], fast[0])
    assert all(mx.array_equal(plain[1][k], fast[1][k]) for k in plain[1])


@pytest.mark.parametrize("rotated", [False, True])
def test_mixed_width_experts_take_the_dense_path(rotated, monkeypatch):
    """Per-expert widths (``MixedSwitchLinear``, optionally behind an expert rotation): the dense path
    runs on their effective weights and agrees with the grouped gather path; gradients of the groups'
    scales too."""
    from mlx_dupq.layers.moe_linear import MixedSwitchLinear, quantize_experts
    from mlx_dupq.moe.experts import expert_rotation

    sw = _block("float", experts=6)
    specs = [QuantSpec(bits=2, group_size=32)] * 3 + [QuantSpec(bits=4, group_size=32)] * 3
    for name in ("up_proj", "gate_proj", "down_proj"):
        w = getattr(sw, name).weight
        rot = expert_rotation("hadamard", w.shape[-1]) if rotated else None
        arrays, entry = quantize_experts(w, specs, dtype=mx.float32, rotation=rot)
        m = MixedSwitchLinear(w.shape[-1], w.shape[1], 6, entry)
        m.load_weights(list(arrays.items()))
        setattr(sw, name, m)
    use_dense_prefill(sw)
    mark_trainable(sw, ("scales", "biases"))
    calls = _spy(monkeypatch, sw)
    x, idx = _inputs(6, 4, 24)
    r = mx.random.normal((2, 24, 4, D), key=mx.random.key(4))
    dense = _loss_and_grads(sw, x, idx, r)
    assert len(calls) == 3
    sw.__class__ = SwitchGLU
    gather = _loss_and_grads(sw, x, idx, r)
    _close(dense, gather)
