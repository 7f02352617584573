"""A DeepSeek-MoE-layout model cut out of a trained dense model (MoEfication / LLaMA-MoE style).

Each SwiGLU MLP ``down(silu(gate x) * up x)`` of a dense llama-family model is a sum over its
``I`` neurons, so any partition of the neurons splits it exactly into smaller MLPs. Per layer:

1. neuron activations ``a_j(t) = silu(g_j . x_t) * (u_j . x_t)`` on calibration text (the MoE
   built so far supplies ``x``: the layers are cut one after another, like GPTQ's sequential mode),
   and their contributions ``c_j(t) = |a_j(t)| * ||down[:, j]||``;
2. **shared expert**: the ``n_shared * unit`` neurons that are *active* (``c_j(t)`` in the top
   ``active_share`` of that token's neurons) on the most tokens (:func:`shared_neurons`);
3. **routed experts**: the other neurons in ``E`` clusters of ``unit`` neurons each, by
   co-activation: each neuron is the unit vector of its contributions over the calibration tokens,
   clustered by balanced spherical k-means (:func:`balanced_clusters`, seeded, deterministic);
4. **router** (mlx-lm's DeepSeek ``MoEGate``: ``softmax(W x)``, top-k, scores not renormalised):
   ``W`` is trained by softmax regression towards the uniform distribution over the ``k`` experts
   whose outputs ``||E_i(x_t)||`` are largest for that token (:func:`train_router`). The gate's
   scores weight the experts it picks, but the dense model weighs every neuron by 1, so the router
   weight is then divided by a temperature (from ``temperatures``; a higher one flattens the scores
   towards ``1/E`` without changing which experts are picked) and one scalar per layer is folded
   into the routed experts' ``down_proj``, both chosen so that the top-k output matches the sum of
   all routed experts in least squares (:func:`fit_scale`, :func:`fit_temperature`);
5. optionally (``finetune_steps > 0``) a short fine-tune of every MLP block of the whole MoE on
   calibration windows, by distillation from the dense model's logits (:mod:`.finetune`).

Attention, norms and embeddings are copied unchanged; the head stays tied to the embedding where
the dense model ties them (``tie_word_embeddings: true``, built by :class:`mlx_dupq.adapter.TiedDeepseek`:
mlx-lm's ``deepseek`` always has its own ``lm_head``, which stored SmolLM2's 49152 x 576 embedding a
second time and paid its bits twice in every pack; version 2 of the build did that). With every expert active and a
uniform router (``W = 0``, experts scaled by ``E``) the MoE computes the dense model's logits
(:func:`assemble`, tested). The result is written as a Hugging Face directory with ``model_type:
deepseek`` (loadable by :func:`mlx_dupq.load`; by ``mlx_lm.load`` only when untied); ``mlx-dupq models fetch
smollm2-135m-moe`` builds it from SmolLM2-135M (:data:`SMOLLM2_135M_MOE`).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..adapter import build_skeleton
from ..cache import sha256_file
from ..errors import DupqError
from ..specs import check_fields
from ..eval.data import calibration_batches, load_text
from ..io.loader import _tokenizer, load_model
from .finetune import FinetuneConfig, finetune
from .train import WEIGHTS_FILE, save

#: progress(done_layers, total_layers, message)
Progress = Callable[[int, int, str], None]

VERSION = 3  # 3: the head stays tied to the embedding where the dense model ties them


@dataclass(frozen=True)
class SplitConfig:
    """How a dense model is cut into a DeepSeek-MoE (see the module docstring)."""

    dense: str = "smollm2-135m"  # a named model, .gguf or HF directory (llama-family SwiGLU MLPs)
    unit: int = 96  # neurons per expert (moe_intermediate_size)
    n_shared: int = 4  # shared experts (shared neurons = n_shared * unit)
    top_k: int = 8  # routed experts per token (num_experts_per_tok)
    first_k_dense: int = 1  # the first layers stay dense (DeepSeek-MoE keeps layer 0 dense)
    active_share: float = 0.25  # a neuron is "active" on a token when in that token's top 25 % by contribution
    calib: str = "brown:calib"
    calib_samples: int = 16
    seq_len: int = 256
    kmeans_iters: int = 12
    router_steps: int = 150
    router_lr: float = 0.02
    temperatures: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)  # router logits divided by the best of these
    finetune_steps: int = 0  # 0: no fine-tune (see .finetune; ~140 s per 4x256-token step on 2 loaded cores)
    finetune_lr: float = 1e-4
    finetune_batch: int = 4  # windows of seq_len tokens per step
    finetune_samples: int = 64  # calibration windows drawn for the fine-tune (seed + 1)
    finetune_loss: str = "kl"  # kl: distillation from the dense logits; ce: next-token cross-entropy
    seed: int = 0
    save_dtype: str = "float16"
    version: int = VERSION

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tune stage's settings (checked)."""
        ft = FinetuneConfig(steps=self.finetune_steps, lr=self.finetune_lr, batch=self.finetune_batch,
                            loss=self.finetune_loss, seed=self.seed + 1)
        ft.check()
        if self.finetune_samples < 1:
            raise DupqError(f"finetune_samples must be >= 1 window (got {self.finetune_samples})")
        return ft

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # JSON-equal

    @classmethod
    def from_dict(cls, d: dict) -> SplitConfig:
        check_fields(cls, d, "split config field(s)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def n_routed(self, intermediate: int) -> int:
        """Routed experts of a dense MLP with ``intermediate`` neurons (checked)."""
        if self.unit < 1 or intermediate % self.unit:
            raise DupqError(f"expert size {self.unit} does not divide the MLP width {intermediate}; pick a divisor")
        e = intermediate // self.unit - self.n_shared
        if self.n_shared < 0 or e < 1:
            raise DupqError(f"{self.n_shared} shared experts of {self.unit} leave no routed expert in {intermediate} neurons")
        if not 1 <= self.top_k <= e:
            raise DupqError(f"top_k must be in 1..{e} (the routed experts); got {self.top_k}")
        return e


#: The recipe of the named model ``smollm2-135m-moe``: 1536 neurons -> 4 shared + 12 routed experts
#: of 96, top-10 (7/8 of the MLP active per token), layer 0 dense. Top-8 (3/4 active) costs 1.44x
#: the dense perplexity: per layer, even an oracle router (the 8 experts with the largest outputs)
#: loses ~0.3 of the MLP output's norm, whatever the clustering features or router budget
#: (bench/results/moe_smollm2_build.json, docs in MOE_REPORT_smollm2.md).
SMOLLM2_135M_MOE = SplitConfig(top_k=10)


@dataclass
class LayerSplit:
    """One MLP cut into experts: neuron indices, router weight, routed output scale."""

    shared: np.ndarray  # (n_shared * unit,) neuron indices
    experts: np.ndarray  # (E, unit) neuron indices
    gate: mx.array  # (E, hidden) router weight
    scale: float  # multiplies every routed expert's down_proj


# --------------------------------------------------------------------------- pure functions


def neuron_activations(mlp: nn.Module, x: mx.array) -> mx.array:
    """SwiGLU hidden activations ``silu(x Wg^T) * (x Wu^T)``: (T, hidden) -> (T, I)."""
    return nn.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)


def contributions(acts: mx.array, down: mx.array) -> mx.array:
    """``|a_j(t)| * ||down[:, j]||``: (T, I), (hidden, I) -> (T, I)."""
    return mx.abs(acts) * mx.linalg.norm(down, axis=0)


def shared_neurons(contrib: np.ndarray, n: int, active_share: float) -> np.ndarray:
    """The ``n`` neurons active on the most tokens: (T, I) -> (n,) sorted indices.

    Active: among the ``ceil(active_share * I)`` largest contributions of that token. Ties in
    frequency are broken by mean contribution, then by index."""
    T, I = contrib.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    m = max(1, int(np.ceil(active_share * I)))
    thr = np.partition(contrib, I - m, axis=1)[:, I - m : I - m + 1]
    freq = (contrib >= thr).mean(0)
    order = np.lexsort((np.arange(I), -contrib.mean(0), -freq))
    return np.sort(order[:n])


def balanced_clusters(features: np.ndarray, n_clusters: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Balanced spherical k-means: (n, d) rows -> (n_clusters, n // n_clusters) row indices.

    Rows are L2-normalised; centroids start at ``n_clusters`` rows drawn with
    ``default_rng(seed)``; each step assigns greedily by descending cosine similarity with every
    cluster capped at ``n / n_clusters`` rows, then re-centres. Deterministic (stable sorts)."""
    n = features.shape[0]
    if n_clusters < 1 or n % n_clusters:
        raise DupqError(f"{n} neurons cannot be split into {n_clusters} equal clusters")
    size = n // n_clusters
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    cent = f[np.sort(rng.choice(n, n_clusters, replace=False))]
    assign = np.full(n, -1)
    for _ in range(max(1, iters)):
        sim = f @ cent.T  # (n, C)
        order = np.argsort(-sim, axis=None, kind="stable")
        new = np.full(n, -1)
        count = np.zeros(n_clusters, dtype=np.int64)
        left = n
        for flat in order:
            i, c = divmod(int(flat), n_clusters)
            if new[i] < 0 and count[c] < size:
                new[i] = c
                count[c] += 1
                left -= 1
                if left == 0:
                    break
        if np.array_equal(new, assign):
            break
        assign = new
        for c in range(n_clusters):
            v = f[assign == c].sum(0)
            cent[c] = v / max(np.linalg.norm(v), 1e-12)
    return np.stack([np.flatnonzero(assign == c) for c in range(n_clusters)])


def expert_outputs_norm(acts: mx.array, down: mx.array, experts: np.ndarray) -> mx.array:
    """``||E_i(x_t)||`` for every routed expert: (T, I), (hidden, I), (E, unit) -> (T, E)."""
    cols = []
    for idx in experts:
        ix = mx.array(idx)
        cols.append(mx.linalg.norm(acts[:, ix] @ down[:, ix].T, axis=-1))
    return mx.stack(cols, axis=-1)


def router_targets(norms: mx.array, k: int) -> mx.array:
    """Uniform distribution over each token's ``k`` largest experts: (T, E) -> (T, E)."""
    top = mx.argsort(-norms, axis=-1)[:, :k]
    t = mx.zeros(norms.shape)
    t = mx.put_along_axis(t, top, mx.array(1.0 / k), axis=-1)
    return t


def router_loss(w: mx.array, x: mx.array, target: mx.array) -> mx.array:
    """Cross-entropy of ``softmax(x W^T)`` against ``target``: (E, h), (T, h), (T, E) -> scalar."""
    logits = x @ w.T
    return -(target * (logits - mx.logsumexp(logits, axis=-1, keepdims=True))).sum(-1).mean()


def train_router(x: mx.array, target: mx.array, steps: int, lr: float, w0: mx.array | None = None) -> tuple[mx.array, list[float]]:
    """Softmax regression of the router (Adam, full batch) -> ((E, hidden) weight, loss per step).

    ``x``: (T, hidden) the MLP inputs; ``target``: (T, E) from :func:`router_targets`."""
    w = mx.zeros((target.shape[1], x.shape[1])) if w0 is None else w0
    opt = optim.Adam(learning_rate=lr)
    state = {"w": w}
    opt.init(state)
    grad_fn = mx.value_and_grad(lambda p: router_loss(p["w"], x, target))
    losses = []
    for _ in range(steps):
        loss, g = grad_fn(state)
        state = opt.apply_gradients(g, state)
        mx.eval(state, loss)
        losses.append(float(loss))
    return state["w"], losses


def topk_routed(x: mx.array, w: mx.array, k: int, acts: mx.array, down: mx.array, experts: np.ndarray) -> tuple[mx.array, mx.array]:
    """(top-k routed output with the gate's softmax scores, sum of all routed experts): each (T, hidden)."""
    probs = mx.softmax(x @ w.T, axis=-1, precise=True)
    kth = mx.sort(probs, axis=-1)[:, -k : -k + 1]
    weight = mx.where(probs >= kth, probs, 0.0)
    routed = mx.zeros((x.shape[0], down.shape[0]))
    full = mx.zeros_like(routed)
    for i, idx in enumerate(experts):
        ix = mx.array(idx)
        y = acts[:, ix] @ down[:, ix].T
        routed = routed + weight[:, i : i + 1] * y
        full = full + y
    return routed, full


def fit_scale(routed: mx.array, full: mx.array) -> float:
    """Least-squares ``c`` with ``c * routed ~ full``: (T, h), (T, h) -> float."""
    den = float((routed * routed).sum())
    return float((routed * full).sum()) / den if den > 0 else 1.0


def fit_temperature(x: mx.array, w: mx.array, k: int, acts: mx.array, down: mx.array, experts: np.ndarray,
                    temperatures: tuple[float, ...]) -> tuple[float, float, float]:
    """The temperature (router weight divided by it) and output scale whose top-k routed output is
    closest to the sum of all routed experts -> (temperature, scale, relative error)."""
    best = None
    for t in temperatures:
        routed, full = topk_routed(x, w / t, k, acts, down, experts)
        c = fit_scale(routed, full)
        err = float(mx.linalg.norm(c * routed - full) / mx.maximum(mx.linalg.norm(full), 1e-12))
        if best is None or err < best[2]:
            best = (float(t), c, err)
    return best


def gated_activations(x: mx.array, split: LayerSplit, k: int, acts: mx.array) -> mx.array:
    """The MoE block's neuron activations as the block weighs them: (T, n_shared*unit + E*unit),
    shared neurons first (weight 1), then each routed expert's neurons times its top-k gate score
    (0 where not picked) -> ``Z`` with ``block(x) = Z @ down_cat`` (:func:`down_cat`)."""
    probs = mx.softmax(x @ split.gate.T, axis=-1, precise=True)
    E = probs.shape[-1]
    kth = mx.sort(probs, axis=-1)[:, E - k : E - k + 1]
    w = mx.where(probs >= kth, probs, 0.0)  # (T, E)
    routed = acts[:, mx.array(split.experts.reshape(-1))].reshape(x.shape[0], E, -1) * w[..., None]
    parts = [acts[:, mx.array(split.shared)]] if len(split.shared) else []
    return mx.concatenate(parts + [routed.reshape(x.shape[0], -1)], axis=1)


def down_cat(down: mx.array, split: LayerSplit) -> mx.array:
    """The block's output projections stacked like :func:`gated_activations`' columns: (n, hidden)."""
    cols = np.concatenate([split.shared, split.experts.reshape(-1)])
    d = down[:, mx.array(cols)].T
    n_sh = len(split.shared)
    return mx.concatenate([d[:n_sh], split.scale * d[n_sh:]], axis=0)


def refit_down(z: mx.array, target: mx.array, d0: mx.array, ridge: float) -> mx.array:
    """Ridge least squares of the output projections: ``argmin_D ||z D - target||^2 +
    lam ||D - d0||^2`` with ``lam = ridge * mean(diag(z^T z))`` -> (n, hidden)."""
    g = z.T @ z
    lam = ridge * float(mx.mean(mx.diagonal(g)))
    a = g + lam * mx.eye(g.shape[0])
    return mx.linalg.solve(a, z.T @ target + lam * d0, stream=mx.cpu)


# --------------------------------------------------------------------------- model assembly


def tied(dense_config: dict) -> bool:
    """Whether the dense model's head is its embedding (Hugging Face's default is tied)."""
    return bool(dense_config.get("tie_word_embeddings", True))


def moe_config(dense_config: dict, cfg: SplitConfig) -> dict:
    """mlx-lm ``deepseek`` config.json of the MoE cut from a llama-family ``dense_config``."""
    d = dense_config
    if d.get("model_type") not in ("llama", "mistral", "qwen2") or d.get("attention_bias") or d.get("mlp_bias"):
        raise DupqError(f"cannot cut a {d.get('model_type')} model into experts; use a llama-family model "
                        "(SwiGLU MLP, no attention bias), e.g. smollm2-135m")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    if d.get("head_dim") not in (None, hidden // heads):
        raise DupqError(f"head_dim {d.get('head_dim')} != hidden_size / heads: mlx-lm's deepseek cannot express it")
    if d.get("rope_scaling"):
        raise DupqError("rope_scaling is not supported by mlx-lm's deepseek attention; use a model without it")
    inter = int(d["intermediate_size"])
    out = {
        "model_type": "deepseek",
        "architectures": ["DeepseekForCausalLM"],
        "vocab_size": int(d["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": inter,
        "moe_intermediate_size": cfg.unit,
        "num_hidden_layers": int(d["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(d.get("num_key_value_heads") or heads),
        "n_shared_experts": cfg.n_shared if cfg.n_shared > 0 else None,
        "n_routed_experts": cfg.n_routed(inter),
        "num_experts_per_tok": cfg.top_k,
        "moe_layer_freq": 1,
        "first_k_dense_replace": cfg.first_k_dense,
        "max_position_embeddings": int(d.get("max_position_embeddings", 2048)),
        "rms_norm_eps": float(d.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(d.get("rope_theta", 10000.0)),
        "attention_bias": False,
        "tie_word_embeddings": tied(d),
    }
    for key in ("bos_token_id", "eos_token_id"):
        if d.get(key) is not None:
            out[key] = d[key]
    return out


def assemble(dense: nn.Module, config: dict, splits: dict[int, LayerSplit]) -> nn.Module:
    """An mlx-lm ``deepseek`` model with ``dense``'s attention, norms and embeddings and its MLPs cut
    by ``splits`` (layer -> :class:`LayerSplit`; the other layers are copied dense)."""
    moe = build_skeleton(config)
    w = {}
    emb = dense.model.embed_tokens.weight
    w["model.embed_tokens.weight"] = emb
    if "lm_head" in moe:
        w["lm_head.weight"] = dense.lm_head.weight if "lm_head" in dense else emb
    elif "lm_head" in dense:
        raise DupqError("the dense model has its own lm_head but the MoE config ties it to the embedding")
    w["model.norm.weight"] = dense.model.norm.weight
    for i, layer in enumerate(dense.model.layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[f"{p}.self_attn.{n}.weight"] = getattr(layer.self_attn, n).weight
        w[f"{p}.input_layernorm.weight"] = layer.input_layernorm.weight
        w[f"{p}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        g, u, dn = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        if i not in splits:
            if "switch_mlp" in moe.model.layers[i].mlp:
                raise DupqError(f"layer {i} is a MoE layer in the config but has no split")
            w[f"{p}.mlp.gate_proj.weight"], w[f"{p}.mlp.up_proj.weight"], w[f"{p}.mlp.down_proj.weight"] = g, u, dn
            continue
        w.update({f"{p}.mlp.{k}": v for k, v in _split_weights(layer.mlp, splits[i])})
    moe.load_weights(list(w.items()), strict=True)
    mx.eval(moe.parameters())
    return moe


def split_layer(mlp: nn.Module, x: mx.array, cfg: SplitConfig, n_routed: int, seed: int) -> tuple[LayerSplit, dict]:
    """Cut one dense MLP given its calibration inputs ``x`` (T, hidden) -> (split, statistics)."""
    acts = neuron_activations(mlp, x)
    down = mlp.down_proj.weight
    contrib = np.array(contributions(acts, down))
    shared = shared_neurons(contrib, cfg.n_shared * cfg.unit, cfg.active_share)
    rest = np.setdiff1d(np.arange(contrib.shape[1]), shared)
    clusters = rest[balanced_clusters(contrib[:, rest].T, n_routed, cfg.kmeans_iters, seed)]
    norms = expert_outputs_norm(acts, down, clusters)
    target = router_targets(norms, cfg.top_k)
    gate, losses = train_router(x, target, cfg.router_steps, cfg.router_lr)
    temp, scale, err = fit_temperature(x, gate, cfg.top_k, acts, down, clusters, cfg.temperatures)
    gate = gate / temp
    full = topk_routed(x, gate, cfg.top_k, acts, down, clusters)[1]
    hit = float((router_targets(x @ gate.T, cfg.top_k) * target).sum(-1).mean() * cfg.top_k)  # overlap / k
    shared_out = acts[:, mx.array(shared)] @ down[:, mx.array(shared)].T if len(shared) else mx.zeros_like(full)
    stats = {"router_loss": [losses[0], losses[-1]] if losses else [], "router_recall": hit, "scale": scale,
             "temperature": temp,
             "routed_rel_err": err,
             "routed_share": float(mx.linalg.norm(full) / mx.maximum(mx.linalg.norm(full + shared_out), 1e-12))}
    return LayerSplit(shared, clusters, gate, scale), stats


def split_model(dense: nn.Module, dense_config: dict, batches: mx.array, cfg: SplitConfig,
                progress: Progress | None = None) -> tuple[nn.Module, dict, dict]:
    """Cut every MLP of ``dense`` (layers ``>= first_k_dense``), one layer after another, on the
    calibration ``batches`` (B, L) -> (deepseek model, its config, per-layer statistics)."""
    config = moe_config(dense_config, cfg)
    E = config["n_routed_experts"]
    cur = build_skeleton(config)  # runs attention exactly as the MoE will
    splits: dict[int, LayerSplit] = {}
    stats: dict[int, dict] = {}
    layers = dense.model.layers
    h = dense.model.embed_tokens(batches)
    B, L, H = h.shape
    for i, layer in enumerate(layers):
        if i < cfg.first_k_dense:
            h = layer(h, mask="causal")
            mx.eval(h)
            continue
        a = h + layer.self_attn(layer.input_layernorm(h), mask="causal")
        x = layer.post_attention_layernorm(a).reshape(-1, H)
        mx.eval(a, x)
        splits[i], stats[i] = split_layer(layer.mlp, x, cfg, E, cfg.seed + i)
        blk = cur.model.layers[i].mlp
        blk.load_weights(_split_weights(layer.mlp, splits[i]), strict=True)
        h = a + blk(x).reshape(B, L, H)
        mx.eval(h)
        if progress:
            st = stats[i]
            progress(i + 1, len(layers), f"layer {i}: router recall {st['router_recall']:.2f}, "
                                         f"routed rel. err {st['routed_rel_err']:.2f}")
    return assemble(dense, config, splits), config, stats


def _split_weights(mlp: nn.Module, split: LayerSplit) -> list[tuple[str, mx.array]]:
    """The ``DeepseekMoE`` weights (names relative to the block) of ``mlp`` cut by ``split``."""
    g, u, dn = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    ex = mx.array(split.experts)
    w = [("gate.weight", split.gate), ("switch_mlp.gate_proj.weight", g[ex]), ("switch_mlp.up_proj.weight", u[ex]),
         ("switch_mlp.down_proj.weight", split.scale * dn.T[ex].transpose(0, 2, 1))]
    if len(split.shared):
        sh = mx.array(split.shared)
        w += [("shared_experts.gate_proj.weight", g[sh]), ("shared_experts.up_proj.weight", u[sh]),
              ("shared_experts.down_proj.weight", dn[:, sh])]
    return w


# --------------------------------------------------------------------------- build


def _eta(t0: float, done: int, total: int) -> str:
    if done <= 0:
        return ""
    left = (time.perf_counter() - t0) / done * (total - done)
    return f", ETA {int(left // 60)}m{int(left % 60):02d}s"


def build(out: str | Path, cfg: SplitConfig = SMOLLM2_135M_MOE, progress: Progress | None = None) -> dict:
    """Cut ``cfg.dense`` into a DeepSeek-MoE on ``cfg.calib`` (then fine-tune it if
    ``cfg.finetune_steps``), save it to ``out`` (HF directory, ``cfg.save_dtype``); return the result
    dict (config, per-layer statistics, fine-tune losses, seconds, CPU seconds, sha256, path).
    ``progress`` messages carry an ETA for the stage running."""
    ft = cfg.finetune_config()  # bad options fail before any work
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    dense, dense_config, tok_dir = load_model(cfg.dense)
    tok = _tokenizer(Path(tok_dir), dense_config)
    text = load_text(cfg.calib)
    batches = calibration_batches(tok, text, cfg.calib_samples, cfg.seq_len, cfg.seed)
    n_layers = len(dense.model.layers)
    if progress:
        progress(0, n_layers, f"{batches.size} calibration tokens from {cfg.calib}")
    t1 = time.perf_counter()
    layer_progress = (lambda d, t, m: progress(d, t, m + _eta(t1, d - cfg.first_k_dense, t - cfg.first_k_dense))) if progress else None
    moe, config, stats = split_model(dense, dense_config, batches, cfg, layer_progress)
    split_seconds = time.perf_counter() - t0
    tuned = None
    if ft.steps:
        windows = calibration_batches(tok, text, cfg.finetune_samples, cfg.seq_len, cfg.seed + 1)
        t2 = time.perf_counter()
        step_progress = (lambda s, n, loss: progress(s, n, f"fine-tune step {s}/{n}: loss {loss:.4f}{_eta(t2, s, n)}")) \
            if progress else None
        tuned = finetune(moe, windows, ft, teacher=dense, progress=step_progress)
    path = save(moe, config, Path(tok_dir), out, cfg.save_dtype)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "config": cfg.to_dict(),
        "model_config": config,
        "calib_tokens": int(batches.size),
        "layers": {str(i): s for i, s in stats.items()},
        "finetune": tuned,
        "split_seconds": round(split_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "loadavg": _loadavg(),
        "weights": WEIGHTS_FILE,
        "sha256": sha256_file(path / WEIGHTS_FILE),
        "path": str(path),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def named_recipe() -> dict:
    """What identifies the named model ``smollm2-135m-moe`` (its cache marker compares this)."""
    return {"split": SMOLLM2_135M_MOE.to_dict()}


def build_named(out: str | Path, progress: Progress | None = None) -> dict:
    """Build ``smollm2-135m-moe`` into ``out`` (used by :func:`mlx_dupq.io.models.fetch`)."""
    return build(out, SMOLLM2_135M_MOE, progress)
