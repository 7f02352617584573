"""A short fine-tune of a MoE cut from a dense model, on calibration text (``from_dense``'s last stage).

Cutting a dense MLP into experts and running only the router's top-k of them drops, per token, the
neurons of the experts it did not pick; the rest of the network never saw that. This stage trains
the MoE's MLP blocks (router, routed and shared experts; attention, norms and embeddings stay as
cut) for a few hundred steps so that the top-k model computes what the dense one did:

- ``loss="kl"`` (default): distillation, ``KL(dense || moe)`` of the next-token distributions at
  every position (``mlx_lm.tuner.losses.kl_div_loss``; the dense model's logits are computed batch by
  batch, nothing is stored);
- ``loss="ce"``: plain next-token cross-entropy on the text (``mlx_lm.tuner.trainer.default_loss``).

While training, every DeepSeek MoE block runs :func:`masked_moe_call`: all routed experts on every
token as one dense SwiGLU, each expert's neurons weighted by its gate score (0 where the top-k did
not pick it). That is the same function as mlx-lm's ``DeepseekMoE`` (tested) but differentiates
through plain matmuls; the backward of ``gather_mm`` on the CPU took ~270 s per 1024-token step on
SmolLM2-135M's MoE, this ~1/20 of that.

Adam with a linear warm-up over the first 10 % of the steps and cosine decay to 10 % of ``lr``
(``mlx.optimizers``); batches are rows of the calibration windows taken in an order drawn from
``numpy.random.default_rng(seed)``, so the same seed and text give the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.deepseek import DeepseekMoE
from mlx_lm.tuner.losses import kl_div_loss
from mlx_lm.tuner.trainer import default_loss

from ..errors import DupqError

#: progress(step, steps, loss)
StepProgress = Callable[[int, int, float], None]

LOSSES = ("kl", "ce")
PARTS = ("mlp", "moe")  # every MLP block (dense layers too) | only the MoE layers' blocks


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 0  # 0: no fine-tune
    lr: float = 1e-4
    batch: int = 4  # calibration windows per step
    loss: str = "kl"
    part: str = "mlp"
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0:
            raise DupqError(f"fine-tune steps must be >= 0 (got {self.steps})")
        if not self.lr > 0:
            raise DupqError(f"fine-tune learning rate must be > 0 (got {self.lr})")
        if self.batch < 1:
            raise DupqError(f"fine-tune batch must be >= 1 window (got {self.batch})")
        if self.loss not in LOSSES:
            raise DupqError(f"unknown fine-tune loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if self.part not in PARTS:
            raise DupqError(f"unknown fine-tune part {self.part!r}; use one of {', '.join(PARTS)}")


def masked_moe_call(self, x: mx.array) -> mx.array:
    """``DeepseekMoE.__call__`` (softmax gate, top-k, scores not renormalised, shared experts added)
    with every routed expert computed and the unpicked ones weighted 0."""
    sw = self.switch_mlp
    E, unit, hidden = sw.gate_proj.weight.shape
    k = self.gate.top_k
    probs = mx.softmax(x @ self.gate.weight.T, axis=-1, precise=True)  # (..., E)
    kth = mx.stop_gradient(mx.sort(probs, axis=-1)[..., E - k : E - k + 1])
    w = mx.where(probs >= kth, probs, 0.0)
    g = x @ sw.gate_proj.weight.reshape(E * unit, hidden).T
    u = x @ sw.up_proj.weight.reshape(E * unit, hidden).T
    h = (nn.silu(g) * u).reshape(*x.shape[:-1], E, unit) * w[..., None].astype(x.dtype)
    down = sw.down_proj.weight.transpose(0, 2, 1).reshape(E * unit, hidden)  # (E, hidden, unit) -> (E*unit, hidden)
    y = h.reshape(*x.shape[:-1], E * unit) @ down
    if "shared_experts" in self:
        y = y + self.shared_experts(x)
    return y


@contextmanager
def masked_moe(model: nn.Module):
    """Run every DeepSeek MoE block of ``model`` through :func:`masked_moe_call` inside the block."""
    blocks = [layer.mlp for layer in model.model.layers if type(layer.mlp) is DeepseekMoE]
    if not blocks:
        raise DupqError("the fine-tune needs a DeepSeek MoE model (mlx-lm's deepseek with MoE layers)")
    masked = type("MaskedDeepseekMoE", (DeepseekMoE,), {"__call__": masked_moe_call})
    for b in blocks:
        b.__class__ = masked
    try:
        yield
    finally:
        for b in blocks:
            b.__class__ = DeepseekMoE


def trainable(model: nn.Module, part: str) -> list[str]:
    """Names of the parameters the fine-tune trains (``part``: see :data:`PARTS`); freezes the rest."""
    model.freeze()
    for layer in model.model.layers:
        if part == "mlp" or "switch_mlp" in layer.mlp:
            layer.mlp.unfreeze()
    return [k for k, _ in tree_flatten(model.trainable_parameters())]


def loss_fn(model: nn.Module, teacher: nn.Module | None, batch: mx.array, loss: str) -> mx.array:
    """Mean per-token loss of ``model`` on ``batch`` (B, L): KL from ``teacher`` or cross-entropy."""
    if loss == "ce":
        lengths = mx.broadcast_to(mx.array([[0, batch.shape[1]]]), (batch.shape[0], 2))
        return default_loss(model, batch, lengths)[0]
    target = mx.stop_gradient(teacher(batch))
    return kl_div_loss(model(batch).astype(mx.float32), target.astype(mx.float32)).mean()


def schedule(cfg: FinetuneConfig):
    """Linear warm-up (10 % of the steps, at least 1) then cosine decay to ``lr / 10``."""
    warm = max(1, cfg.steps // 10)
    decay = max(1, cfg.steps - warm)
    return optim.join_schedules([optim.linear_schedule(cfg.lr / warm, cfg.lr, warm),
                                 optim.cosine_decay(cfg.lr, decay, cfg.lr / 10)], [warm])


def batch_order(n_windows: int, cfg: FinetuneConfig) -> np.ndarray:
    """(steps, batch) window indices: seeded permutations of the windows, concatenated."""
    rng = np.random.default_rng(cfg.seed)
    need = cfg.steps * cfg.batch
    reps = -(-need // n_windows) if need else 0
    order = np.concatenate([rng.permutation(n_windows) for _ in range(reps)]) if reps else np.zeros(0, np.int64)
    return order[:need].reshape(cfg.steps, cfg.batch)


def finetune(model: nn.Module, windows: mx.array, cfg: FinetuneConfig, teacher: nn.Module | None = None,
             progress: StepProgress | None = None) -> dict:
    """Train ``model``'s MLP blocks in place on ``windows`` (N, L) token ids -> summary dict
    (loss of the first and last steps, the mean over the first and last tenth, seconds, trained
    parameter names count). ``teacher`` is required for ``loss="kl"``."""
    cfg.check()
    if cfg.loss == "kl" and teacher is None:
        raise DupqError("the kl fine-tune needs the dense teacher model")
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise DupqError(f"fine-tune windows must be (N, L >= 2) token ids; got shape {tuple(windows.shape)}")
    t0 = time.perf_counter()
    names = trainable(model, cfg.part)
    if teacher is not None:
        teacher.freeze()
    opt = optim.Adam(learning_rate=schedule(cfg))
    step_fn = nn.value_and_grad(model, lambda m, b: loss_fn(m, teacher, b, cfg.loss))
    losses: list[float] = []
    with masked_moe(model):
        for s, rows in enumerate(batch_order(windows.shape[0], cfg)):
            loss, grads = step_fn(model, windows[mx.array(rows)])
            opt.update(model, grads)
            mx.eval(model.trainable_parameters(), opt.state, loss)
            losses.append(float(loss))
            if progress:
                progress(s + 1, cfg.steps, losses[-1])
    model.unfreeze()
    tenth = max(1, len(losses) // 10)
    return {"steps": cfg.steps, "loss": cfg.loss, "part": cfg.part, "parameters": len(names),
            "first": losses[:1], "last": losses[-1:],
            "mean_first_tenth": float(np.mean(losses[:tenth])) if losses else None,
            "mean_last_tenth": float(np.mean(losses[-tenth:])) if losses else None,
            "seconds": round(time.perf_counter() - t0, 1)}
