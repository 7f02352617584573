"""Tiny random-config models for tests and examples: built in milliseconds, saved as Hugging Face
directories (config.json + safetensors + tokenizer), so every code path runs without a download.

    from mlx_dupq.testing import make_hf_dir
    src = make_hf_dir(tmp / "tiny", "qwen2")      # then mlx_dupq.convert(src, out, recipe)

Families: :data:`CONFIGS` (dense qwen2 / llama; MoE deepseek, qwen2_moe, qwen3_moe, mixtral, olmoe).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .adapter import model_classes

VOCAB = 320  # > 256 byte-level symbols + 1 special token, so every text maps to ids < VOCAB

CONFIGS = {
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        vocab_size=VOCAB, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        vocab_size=VOCAB, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "deepseek": dict(
        model_type="deepseek", architectures=["DeepseekForCausalLM"], hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, moe_layer_freq=1,
        first_k_dense_replace=1, rms_norm_eps=1e-6, vocab_size=VOCAB, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False,
    ),
    # the other MoE families mlx-lm knows (stored with mlx-lm's stacked switch_mlp names)
    "qwen2_moe": dict(
        model_type="qwen2_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, rms_norm_eps=1e-6, vocab_size=VOCAB,
        tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-6,
        vocab_size=VOCAB, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=512,
        norm_topk_prob=True,
    ),
    "mixtral": dict(
        model_type="mixtral", hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
        rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "olmoe": dict(
        model_type="olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5,
        vocab_size=VOCAB, tie_word_embeddings=False,
    ),
}


def make_tokenizer(path: Path) -> None:
    """A tiny byte-level BPE tokenizer (fast tokenizer files) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the full byte alphabet, sorted: deterministic across processes (alphabet() is a set's order)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())
    )
    text = ["the quick brown fox jumps over the lazy dog " * 4, "hello world, this is a tiny test corpus."]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(str(path))


def unstack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Stacked ``<block>.switch_mlp.<proj>.weight`` (E, out, in) -> one tensor per expert,
    ``<block>.experts.<e>.<proj>.weight`` (the Hugging Face checkpoint names); other names unchanged."""
    out = {}
    for k, v in weights.items():
        if ".switch_mlp." in k:
            head, proj = k.split(".switch_mlp.")
            proj = proj.split(".")[0]
            for e in range(v.shape[0]):
                out[f"{head}.experts.{e}.{proj}.weight"] = v[e]
        else:
            out[k] = v
    return out


def _hf_names(model_type: str, weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """mlx-lm parameter names -> Hugging Face names (DeepSeek experts unstacked)."""
    return unstack_experts(weights) if model_type == "deepseek" else weights


def build_model(model_type: str, seed: int = 0, **overrides):
    config = {**CONFIGS[model_type], **overrides}
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # random weights with a few outliers, like real checkpoints
    rng = np.random.default_rng(seed)
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if "norm" in k:
            a = 1.0 + 0.1 * rng.standard_normal(v.shape)
        else:
            a = rng.standard_normal(v.shape) * 0.05
            if v.ndim >= 2:
                a.flat[rng.integers(0, a.size, max(1, a.size // 500))] *= 8
        params[k] = mx.array(a.astype(np.float32))
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    return model, config


def make_hf_dir(path: Path, model_type: str, seed: int = 0, dtype=mx.float32, **overrides) -> Path:
    """Write a tiny random model of ``model_type`` (config fields overridable) as a Hugging Face directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, config = build_model(model_type, seed, **overrides)
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: v.astype(dtype) for k, v in _hf_names(model_type, weights, config).items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    make_tokenizer(path)
    return path


TOKENS = mx.array([[1, 5, 9, 20, 33, 47, 60, 71, 2, 8, 15, 40]])


def logits(model, tokens: mx.array = TOKENS) -> mx.array:
    """Evaluated logits of ``model`` on a fixed short token sequence."""
    out = model(tokens)
    mx.eval(out)
    return out


def rel_err(a: mx.array, b: mx.array) -> float:
    """||a - b|| / ||b||."""
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def free_base_port(n: int) -> int:
    """A port p with p .. p+n-1 free on 127.0.0.1 (mlx's ring backend listens on base + rank).

    Raises RuntimeError when 50 tries find no such run."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free ports")


def mlx_launch(n: int, argv: list[str], *, timeout: float | None = None, env: dict | None = None,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``mlx.launch -n N --backend ring -- ARGV`` on localhost, output captured.

    The launcher and its ranks run in a process group of their own: past ``timeout`` the whole group
    is killed (a timed-out ``subprocess.run`` kills only the launcher and leaves ranks spinning in a
    collective) and ``subprocess.TimeoutExpired`` is raised. mlx.launch may exit 0 when a rank failed:
    check what the ranks write. Raises FileNotFoundError when mlx.launch is not on PATH."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        raise FileNotFoundError("mlx.launch is not on PATH (it ships with mlx)")
    args = [launcher, "-n", str(n), "--backend", "ring", "-p", str(free_base_port(n)), "--", *argv]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    return subprocess.CompletedProcess(args, p.returncode, out, err)
