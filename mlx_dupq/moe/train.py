"""Train a tiny model of mlx-lm's ``deepseek`` architecture (DeepSeek-MoE) on the Brown corpus.

No trained MoE checkpoint can be fetched on our machines, and random weights route at random,
so the MoE work is measured on a small model trained here: shared experts + fine-grained
routed experts behind mlx-lm's top-k softmax gate, the first layer dense, the tokenizer of the
default model (SmolLM2, 49,152 tokens). It is a toy with *learned* routing, not a capable model.

Training: random windows of ``brown:calib`` (``numpy.random.default_rng(seed)``), AdamW with
linear warmup and cosine decay, gradient clipping, and the Switch-Transformer load-balancing
loss ``alpha * E * sum_i f_i * P_i`` per MoE layer (:func:`balance_loss`). mlx-lm's gate
returns only the top-k scores, so during training each gate is wrapped by :class:`RecordingGate`
(same parameter, same output) that hands its full softmax to the loss; mlx-lm is not modified.

Output layer: on two shared CPU cores the 49,152 x 256 ``lm_head`` would cost more than the rest
of the model, so during training only the ``head_tokens`` most frequent training tokens get their
own output row and all other tokens share one row (:class:`ClassHead`). The loss is still the
exact full-vocabulary likelihood of a plain ``deepseek`` model whose rows for those tokens are
tied; the saved ``lm_head`` is that full (vocab, hidden) matrix.

The result is saved as a Hugging Face style directory (``config.json`` with
``model_type: deepseek``, ``model.safetensors`` in float16 under mlx-lm's names, the
tokenizer files) that ``mlx_lm.load``, :func:`mlx_dupq.load` and ``mlx-dupq convert`` open.
``python scripts/train_tiny_moe.py`` and ``mlx-dupq models fetch tiny-deepseek-moe`` build it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..errors import DupqError
from ..cache import sha256_file
from ..eval.data import load_text, tokenize
from ..eval.ppl import token_nll_sum, windows_of
from ..io.loader import tokenizer_of
from ..io.source import open_source, TOKENIZER_FILES
from ..specs import check_fields

#: progress(done_steps, total_steps, message)
Progress = Callable[[int, int, str], None]

VERSION = 1
TOKENIZER_MODEL = "smollm2-135m"  # the default model: its tokenizer is the tiny model's tokenizer
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Architecture and training recipe of a tiny DeepSeek-MoE model."""

    # architecture (mlx_lm.models.deepseek.ModelArgs)
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 768  # the dense layer(s)
    moe_intermediate_size: int = 128  # one routed expert; a shared expert is n_shared times this
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 2048
    # training
    steps: int = 1000
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_alpha: float = 0.01
    init_std: float = 0.02
    head_tokens: int = 8192  # own lm_head rows for the most frequent training tokens; the rest share one
    train_data: str = "brown:calib"
    save_dtype: str = "float16"
    version: int = VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        check_fields(cls, d, "training config field(s)")
        return cls(**d)

    def model_config(self, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
        """The Hugging Face style ``config.json`` of the model (``model_type: deepseek``)."""
        cfg = {
            "model_type": "deepseek",
            "architectures": ["DeepseekForCausalLM"],
            "vocab_size": int(vocab_size),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_layer_freq": 1,
            "first_k_dense_replace": self.first_k_dense_replace,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "tie_word_embeddings": False,  # mlx-lm's deepseek has its own lm_head
            "torch_dtype": self.save_dtype,
        }
        if bos_token_id is not None:
            cfg["bos_token_id"] = int(bos_token_id)
        if eos_token_id is not None:
            cfg["eos_token_id"] = int(eos_token_id)
        return cfg

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise DupqError(
                f"training needs steps >= 1, batch_size >= 1, seq_len >= 2 "
                f"(got {self.steps}, {self.batch_size}, {self.seq_len})"
            )
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise DupqError(
                f"num_experts_per_tok must be in 1..n_routed_experts ({self.n_routed_experts}); "
                f"got {self.num_experts_per_tok}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise DupqError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.save_dtype not in ("float16", "bfloat16", "float32"):
            raise DupqError(f"save_dtype {self.save_dtype!r} is not supported; use float16, bfloat16 or float32")


#: The recipe of the named model ``tiny-deepseek-moe`` (see docs/moe.md).
TINY_DEEPSEEK_MOE = TrainConfig()


# --------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """A freshly initialized mlx-lm ``deepseek`` model: every matrix N(0, init_std), the output
    projections of attention and MLPs scaled by ``1/sqrt(2 * layers)``, norms 1. Seeded by ``cfg.seed``."""
    from mlx_lm.models import deepseek

    mx.random.seed(cfg.seed)
    model = deepseek.Model(deepseek.ModelArgs.from_dict(cfg.model_config(vocab_size)))
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(cfg.seed), len(flat))
    out_scale = 1.0 / math.sqrt(2 * cfg.num_hidden_layers)
    params = []
    for i, (name, v) in enumerate(flat):
        if "norm" in name:
            params.append((name, mx.ones_like(v)))
            continue
        std = cfg.init_std * (out_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
        params.append((name, std * mx.random.normal(v.shape, key=keys[i])))
    model.load_weights(params)
    mx.eval(model.parameters())
    return model


def moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, DeepseekMoE block) of every routed layer."""
    return [(i, layer.mlp) for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "switch_mlp")]


class _Records:
    """Per-call store of (probs, inds) per gate; not an array container, so not a parameter."""

    def __init__(self):
        self.items: list[tuple[mx.array, mx.array]] = []


class RecordingGate(nn.Module):
    """mlx-lm's ``MoEGate`` (same ``weight``, same outputs) that also records its full softmax.

    ``__call__(x (..., hidden)) -> (inds (..., k), scores (..., k))`` and appends
    ``(probs (N, E), inds (N, k))`` to the shared record list."""

    def __init__(self, gate: nn.Module, records: _Records):
        super().__init__()
        self.weight = gate.weight
        self.top_k = gate.top_k
        self.n_routed_experts = gate.n_routed_experts
        self._records = records

    def __call__(self, x: mx.array):
        scores = mx.softmax(x @ self.weight.T, axis=-1, precise=True)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
        self._records.items.append((scores.reshape(-1, scores.shape[-1]), inds.reshape(-1, k)))
        return inds, mx.take_along_axis(scores, inds, axis=-1)


def attach_recorders(model: nn.Module) -> _Records:
    """Wrap every MoE gate of ``model`` in a :class:`RecordingGate`; parameter names stay the same."""
    records = _Records()
    for _, moe in moe_layers(model):
        if not isinstance(moe.gate, RecordingGate):
            moe.gate = RecordingGate(moe.gate, records)
        else:
            moe.gate._records = records
    return records


def detach_recorders(model: nn.Module) -> None:
    """Put mlx-lm's own ``MoEGate`` back (sharing the trained weight)."""
    from mlx_lm.models.deepseek import MoEGate

    for _, moe in moe_layers(model):
        if isinstance(moe.gate, RecordingGate):
            gate = MoEGate(moe.config)
            gate.weight = moe.gate.weight
            moe.gate = gate


def balance_loss(probs: mx.array, inds: mx.array) -> mx.array:
    """Switch-Transformer load-balancing loss without alpha: ``E * sum_i f_i * P_i``.

    ``probs`` (N, E): router softmax per token; ``inds`` (N, k): chosen experts.
    ``f_i`` = share of the N*k assignments that went to expert i (no gradient), ``P_i`` = mean
    router probability of expert i. Equals 1 for perfectly uniform routing, E for collapse."""
    n, e = probs.shape
    counts = mx.zeros((e,), dtype=mx.float32).at[inds.reshape(-1)].add(1.0)
    f = mx.stop_gradient(counts / inds.size)
    p = probs.astype(mx.float32).mean(axis=0)
    return e * mx.sum(f * p)


# --------------------------------------------------------------------------- data


def load_tokenizer(model: str = TOKENIZER_MODEL):
    """(mlx-lm TokenizerWrapper, tokenizer directory, vocab size) of a model (default: the default model)."""
    src = open_source(model)
    tok_dir = src.tokenizer_dir()
    return tokenizer_of(tok_dir, src.config), Path(tok_dir), int(src.config["vocab_size"])


def token_ids(tokenizer, data: str) -> np.ndarray:
    """A named text set or file -> (T,) int32 ids (see :mod:`mlx_dupq.eval.data`)."""
    return tokenize(tokenizer, load_text(data))


def batches(ids: np.ndarray, steps: int, batch_size: int, seq_len: int, seed: int):
    """``steps`` batches of random windows: (batch_size, seq_len + 1) int32 each.

    Window starts come from ``numpy.random.default_rng(seed)``: the same seed, the same batches."""
    if len(ids) < seq_len + 2:
        raise DupqError(f"training text has {len(ids)} tokens, fewer than one window of {seq_len + 1}; use more text")
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
        yield np.stack([ids[s : s + seq_len + 1] for s in starts])


def lr_schedule(cfg: TrainConfig):
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine to ``min_lr`` at ``steps``."""
    warm = max(1, min(cfg.warmup, cfg.steps - 1)) if cfg.steps > 1 else 1
    decay = max(1, cfg.steps - warm)
    return optim.join_schedules(
        [optim.linear_schedule(cfg.lr / warm, cfg.lr, warm), optim.cosine_decay(cfg.lr, decay, cfg.min_lr)], [warm]
    )


# --------------------------------------------------------------------------- output classes


def head_vocab(ids: np.ndarray, vocab_size: int, k: int) -> np.ndarray:
    """The ``k`` most frequent token ids of ``ids`` (ties by id), sorted by id: they get their own
    output row; every other token shares one row (see :class:`ClassHead`)."""
    counts = np.bincount(ids, minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[: min(k, vocab_size)]).astype(np.int32)


class ClassHead(nn.Module):
    """Training-time ``lm_head`` whose rows for tokens outside ``tokens`` are one shared row.

    ``__call__(h (..., hidden)) -> (..., K + 1)``: logits of the K own tokens, then the shared
    row's logit plus ``log(n_shared)``, so that ``logsumexp`` over the K + 1 classes is exactly
    the full-vocabulary ``logsumexp`` of the expanded head (:meth:`expand`). The loss of a target
    in the shared set is its class's cross-entropy plus ``log(n_shared)``: the exact full-
    vocabulary NLL of a deepseek model whose shared rows are tied. Costs K/V of the full head."""

    def __init__(self, weight: mx.array, tokens: np.ndarray):
        super().__init__()
        vocab = weight.shape[0]
        own = np.zeros(vocab, dtype=bool)
        own[tokens] = True
        self.n_shared = int(vocab - own.sum())
        shared_row = weight[mx.array(np.flatnonzero(~own)[:1])] if self.n_shared else mx.zeros((1, weight.shape[1]))
        self.weight = mx.concatenate([weight[mx.array(tokens)], shared_row], axis=0)
        cls = np.full(vocab, len(tokens), dtype=np.int32)
        cls[tokens] = np.arange(len(tokens), dtype=np.int32)
        self._cls = cls  # numpy: not a parameter
        self._log_shared = math.log(self.n_shared) if self.n_shared else -1e9

    def __call__(self, h: mx.array) -> mx.array:
        logits = h @ self.weight.T
        return mx.concatenate([logits[..., :-1], logits[..., -1:] + self._log_shared], axis=-1)

    def expand(self) -> mx.array:
        """The full (vocab, hidden) ``lm_head`` weight: own rows in place, the shared row elsewhere."""
        return self.weight[mx.array(self._cls)]


# --------------------------------------------------------------------------- training


def train(
    cfg: TrainConfig, ids: np.ndarray, vocab_size: int, progress: Progress | None = None, log_every: int = 25
) -> tuple[nn.Module, list[dict]]:
    """Train a fresh model on ``ids`` -> (model in float32 with the full ``lm_head``, loss history).

    History rows (every ``log_every`` steps and the last): step, loss (full-vocabulary cross-
    entropy, mean over the steps since the previous row), balance (mean load-balancing term per
    MoE layer), lr, seconds."""
    cfg.check()
    model = build_model(cfg, vocab_size)
    head = ClassHead(model.lm_head.weight, head_vocab(ids, vocab_size, cfg.head_tokens))
    model.lm_head = head
    records = attach_recorders(model)
    n_moe = len(moe_layers(model))
    schedule = lr_schedule(cfg)
    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=cfg.weight_decay)

    def loss_fn(model, x, cls, extra):
        records.items.clear()
        logits = model(x)
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), cls, reduction="mean") + extra
        bal = sum((balance_loss(p, i) for p, i in records.items), mx.array(0.0)) / max(n_moe, 1)
        records.items.clear()
        return ce + cfg.balance_alpha * n_moe * bal, (ce, bal)

    grad_fn = nn.value_and_grad(model, loss_fn)

    def step_fn(x, cls, extra):
        (_, (ce, bal)), grads = grad_fn(model, x, cls, extra)
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        opt.update(model, grads)
        return ce, bal

    history: list[dict] = []
    acc_ce = acc_bal = 0.0
    acc_n = 0
    t0 = time.perf_counter()
    model.train()
    shared = head.weight.shape[0] - 1
    for step, batch in enumerate(batches(ids, cfg.steps, cfg.batch_size, cfg.seq_len, cfg.seed), start=1):
        cls = head._cls[batch[:, 1:]]
        extra = mx.array(head._log_shared * float((cls == shared).mean()) if head.n_shared else 0.0)
        ce, bal = step_fn(mx.array(batch[:, :-1]), mx.array(cls), extra)
        mx.eval(model.parameters(), opt.state, ce, bal)
        acc_ce += ce.item()
        acc_bal += bal.item()
        acc_n += 1
        if step % log_every == 0 or step == cfg.steps:
            row = {"step": step, "loss": round(acc_ce / acc_n, 4), "balance": round(acc_bal / acc_n, 4),
                   "lr": float(f"{float(schedule(step - 1)):.3g}"), "seconds": round(time.perf_counter() - t0, 1)}
            history.append(row)
            acc_ce = acc_bal = 0.0
            acc_n = 0
            if progress:
                progress(step, cfg.steps, f"step {step}: loss {row['loss']:.3f}")
    detach_recorders(model)
    lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
    lm_head.weight = head.expand()
    model.lm_head = lm_head
    mx.eval(model.parameters())
    model.eval()
    return model, history


def round_to(model: nn.Module, dtype: str) -> None:
    """Round every float parameter to ``dtype`` and back to float32, in place (the saved weights)."""
    dt = getattr(mx, dtype)
    model.update(tree_map(lambda v: v.astype(dt).astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())


# --------------------------------------------------------------------------- evaluation


def eval_windows(ids: np.ndarray, ctx: int, windows: int | None = None) -> np.ndarray:
    """(T,) ids -> (W, ctx): the non-overlapping windows of :func:`mlx_dupq.eval.ppl.windows_of`,
    or ``windows`` of them evenly spaced over the whole text (every genre, not only the first)."""
    wins = windows_of(ids, ctx)
    if windows is None or windows >= len(wins):
        return wins
    return wins[np.linspace(0, len(wins) - 1, windows).round().astype(int)]


def evaluate(model: nn.Module, ids: np.ndarray, ctx: int = 256, windows: int | None = None, batch: int = 8) -> dict:
    """Held-out perplexity (protocol of :mod:`mlx_dupq.eval.ppl` on :func:`eval_windows`) and
    routing frequencies.

    Returns ``{"ppl", "nll", "ctx", "windows", "tokens", "routing"}``; ``routing`` maps each MoE
    layer index to the share of the tokens' k assignments per expert (sums to 1)."""
    wins = eval_windows(ids, ctx, windows)
    records = attach_recorders(model)
    counts = {i: np.zeros(moe.gate.n_routed_experts, dtype=np.int64) for i, moe in moe_layers(model)}
    layer_ids = list(counts)
    total = 0.0
    try:
        for s in range(0, len(wins), batch):
            x = mx.array(wins[s : s + batch])
            records.items.clear()
            logits = model(x)
            mx.eval(logits)
            total += token_nll_sum(logits[:, :-1, :], x[:, 1:])
            for li, (_, inds) in zip(layer_ids, records.items):
                counts[li] += np.bincount(np.asarray(inds).reshape(-1), minlength=len(counts[li]))
            records.items.clear()
    finally:
        detach_recorders(model)
    n = len(wins) * (ctx - 1)
    nll = total / n
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "ctx": ctx,
        "windows": len(wins),
        "tokens": n,
        "routing": {str(i): (c / c.sum()).round(5).tolist() for i, c in counts.items()},
    }


def unigram_eval(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int, ctx: int, windows: int | None = None) -> dict:
    """Add-one-smoothed unigram model of ``train_ids`` scored on the same predicted tokens as
    :func:`evaluate` (positions 2..ctx of each window)."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = eval_windows(eval_ids, ctx, windows)[:, 1:].reshape(-1)
    nll = float(-logp[targets].mean())
    return {"ppl": math.exp(nll), "nll": nll, "ctx": ctx, "tokens": int(targets.size)}


# --------------------------------------------------------------------------- saving


weights_sha256 = sha256_file  # sha256 of the saved weights file (recorded in the build marker)


def save(model: nn.Module, config: dict, tokenizer_dir: Path, out: str | Path, dtype: str = "float16") -> Path:
    """Write ``model`` as a Hugging Face style directory: config.json, model.safetensors (``dtype``,
    mlx-lm names, experts stacked as ``switch_mlp``), tokenizer files. Temp dir, then renamed."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dt = getattr(mx, dtype)
    weights = {k: v.astype(dt) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    tokenizer_dir = Path(tokenizer_dir)
    copied = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).exists()]
    if not copied:
        raise DupqError(f"no tokenizer files in {tokenizer_dir}; pass a directory holding tokenizer.json")
    for n in copied:
        shutil.copy(tokenizer_dir / n, tmp / n)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build(
    out: str | Path,
    cfg: TrainConfig = TINY_DEEPSEEK_MOE,
    tokenizer_model: str = TOKENIZER_MODEL,
    eval_data: str | None = "brown:eval",
    eval_ctx: int = 256,
    eval_windows: int | None = 256,
    progress: Progress | None = None,
) -> dict:
    """Train ``cfg`` on its text with the tokenizer of ``tokenizer_model``, save to ``out``,
    evaluate the saved weights against a unigram model on ``eval_data``; return the result dict
    (config, seed, steps, seconds, loss history, eval, unigram, routing, sha256, path)."""
    cfg.check()
    t0 = time.perf_counter()
    tokenizer, tok_dir, vocab = load_tokenizer(tokenizer_model)
    ids = token_ids(tokenizer, cfg.train_data)
    if progress:
        progress(0, cfg.steps, f"{len(ids)} training tokens")
    model, history = train(cfg, ids, vocab, progress, log_every=20)
    train_s = time.perf_counter() - t0
    round_to(model, cfg.save_dtype)
    eos = tokenizer.eos_token_id
    config = cfg.model_config(vocab, getattr(tokenizer, "bos_token_id", None), eos)
    path = save(model, config, tok_dir, out, cfg.save_dtype)
    result = {
        "config": cfg.to_dict(),
        "model_config": config,
        "tokenizer": tokenizer_model,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_text_tokens": int(len(ids)),
        "parameters": int(sum(v.size for _, v in tree_flatten(model.parameters()))),
        "train_seconds": round(train_s, 1),
        "history": history,
        "weights": WEIGHTS_FILE,
        "sha256": weights_sha256(path / WEIGHTS_FILE),
        "path": str(path),
    }
    if eval_data:
        eval_ids = token_ids(tokenizer, eval_data)
        if progress:
            progress(cfg.steps, cfg.steps, f"evaluating on {eval_data}")
        ev = evaluate(model, eval_ids, eval_ctx, eval_windows)
        result["eval_text_tokens"] = int(len(eval_ids))
        result["eval"] = {"data": eval_data, **{k: v for k, v in ev.items() if k != "routing"}}
        result["routing"] = ev["routing"]
        result["unigram"] = {"data": eval_data, "fit_on": cfg.train_data,
                             **unigram_eval(ids, eval_ids, vocab, eval_ctx, eval_windows)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def named_recipe() -> dict:
    """What identifies the named model ``tiny-deepseek-moe`` (its cache marker compares this)."""
    return {"config": TINY_DEEPSEEK_MOE.to_dict(), "tokenizer": TOKENIZER_MODEL}


def build_named(out: str | Path, progress: Progress | None = None) -> dict:
    """Build ``tiny-deepseek-moe`` into ``out`` (used by :func:`mlx_dupq.io.models.fetch`)."""
    return build(out, TINY_DEEPSEEK_MOE, TOKENIZER_MODEL, progress=progress)
