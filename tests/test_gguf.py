"""GGUF import: tiny GGUF files written here with gguf.GGUFWriter, read back with GGUFSource."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dupq.errors import DupqError
from mlx_dupq.io.gguf import GGUFSource, llama3_rope_scaling, unpermute_qk

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------- a tiny byte-level BPE vocabulary
WORDS = ["Ġthe", "Ġquick", "Ġbrown", "Ġfox", "Ġhello", "Ġworld", "the", "hello", "in", "Ġis", "Ġ20", "20"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (independent of transformers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 bytes, merged words, then control tokens."""
    tokens = byte_alphabet()
    merges: list[str] = []
    for w in WORDS:
        cur = w[0]
        for ch in w[1:]:
            if cur + ch not in tokens:
                merges.append(f"{cur} {ch}")
                tokens.append(cur + ch)
            cur += ch
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    return tokens + SPECIALS, types, merges


TOKENS, TOKEN_TYPES, MERGES = tiny_vocab()
VOCAB = len(TOKENS)

# ---------------------------------------------------------------- tiny model configs
BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB, rope_theta=10000.0,
    max_position_embeddings=256,
)  # fmt: skip
CONFIGS = {
    "llama": dict(BASE, model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32, tie_word_embeddings=True),
    "qwen3_moe": dict(
        BASE, model_type="qwen3_moe", head_dim=16, tie_word_embeddings=False, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        BASE, model_type="qwen2_moe", tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64,
    ),
}  # fmt: skip
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}

# mlx-lm parameter name piece -> GGUF name piece (written out by hand, independent of the reader)
TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
    "mlp.switch_mlp.up_proj": "ffn_up_exps", "mlp.switch_mlp.down_proj": "ffn_down_exps",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
}  # fmt: skip


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{TO_GGUF[mod]}.{kind}"


def permute_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``permute`` (forward)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_mlx_model(config: dict):
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def model_from_source(src):
    """An mlx-lm model with weights from a Source, built with mlx-lm directly."""
    model = build_mlx_model(src.config)
    weights = model.sanitize({k: src.get(k) for k in src.keys()})
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def random_weights(model, seed: int, bias: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if "norm" in k:
            out[k] = (1 + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        elif k.endswith(".bias"):
            out[k] = (0.1 * rng.standard_normal(v.shape)).astype(np.float32) if bias else np.zeros(v.shape, np.float32)
        else:
            out[k] = (0.08 * rng.standard_normal(v.shape)).astype(np.float32)
    return out


def write_gguf(
    path: Path,
    model_type: str,
    weights: dict[str, np.ndarray],
    types: dict[str, Q] | None = None,
    add_bos: bool = False,
    pre: str = "qwen2",
    extra=None,
) -> Path:
    """Write ``weights`` (mlx-lm names) as llama.cpp would: metadata, tokenizer, permuted Q/K."""
    cfg = CONFIGS[model_type]
    arch = GGUF_ARCH[model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if "num_experts" in cfg:
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in cfg:
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(TOKENS.index("<|im_end|>"))
    w.add_pad_token_id(TOKENS.index("<|endoftext|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    if extra:
        extra(w)
    types = types or {}
    for k, a in weights.items():
        if model_type == "llama" and (".q_proj." in k or ".k_proj." in k):
            a = permute_llama_cpp(a, cfg["num_attention_heads"] if ".q_proj." in k else cfg["num_key_value_heads"])
        qtype = types.get(k, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(gguf_name(k), a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(k), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(k), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_float_gguf(tmp_path: Path, model_type: str, seed: int = 0, **kw):
    """(gguf path, reference mlx-lm model, its float weights)."""
    config = CONFIGS[model_type]
    ref = build_mlx_model(config)
    weights = random_weights(ref, seed, bias=model_type in ("qwen2", "qwen2_moe"))
    if not config["tie_word_embeddings"]:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"] * 0.5)
    ref.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    mx.eval(ref.parameters())
    path = write_gguf(tmp_path / f"{model_type}.gguf", model_type, weights, **kw)
    return path, ref, weights


def logits(model, ids=(5, 270, 17, 260, 99, 42, 7, 280)) -> np.ndarray:
    return np.array(model(mx.array([list(ids)])))


# ---------------------------------------------------------------- tests


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for shape, heads in (((64, 48), 4), ((32, 8), 2), ((64,), 4)):
        w = rng.standard_normal(shape).astype(np.float32)
        p = permute_llama_cpp(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, heads), w)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe"])
def test_float_gguf_matches_original_model(tmp_path, model_type):
    path, ref, weights = make_float_gguf(tmp_path, model_type)
    src = GGUFSource(path)
    cfg = src.config
    # accepted by mlx-lm's ModelArgs and equal to the config the weights came from
    for k, v in CONFIGS[model_type].items():
        assert cfg[k] == pytest.approx(v) if isinstance(v, float) else cfg[k] == v, k
    assert cfg["bos_token_id"] == TOKENS.index("<|im_start|>")
    assert cfg["eos_token_id"] == TOKENS.index("<|im_end|>")
    assert set(src.keys()) == set(weights)
    for k, v in weights.items():  # F32: exact, in the Hugging Face orientation, permutation undone
        got = src.get(k)
        assert got.dtype == mx.float32
        np.testing.assert_array_equal(np.array(got), v, err_msg=k)
    model = model_from_source(src)
    np.testing.assert_allclose(logits(model), logits(ref), rtol=1e-5, atol=1e-5)


TYPES = {  # one of each type gguf's numpy code can write
    "model.embed_tokens.weight": (Q.Q8_0, 0.01),
    "model.layers.0.self_attn.q_proj.weight": (Q.Q4_0, 0.12),
    "model.layers.0.self_attn.k_proj.weight": (Q.Q4_1, 0.12),
    "model.layers.0.self_attn.v_proj.weight": (Q.Q5_0, 0.06),
    "model.layers.0.self_attn.o_proj.weight": (Q.Q5_1, 0.06),
    "model.layers.0.mlp.gate_proj.weight": (Q.F16, 1e-3),
    "model.layers.0.mlp.up_proj.weight": (Q.BF16, 8e-3),
    "model.layers.0.mlp.down_proj.weight": (Q.Q8_0, 0.01),
    "model.layers.1.self_attn.q_proj.weight": (Q.Q8_0, 0.01),
    "model.layers.1.self_attn.k_proj.weight": (Q.Q5_0, 0.06),
    "lm_head.weight": (Q.Q4_0, 0.12),
}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_quantized_gguf_dequantizes_within_tolerance(tmp_path, model_type):
    types = {k: t for k, (t, _) in TYPES.items() if k in build_keys(model_type)}
    path, ref, weights = make_float_gguf(tmp_path, model_type, types=types)
    src = GGUFSource(path)
    stored = src.tensor_types()
    for k, v in weights.items():
        got = np.array(src.get(k))
        assert got.shape == v.shape, k
        qtype, tol = TYPES.get(k, (Q.F32, 0.0))
        assert stored[k] == qtype.name
        rel = np.linalg.norm(got - v) / np.linalg.norm(v)
        assert rel <= tol, (k, qtype.name, rel)
        if qtype != Q.F32:
            assert rel > 0, k  # really stored quantized
    # the model equals one built from the same weights rounded through each type (computed here
    # without the reader: quantize the permuted tensor, dequantize, scatter the rows back)
    expected = {}
    n_heads = {"q_proj": CONFIGS[model_type]["num_attention_heads"], "k_proj": CONFIGS[model_type]["num_key_value_heads"]}
    for k, v in weights.items():
        qtype = TYPES.get(k, (Q.F32, 0.0))[0]
        proj = k.split(".")[-2]
        permuted = model_type == "llama" and proj in n_heads
        a = permute_llama_cpp(v, n_heads[proj]) if permuted else v
        if qtype == Q.F16:
            a = a.astype(np.float16).astype(np.float32)
        elif qtype != Q.F32:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
        if permuted:
            rows = permute_llama_cpp(np.arange(v.shape[0]), n_heads[proj])
            back = np.empty_like(a)
            back[rows] = a
            a = back
        expected[k] = mx.array(a)
    ref.load_weights(list(expected.items()))
    np.testing.assert_allclose(logits(model_from_source(src)), logits(ref), rtol=1e-5, atol=1e-5)


def build_keys(model_type: str) -> set[str]:
    keys = {k for k, _ in tree_flatten(build_mlx_model(CONFIGS[model_type]).parameters())}
    if not CONFIGS[model_type]["tie_word_embeddings"]:
        keys.add("lm_head.weight")
    return keys


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path, _, _ = make_float_gguf(tmp_path, "qwen2")
    src = GGUFSource(path)
    out = tmp_path / "tok"
    src.save_tokenizer(out)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    tok = load_tokenizer(out)
    text = "hello world, the quick brown fox is in 2024!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert TOKENS.index("Ġquick") in ids and TOKENS.index("hello") in ids  # merges applied
    assert ids[0] != TOKENS.index("<|im_start|>")  # add_bos_token false
    assert tok.encode("<|im_end|>") == [TOKENS.index("<|im_end|>")]  # control token kept whole
    assert tok.eos_token_id == TOKENS.index("<|im_end|>")
    assert TOKENS.index("<|im_end|>") in tok.eos_token_ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_large_tensors_dequantize_in_chunks_identically(tmp_path, monkeypatch):
    """Row chunks (what a 150k-token embedding takes) give the bytes a whole-tensor dequantization gives."""
    import mlx_dupq.io.gguf as g

    types = {k: t for k, (t, _) in TYPES.items() if k in build_keys("qwen2")}
    path, _, _ = make_float_gguf(tmp_path, "qwen2", types=types)
    src = GGUFSource(path)
    whole = {k: src.get(k) for k in src.keys()}
    monkeypatch.setattr(g, "_DEQUANT_CHUNK_BYTES", 100)  # a few rows per chunk
    chunked = [k for k, t in src._tensors.items() if t.data.ndim == 2 and t.data.nbytes > 100]
    assert chunked  # some quantized tensors really go by chunks of rows
    for k in src.keys():
        assert mx.array_equal(src.get(k), whole[k]), k


def test_large_metadata_arrays_keep_their_values_only(tmp_path, monkeypatch):
    """The reader's vocabulary and merges are reduced to values (a 150k vocabulary's numpy views are
    ~0.45 GB): metadata, config and tokenizer read the same, and a tensor read leaves no file pages mapped in."""
    import mlx_dupq.io.gguf as g

    path, _, _ = make_float_gguf(tmp_path, "qwen2")
    full = GGUFSource(path)
    tok_full, cfg_full = full.tokenizer_metadata()
    monkeypatch.setattr(g, "_COMPACT_PARTS", 16)
    g._open_reader.cache_clear()
    small = GGUFSource(path)
    assert small._reader is not full._reader
    compact = [k for k, f in small._reader.fields.items() if isinstance(f, g._Values)]
    assert "tokenizer.ggml.tokens" in compact and "tokenizer.ggml.merges" in compact
    assert small._reader.get_field("tokenizer.ggml.tokens").contents(3) == TOKENS[3]
    assert small.tokenizer_metadata() == (tok_full, cfg_full)
    assert small.config == full.config
    for key in small.keys():
        assert mx.array_equal(small.get(key), full.get(key))
    if Path("/proc/self/smaps").exists():  # Linux: the file's pages of both mappings were dropped
        assert _mapped_kb(path) == 0
    g._open_reader.cache_clear()


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:
            inside = line.endswith(str(Path(path).resolve()))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_tokenizer_adds_bos_when_the_file_says_so(tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path, _, _ = make_float_gguf(tmp_path, "llama", add_bos=True)
    src = GGUFSource(path)
    src.save_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    ids = tok.encode("the fox")
    assert ids[0] == TOKENS.index("<|im_start|>")
    assert tok.decode(ids[1:]) == "the fox"


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path, _, _ = make_float_gguf(tmp_path, "llama", pre="smollm")
    GGUFSource(path).save_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    alphabet = byte_alphabet()
    ids = tok.encode("in 2024")
    assert [TOKENS[i] for i in ids] == ["in", alphabet[ord(" ")], "2", "0", "2", "4"]


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    # llama.cpp's convert_hf_to_gguf.py loop for Llama 3.1 (factor 8, low 1, high 4, 8192), head_dim 64
    base, dim, factor, low, high, old = 500000.0, 64, 8.0, 1.0, 4.0, 8192
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    rope_freqs = np.array(factors, np.float32)
    got = llama3_rope_scaling(rope_freqs, base, dim)
    assert got == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    with pytest.raises(DupqError, match="rope_freqs"):
        llama3_rope_scaling(np.ones(dim // 2, np.float32), base, dim)

    # the same through a file: hidden 256 / 4 heads = head_dim 64; config accepted by mlx-lm
    cfg = dict(CONFIGS["llama"], hidden_size=256, rope_theta=base)
    ref = build_mlx_model(cfg)
    weights = random_weights(ref, 0, bias=False)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    saved = CONFIGS["llama"]
    CONFIGS["llama"] = cfg
    try:
        path = write_gguf(tmp_path / "l3.gguf", "llama", weights, extra=lambda w: w.add_tensor("rope_freqs.weight", rope_freqs))
    finally:
        CONFIGS["llama"] = saved
    src = GGUFSource(path)
    assert src.config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in src.keys()
    model = model_from_source(src)
    assert np.isfinite(logits(model)).all()


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    p1, _, _ = make_float_gguf(tmp_path, "qwen2", seed=0)
    fp = GGUFSource(p1).fingerprint()
    assert fp == GGUFSource(p1).fingerprint() and len(fp) == 16
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(p1.read_bytes())
    assert GGUFSource(copy).fingerprint() == fp
    (tmp_path / "b").mkdir()
    p2, _, _ = make_float_gguf(tmp_path / "b", "qwen2", seed=1)
    assert GGUFSource(p2).fingerprint() != fp


def test_bad_files_give_one_line_errors(tmp_path):
    path, _, _ = make_float_gguf(tmp_path, "qwen2")
    data = path.read_bytes()
    cases = {
        "empty.gguf": b"",
        "text.gguf": b"this is not a gguf file at all\n" * 10,
        "half.gguf": data[: len(data) // 2],
        "short.gguf": data[:-100],
        "header.gguf": data[:40],
        # a metadata string length that points far past the end of the file
        "garbage.gguf": data[:24] + b"\xff" * 8 + data[32:],
    }
    for name, blob in cases.items():
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(DupqError) as e:
            GGUFSource(bad)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and "re-download" in msg, (name, msg)
    with pytest.raises(DupqError, match="does not exist"):
        GGUFSource(tmp_path / "missing.gguf")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DupqError, match="'gemma2'.*llama, qwen2, qwen3"):
        GGUFSource(path)


def test_unknown_tensor_is_refused(tmp_path):
    path, _, _ = make_float_gguf(
        tmp_path, "qwen2", extra=lambda w: w.add_tensor("blk.0.attn_qkv.weight", np.zeros((8, 64), np.float32))
    )
    with pytest.raises(DupqError, match="blk.0.attn_qkv.weight"):
        GGUFSource(path)


def test_open_source_dispatches_gguf(tmp_path):
    from mlx_dupq.io.source import open_source

    path, _, _ = make_float_gguf(tmp_path, "qwen2")
    src = open_source(path)
    assert isinstance(src, GGUFSource)
    groups = src.groups()
    assert groups[0][0] == "other" and [g for g, _ in groups[1:]] == ["layer.0", "layer.1"]


@pytest.mark.parametrize(
    "model_type,kind,expected",
    [
        ("qwen2", gguf.RopeScalingType.LINEAR, {"type": "linear", "factor": 2.0}),
        ("qwen3", gguf.RopeScalingType.YARN, {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}),
    ],
)
def test_rope_scaling_metadata_reaches_the_model(tmp_path, model_type, kind, expected):
    def scaling(w):
        w.add_rope_scaling_type(kind)
        w.add_rope_scaling_factor(2.0)
        w.add_rope_scaling_orig_ctx_len(128)

    path, ref, _ = make_float_gguf(tmp_path, model_type, extra=scaling)
    src = GGUFSource(path)
    assert expected.items() <= src.config["rope_scaling"].items()
    model = model_from_source(src)
    # scaled RoPE changes attention at positions > 0: the logits differ from the unscaled model
    a, b = logits(model), logits(ref)
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-5)
    assert np.abs(a[:, 1:] - b[:, 1:]).max() > 1e-3
