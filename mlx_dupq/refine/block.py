"""Block-wise reconstruction: train one quantized decoder layer to reproduce the float layer.

EfficientQAT's Block-AP / OmniQuant's block-wise training, on the converter's streaming pass. For
decoder layer ``k`` the pipeline has (:mod:`mlx_dupq.calib_state`): the float layer, its quantized
initialisation (GPTQ or RTN, as packed arrays), and the calibration hidden states ``x`` (n, L, d)
-- the outputs of the already-quantized layers ``0..k-1``. The targets ``y`` are

- ``target = "float"`` (default): the float model's own hidden states after layer ``k`` (a float
  stream ``x_f`` kept beside ``x``: ``y = layer_float(x_f)``), so layer ``k`` also learns to undo
  what the earlier quantized layers got wrong;
- ``target = "quantized"``: ``y = layer_float(x)``, the layer's own error only.

Measured on SmolLM2-135M (``bench/learned.py``, see docs/quality.md) the float targets gave the
lower end-to-end perplexity, hence the default.

Each quantized linear becomes a :class:`~mlx_dupq.refine.fakequant.FakeQuantLinear`; its scales,
biases and (optionally) latent weights, and the layer's norms, train with Adam on the mean squared
error ``|layer_q(x) - y|^2`` over minibatches of calibration sequences. The last ``holdout``
sequences are not trained on (the training set is the first ``samples`` other sequences, cut
to their first ``seq_len`` tokens, so the training cost can be set apart from GPTQ's calibration): the trained layer is kept only if its error there, with the values
exactly as stored (storage dtype, re-rounded codes), is below the initialisation's; otherwise the
initialisation is returned unchanged. Switch (MoE expert) layers train like the other linears
(:class:`~mlx_dupq.refine.fakequant.FakeQuantSwitchLinear`: every expert's scales, biases, latent
weights; on the CPU the block runs all experts densely, :class:`~mlx_dupq.layers.cpu.DensePrefillSwitchGLU`);
with ``experts = false``, and always for per-expert-width layers (``moe_mixed``), they are held at
their quantized values (``fixed``, the weights the converter dequantized) and the rest of the layer
learns around them. The router stays float and frozen.
Memory: the layer, ``x``, ``x_f``, ``y`` and Adam's two
moments of the trainable parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..errors import DupqError
from ..input_stats import run_layer
from ..layers.cpu import dense_prefill
from ..quant.bitpack import FORMATS, pack, unpack
from ..quant.qtensor import dequantize
from .fakequant import FakeQuantLinear, FakeQuantSwitchLinear
from .spec import BlockSpec

Say = Callable[[str], None]


@dataclass
class LayerReport:
    """Relative output error ``|o - y|^2 / |y|^2`` of one layer on the held-out sequences."""

    init_error: float
    trained_error: float
    kept: str  # "trained" | "init"
    error: float  # the kept one's: min(init_error, trained_error)
    steps: int
    seconds: float
    train_loss: float  # last training minibatch's relative loss

    def to_dict(self) -> dict:
        return {"init_error": self.init_error, "trained_error": self.trained_error, "kept": self.kept, "error": self.error,
                "steps": self.steps, "seconds": round(self.seconds, 2), "train_loss": self.train_loss}


def trains(entry: dict, spec: BlockSpec) -> bool:
    """Whether block reconstruction trains this packed module (else a switch layer is held fixed)."""
    return entry.get("format") in FORMATS and (entry.get("kind") != "switch_linear" or spec.experts)


def check_block_supported(entries: dict[str, dict]) -> None:
    """Refuse, in one line, layers block reconstruction cannot train (duplicated linears). Switch
    (MoE expert) layers it cannot train are held fixed at their quantized values."""
    for path, e in entries.items():
        if e.get("kind") == "switch_linear":
            continue
        if e.get("format") not in FORMATS:
            raise DupqError(f"refine.block cannot train {path} stored as {e.get('format')!r} "
                            "(duplicated copies); drop [refine.block] or the duplication plan")


def _module(layer: nn.Module, rel: str) -> nn.Module:
    node = layer
    for part in rel.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set_module(layer: nn.Module, rel: str, module: nn.Module) -> None:
    parent_path, _, name = rel.rpartition(".")
    parent = _module(layer, parent_path) if parent_path else layer
    setattr(parent, name, module)


def _norm_paths(layer: nn.Module) -> list[str]:
    return [p for p, m in layer.named_modules() if isinstance(m, nn.RMSNorm) and "weight" in m]


class GainRMSNorm(nn.Module):
    """An RMSNorm whose weight trains as ``w0 * exp(gain)`` (``gain`` starts at 0): relative, like the
    scales, so one learning rate fits norms of any magnitude."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self._w0 = norm.weight
        self.eps = norm.eps
        self.gain = mx.zeros_like(norm.weight)

    def weight(self) -> mx.array:
        return self._w0 * mx.exp(self.gain)

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight(), self.eps)


def _rel_error(out: mx.array, y: mx.array) -> mx.array:
    return mx.mean(mx.square(out - y)) / mx.maximum(mx.mean(mx.square(y)), 1e-30)


def _error(layer: nn.Module, x: mx.array, y: mx.array) -> float:
    return float(_rel_error(run_layer(layer, x), y))


def refine_layer(layer: nn.Module, prefix: str, arrays: dict[str, mx.array], entries: dict[str, dict],
                 x: mx.array, y: mx.array, spec: BlockSpec, storage: mx.Dtype, wrapped: set[str] = frozenset(),
                 say: Say | None = None, fixed: dict[str, mx.array] | None = None
                 ) -> tuple[dict[str, mx.array], dict[str, mx.array], LayerReport]:
    """Train decoder layer ``prefix`` (loaded with its float weights) from its packed initialisation.

    arrays, entries: what the pipeline packed for this layer (full key names; quantized linears as
    ``<path>.weight/scales/biases`` with ``entries[path]``); x, y: (n, L, d) inputs and targets;
    ``wrapped``: layer-relative paths behind an online rotation (their linear is ``<rel>.linear``);
    ``fixed``: {``<path>.weight``: float32 dequantized weight} of the layer's switch (expert) layers,
    required for each one it does not train (:func:`trains`), held at those values while the rest
    trains and returned unchanged.
    Returns (arrays to store, dequantized float weights and norms to run the layer with, report);
    the layer is left with its original linear modules and weights.
    """
    check_block_supported(entries)
    with dense_prefill(layer):  # on the CPU: the MoE block runs every expert as one matmul
        return _refine_layer(layer, prefix, arrays, entries, x, y, spec, storage, wrapped, say, dict(fixed or {}))


def _refine_layer(layer: nn.Module, prefix: str, arrays: dict[str, mx.array], entries: dict[str, dict], x: mx.array,
                  y: mx.array, spec: BlockSpec, storage: mx.Dtype, wrapped: set[str], say: Say | None,
                  fixed: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, mx.array], LayerReport]:
    held = {}  # switch weight key -> (module slot, its float weight, to put back)
    for path, e in entries.items():
        if e.get("kind") == "switch_linear" and path.startswith(prefix + ".") and not trains(e, spec):
            key = f"{path}.weight"
            if key not in fixed:
                raise DupqError(f"refine.block needs the quantized weights of the switch layer {path} to hold it fixed")
            rel = path[len(prefix) + 1 :]
            slot = _module(layer, f"{rel}.linear" if rel in wrapped else rel)
            held[key] = (slot, slot.weight)
            slot.weight = fixed[key].astype(mx.float32)
    t0 = time.time()
    say = say or (lambda m: None)
    n = x.shape[0]
    hold = min(spec.holdout, n - 1) if n > 1 else 0
    n_tr = min(spec.samples or n, n - hold)
    x_tr, y_tr = x[:n_tr, : spec.seq_len], y[:n_tr, : spec.seq_len]  # a causal prefix is still exact
    x_ho, y_ho = (x[n - hold :], y[n - hold :]) if hold else (x, y)

    lin = {}  # layer-relative module path -> (full path, the module slot's relative path)
    for path, e in entries.items():
        if e.get("kind") in ("linear", "switch_linear") and path.startswith(prefix + ".") and trains(e, spec):
            rel = path[len(prefix) + 1 :]
            lin[rel] = (path, f"{rel}.linear" if rel in wrapped else rel)
    init = {rel: unpack({k: arrays[f"{path}.{k}"] for k in ("weight", "scales", "biases") if f"{path}.{k}" in arrays},
                        entries[path]) for rel, (path, _) in lin.items()}
    originals = {slot: _module(layer, slot) for _, slot in lin.values()}
    norms = [p for p in _norm_paths(layer) if f"{prefix}.{p}.weight" in arrays] if "norms" in spec.trainable else []
    norm_modules = {p: _module(layer, p) for p in norms}
    norms0 = {p: m.weight for p, m in norm_modules.items()}

    def load_dequantized(qts: dict, norm_w: dict) -> dict[str, mx.array]:
        weights = {f"{lin[rel][0]}.weight": dequantize(qt) for rel, qt in qts.items()}
        weights.update({f"{prefix}.{p}.weight": w for p, w in norm_w.items()})
        for rel, (_, slot) in lin.items():
            originals[slot].weight = weights[f"{lin[rel][0]}.weight"]
        for p, w in norm_w.items():
            _module(layer, p).weight = w
        return weights

    load_dequantized(init, norms0)
    init_err = _error(layer, x_ho, y_ho)

    # --- train
    fq = {rel: (FakeQuantSwitchLinear if qt.codes.ndim == 3 else FakeQuantLinear)(
        qt, originals[slot].get("bias"), weights="weights" in spec.trainable) for rel, qt in init.items()
        for slot in [lin[rel][1]]}
    for rel, m in fq.items():
        _set_module(layer, lin[rel][1], m)
    gains = {p: GainRMSNorm(_module(layer, p)) for p in norms}
    for p, m in gains.items():
        _set_module(layer, p, m)
    layer.freeze()
    keys = [k for k, t in (("scales", "scales"), ("biases", "biases"), ("latent", "weights")) if t in spec.trainable]
    for m in fq.values():
        m.unfreeze(keys=[k for k in keys if k in m], recurse=False)
    for m in gains.values():
        m.unfreeze(keys=["gain"], recurse=False)
    n_trainable = sum(v.size for _, v in tree_flatten(layer.trainable_parameters()))

    windows = x_tr.shape[0]
    per_epoch = max(1, -(-windows // spec.batch))
    total = spec.steps if spec.steps is not None else spec.epochs * per_epoch
    check = spec.check_every or per_epoch  # steps between min_gain's held-out checks
    loss_val = float("nan")
    ran, last_err = total, init_err
    if total > 0 and n_trainable > 0:
        opt = optim.MultiOptimizer([optim.Adam(learning_rate=spec.lr_weights), optim.Adam(learning_rate=spec.lr)],
                                   [lambda path, _: path.endswith("latent")])

        def loss_fn(model, xb, yb):
            return _rel_error(model(xb, mask="causal"), yb)

        step_fn = nn.value_and_grad(layer, loss_fn)
        rng = np.random.default_rng(spec.seed)
        order: list[int] = []
        t_train = time.time()
        for step in range(total):
            if len(order) < spec.batch:
                order += rng.permutation(windows).tolist()
            idx, order = order[: spec.batch], order[spec.batch :]
            ids = mx.array(idx)
            loss, grads = step_fn(layer, x_tr[ids], y_tr[ids])
            opt.update(layer, grads)
            mx.eval(layer.trainable_parameters(), opt.state, loss)
            loss_val = float(loss)
            if step % 4 == 3 or step == total - 1:
                eta = (time.time() - t_train) / (step + 1) * (total - step - 1)
                say(f"refine {prefix}: step {step + 1}/{total}, loss {loss_val:.4g}, ETA {eta:.0f}s")
            if spec.min_gain > 0 and hold and (step + 1) % check == 0 and step + 1 < total:
                err = _error(layer, x_ho, y_ho)  # the fake-quantized layer as it trains
                if not err < last_err * (1 - spec.min_gain):
                    say(f"refine {prefix}: held-out error {last_err:.4g} -> {err:.4g} in steps "
                        f"{step + 2 - check}-{step + 1}, below min_gain {spec.min_gain:g}: stopped")
                    ran = step + 1
                    break
                last_err = err
    layer.unfreeze()

    trained = {rel: m.to_qtensor(storage) for rel, m in fq.items()}
    trained_norms = {p: m.weight().astype(storage).astype(mx.float32) for p, m in gains.items()}
    for rel, (_, slot) in lin.items():
        _set_module(layer, slot, originals[slot])
    for p, m in gains.items():
        _set_module(layer, p, norm_modules[p])
        norm_modules[p].weight = norms0[p]
    load_dequantized(trained, trained_norms)
    trained_err = _error(layer, x_ho, y_ho) if total > 0 and n_trainable > 0 else init_err
    keep_trained = trained_err < init_err
    if not keep_trained:
        trained, trained_norms = init, norms0
    dequantized = load_dequantized(trained, trained_norms)
    for key, (slot, w_float) in held.items():
        slot.weight = w_float
        dequantized[key] = fixed[key]

    out = dict(arrays)
    if keep_trained:
        for rel, qt in trained.items():
            packed, _ = pack(qt)
            for k, a in packed.items():
                out[f"{lin[rel][0]}.{k}"] = a
        for p, w in trained_norms.items():
            out[f"{prefix}.{p}.weight"] = w.astype(storage)
    report = LayerReport(init_err, trained_err, "trained" if keep_trained else "init", min(init_err, trained_err), ran,
                         time.time() - t0, loss_val)
    return out, dequantized, report


def block_targets(layer: nn.Module, x: mx.array, x_float: mx.array | None, spec: BlockSpec) -> tuple[mx.array, mx.array | None]:
    """Targets of the float ``layer`` (loaded with float weights): (y, next float stream or None).

    ``target = "float"``: y = layer(x_float) (x_float None: the stream has not diverged yet, use x),
    and y is also the float stream's next value. ``"quantized"``: y = layer(x), no float stream.
    """
    if spec.target == "float":
        y = run_layer(layer, x if x_float is None else x_float)
        return y, y
    return run_layer(layer, x), None
