"""The layer-by-layer calibration pass."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_dupq.input_stats import advance, layer_input_hessians, run_layer
from tests.tiny import build_model


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_hessians_are_the_inputs_each_linear_sees(model_type):
    model, cfg = build_model(model_type)
    layer = model.model.layers[0]
    mx.random.seed(1)
    h = mx.random.normal((3, 10, cfg["hidden_size"]))
    stats = layer_input_hessians(layer, h, batch=2)
    assert set(stats) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # q/k/v and gate/up all see the normed input of their block
    x = layer.input_layernorm(h).reshape(-1, cfg["hidden_size"])
    H = (x.T @ x) / x.shape[0]
    assert mx.allclose(stats["self_attn.q_proj"].hessian, H, atol=1e-4).item()
    assert mx.allclose(stats["self_attn.k_proj"].hessian, H, atol=1e-4).item()
    assert mx.allclose(stats["self_attn.q_proj"].mean_abs, mx.abs(x).mean(axis=0), atol=1e-5).item()
    assert stats["mlp.down_proj"].hessian.shape == (cfg["intermediate_size"],) * 2
    assert stats["mlp.down_proj"].tokens == 30
    # linears fed the same array share one statistics object (accumulated once)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"] and stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    # the layer is restored: its linears are plain again and it computes the same function
    assert all(type(m).__name__ == "Linear" for p, m in layer.named_modules() if p.endswith("proj"))
    from mlx_lm.models.base import create_attention_mask

    ref = layer(h, mask=create_attention_mask(h, None))
    assert mx.allclose(advance(layer, h, batch=2), ref, atol=1e-5).item()
    assert mx.allclose(run_layer(layer, h, batch=3), ref, atol=1e-5).item()


def test_inputs_shared_on_one_batch_only_is_an_error():
    """Sharing is decided by identity on every batch; a forward pass that shares an input on one
    batch and not on the next cannot be captured once and is refused in one line."""
    import mlx.nn as nn

    from mlx_dupq.errors import DupqError

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.calls = 0

        def __call__(self, x, mask=None):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x * 1.0)

    with pytest.raises(DupqError, match="shared an input on one batch but not on another"):
        layer_input_hessians(Odd(), mx.random.normal((4, 3, 8)), batch=2)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_capture_pass_skips_only_unused_work(monkeypatch, model_type):
    """The capture pass never evaluates the layer's output (mlx skips what feeds no captured input,
    e.g. down_proj's matmul): the statistics equal, bit for bit, those of a pass that evaluates it."""
    from mlx_dupq import input_stats

    model, cfg = build_model(model_type)
    layer = model.model.layers[0]
    h = mx.random.normal((3, 10, cfg["hidden_size"]), key=mx.random.key(2))
    lazy = layer_input_hessians(layer, h, batch=2)
    monkeypatch.setattr(input_stats, "_capture_pass", lambda layer, h, batch: run_layer(layer, h, batch))
    full = layer_input_hessians(layer, h, batch=2)
    assert set(lazy) == set(full)
    for p in lazy:
        assert mx.array_equal(lazy[p].hessian, full[p].hessian).item(), p
        assert mx.array_equal(lazy[p].mean_abs, full[p].mean_abs).item(), p
