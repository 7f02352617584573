"""GGUF files (llama.cpp) as a :class:`~mlx_dupq.io.source.Source`.

A GGUF file is read with ``gguf.GGUFReader`` (memory-mapped): ``config`` is a Hugging Face style
config built from the file's metadata, tensors are renamed to Hugging Face names and
dequantized one at a time with gguf's numpy code, and the tokenizer is rebuilt from the metadata
with transformers' GGUF tokenizer builders (no torch needed).

Supported architectures: ``llama``, ``qwen2``, ``qwen3``, ``qwen2moe``, ``qwen3moe``.

Two things differ from a Hugging Face checkpoint:

- llama.cpp permutes the rows of ``q_proj`` / ``k_proj`` of ``llama``-arch models (its RoPE pairs
  adjacent dimensions, Hugging Face pairs the two halves of a head); :func:`unpermute_qk` undoes it.
- MoE experts are stored stacked, one ``(n_experts, out, in)`` tensor per projection; they are
  exposed under mlx-lm's stacked names (``mlp.switch_mlp.gate_proj.weight``), which mlx-lm's
  ``sanitize`` passes through unchanged, instead of one tensor per expert.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
from functools import cache, lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import DupqError
from ..adapter import layer_index
from .base import Source

#: GGUF ``general.architecture`` -> (Hugging Face ``model_type``, ``architectures`` entry)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# blk.N.<gguf name>.{weight,bias} -> model.layers.N.<hf name>.{weight,bias}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # MoE (qwen2moe / qwen3moe): router, stacked experts, shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# tensors that are not model weights: llama3's RoPE frequency factors go into config.rope_scaling
_NOT_WEIGHTS = ("rope_freqs.weight",)

def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: ``(out, ...) -> (out, ...)``.

    llama.cpp's converter stores ``w.reshape(n_head, 2, out // n_head // 2, ...).swapaxes(1, 2)``
    (interleaving the two halves of each head); this is its inverse. ``n_head`` is the number of
    query heads for ``q_proj`` and of key/value heads for ``k_proj``. Works for weights and biases.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise DupqError(f"cannot undo the Q/K permutation: {rows} rows do not split into {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (what its converter stores for ``llama``-arch models).

    The inverse of :func:`unpermute_qk`; it moves whole rows, so it applies unchanged to a
    quantized weight's codes, scales and offsets.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise DupqError(f"cannot apply the Q/K permutation: {rows} rows do not split into {n_head} heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str | None:
    """GGUF tensor name of a Hugging Face / mlx-lm weight name (inverse of :func:`hf_name`), or None."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if m:
        for g, h in _BLOCK_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return None


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor name, or None if it is not a known model weight."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


@cache
def _can_dequantize(qtype) -> bool:
    """Whether gguf's numpy code can dequantize this GGML type (probed on one zero block)."""
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    try:
        _, size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
    except Exception:  # NotImplementedError, or an unknown type: "cannot", not a crash
        return False
    return True


class _Values:
    """A metadata field of a :class:`gguf.GGUFReader` reduced to its values: the reader keeps two or
    three numpy views of the file per array element (Qwen2.5-Coder-0.5B's 151,936-token vocabulary and
    merges: 575 MB resident once open, 331 MB with them as values; ``bench/source_memory.py``)."""

    __slots__ = ("name", "types", "_values")

    def __init__(self, field):
        self.name, self.types, self._values = field.name, field.types, field.contents()

    def contents(self, index_or_slice: int | slice = slice(None)):
        return self._values[index_or_slice]


#: a quantized tensor larger than this dequantizes in chunks of rows of about this size
_DEQUANT_CHUNK_BYTES = 8 << 20

#: a metadata field with more parts than this keeps its values only (:class:`_Values`)
_COMPACT_PARTS = 4096


@lru_cache(maxsize=2)
def _open_reader(path: str, size: int, mtime_ns: int):
    """A memory-mapped reader, shared by sources on the same unchanged file (parsing a header with
    a 150k-token vocabulary takes seconds), its large metadata arrays kept as values."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    for key, field in list(reader.fields.items()):
        if len(field.parts) > _COMPACT_PARTS:
            reader.fields[key] = _Values(field)
    return reader


def _drop_pages(reader) -> None:
    """Drop the file pages a tensor read mapped in: they stay resident (and in RSS) while the mapping
    lives, though the tensor was copied out; a later read maps them in again from the page cache."""
    m = getattr(reader.data, "_mmap", None)
    if m is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _plain_float(qtype) -> bool:
    import gguf

    return qtype in (
        gguf.GGMLQuantizationType.F64,
        gguf.GGMLQuantizationType.I8,
        gguf.GGMLQuantizationType.I16,
        gguf.GGMLQuantizationType.I32,
        gguf.GGMLQuantizationType.I64,
    )


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 120 else msg[:117] + "..."


def llama3_rope_scaling(factors: np.ndarray, base: float, head_dim: int) -> dict:
    """Recover Hugging Face's ``llama3`` rope_scaling from llama.cpp's ``rope_freqs`` tensor.

    ``factors``: ``(head_dim // 2,)``, the divisor llama.cpp applies to each RoPE frequency. The
    factors follow ``1`` (high frequencies), ``factor`` (low ones) and a smooth ramp in between that
    is linear in ``1 / wavelength``; the ramp's slope and intercept give
    ``original_max_position_embeddings`` and ``high_freq_factor`` once ``low_freq_factor`` is taken
    as 1 (every Llama 3.x release). The result is checked by recomputing the factors.
    """
    factors = np.asarray(factors, dtype=np.float64)
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    factor = float(factors.max())
    mid = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    if factor <= 1 + 1e-4 or mid.sum() < 2:
        raise DupqError(
            "cannot recover the llama3 RoPE scaling from the file's rope_freqs tensor; "
            "convert the Hugging Face model directory instead"
        )
    smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[mid], smooth, 1)
    high = 1 - 1 / intercept
    old_ctx = -slope / intercept
    cfg = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(round(high, 3)),
        "original_max_position_embeddings": int(round(old_ctx)),
    }
    if np.max(np.abs(llama3_rope_factors(cfg, base, head_dim) - factors)) > 1e-3 * factor:
        raise DupqError(
            "the file's rope_freqs tensor does not follow Llama 3's RoPE scaling; "
            "convert the Hugging Face model directory instead"
        )
    return cfg


def llama3_rope_factors(cfg: dict, base: float, head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for a ``llama3`` rope_scaling config: ``(head_dim // 2,)``."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    factor, low, high = cfg["factor"], cfg["low_freq_factor"], cfg["high_freq_factor"]
    old = cfg["original_max_position_embeddings"]
    smooth = (old / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, ramp))


class GGUFSource(Source):
    """A ``.gguf`` file: metadata -> HF config, tensors dequantized to float32 one at a time."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        fname = self.path.name
        if not self.path.is_file():
            raise DupqError(f"{self.path} does not exist (expected a .gguf file)")
        try:
            st = self.path.stat()
            self._reader = _open_reader(str(self.path.resolve()), st.st_size, st.st_mtime_ns)
            tensors = {t.name: t for t in self._reader.tensors}
        except Exception as e:  # gguf raises ValueError/IndexError/struct.error/... on bad bytes
            raise DupqError(f"{fname} is not a valid GGUF file ({_one_line(e)}); re-download it") from None
        for t in tensors.values():
            if int(t.data_offset) + int(t.n_bytes) > st.st_size:
                raise DupqError(f"{fname} is not a valid GGUF file (truncated in tensor {t.name}); re-download it")

        self.architecture = self._meta("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise DupqError(
                f"{fname} holds a {self.architecture!r} model; GGUF import supports "
                f"{', '.join(ARCHITECTURES)}; convert the Hugging Face model directory instead"
            )

        self._tensors = {}  # hf name -> ReaderTensor
        for gname, t in tensors.items():
            if gname in _NOT_WEIGHTS:
                continue
            hf = hf_name(gname)
            if hf is None:
                raise DupqError(
                    f"{fname} has a tensor mlx-dupq cannot place ({gname}) for architecture "
                    f"{self.architecture}; convert the Hugging Face model directory instead"
                )
            if not (_can_dequantize(t.tensor_type) or _plain_float(t.tensor_type)):
                raise DupqError(
                    f"{fname} stores {gname} as {t.tensor_type.name}, which gguf's numpy code cannot "
                    "dequantize; use a GGUF with Q2_K..Q8_0, F16, BF16 or F32 tensors"
                )
            self._tensors[hf] = t
        self._gguf_tensors = tensors
        self.config = self._build_config()

    # ---- metadata -------------------------------------------------------------------------
    def _meta(self, key: str, default=KeyError):
        field = self._reader.get_field(key)
        if field is None:
            if default is KeyError:
                raise DupqError(
                    f"{self.path.name} lacks the GGUF metadata key {key!r}; re-download the file "
                    "or convert it again with llama.cpp"
                )
            return default
        value = field.contents()
        if isinstance(value, float):
            value = float(f"{value:.7g}")  # metadata floats are float32: 9.9999997e-06 -> 1e-05
        return value

    @property
    def file_type(self) -> str:
        """llama.cpp's name of the file's quantization mix (``Q4_K_M``, ``Q4_1``, ``F16``, ...)."""
        import gguf

        ft = self._meta("general.file_type", None)
        if ft is None:
            return "unknown"
        try:
            return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"type {ft}"

    def tensor_types(self) -> dict[str, str]:
        """GGML storage type of every tensor, by Hugging Face name."""
        return {k: t.tensor_type.name for k, t in self._tensors.items()}

    def _build_config(self) -> dict:
        arch = self.architecture
        a = lambda key, default=KeyError: self._meta(f"{arch}.{key}", default)
        model_type, hf_arch = ARCHITECTURES[arch]
        hidden = int(a("embedding_length"))
        heads = a("attention.head_count")
        kv_heads = a("attention.head_count_kv", heads)
        if isinstance(heads, list) or isinstance(kv_heads, list):
            raise DupqError(
                f"{self.path.name} has a different head count per layer, which mlx-lm's {model_type} "
                "cannot express; convert the Hugging Face model directory instead"
            )
        heads, kv_heads = int(heads), int(kv_heads)
        head_dim = int(a("attention.key_length", hidden // heads))
        rope_dims = a("rope.dimension_count", None)
        if rope_dims is not None and int(rope_dims) != head_dim:
            raise DupqError(
                f"{self.path.name} rotates {rope_dims} of {head_dim} head dimensions (partial RoPE), "
                f"which mlx-lm's {model_type} does not do; convert the Hugging Face model directory instead"
            )
        if arch in ("qwen2", "qwen2moe") and head_dim != hidden // heads:
            raise DupqError(
                f"{self.path.name} has head_dim {head_dim} != hidden/heads, which mlx-lm's {model_type} "
                "cannot express; convert the Hugging Face model directory instead"
            )
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise DupqError(f"{self.path.name} has no token_embd.weight tensor; re-download the file")
        vocab = int(embed.shape[-1])  # ggml order: (hidden, vocab)
        n_layers = int(a("block_count"))
        cfg: dict = {
            "model_type": model_type,
            "architectures": [hf_arch],
            "hidden_size": hidden,
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(a("rope.freq_base", 10000.0 if arch == "llama" else 1000000.0)),
            "max_position_embeddings": int(a("context_length", 4096)),
            "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        ff = a("feed_forward_length", None)
        if arch == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            cfg["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in self._tensors
        if arch in ("qwen2moe", "qwen3moe"):
            moe_ff = int(a("expert_feed_forward_length"))
            cfg["num_experts"] = int(a("expert_count"))
            cfg["num_experts_per_tok"] = int(a("expert_used_count"))
            cfg["moe_intermediate_size"] = moe_ff
            ff = ff if ff is not None else moe_ff
            if arch == "qwen2moe":
                cfg["shared_expert_intermediate_size"] = int(a("expert_shared_feed_forward_length", moe_ff))
            else:
                cfg["decoder_sparse_step"] = 1
                cfg["mlp_only_layers"] = []
                cfg["norm_topk_prob"] = bool(a("expert_weights_norm", True))
        if ff is None:
            raise DupqError(f"{self.path.name} lacks the GGUF metadata key '{arch}.feed_forward_length'; re-download it")
        if isinstance(ff, list):
            raise DupqError(
                f"{self.path.name} has a different feed-forward size per layer, which mlx-lm's {model_type} "
                "cannot express; convert the Hugging Face model directory instead"
            )
        cfg["intermediate_size"] = int(ff)

        scaling = self._rope_scaling(arch, cfg)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        bos = self._meta("tokenizer.ggml.bos_token_id", None)
        if bos is not None:
            cfg["bos_token_id"] = int(bos)
        eos = self.eos_token_ids()
        if eos:
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return cfg

    def _rope_scaling(self, arch: str, cfg: dict) -> dict | None:
        kind = self._meta(f"{arch}.rope.scaling.type", None)
        if "rope_freqs.weight" in self._gguf_tensors:
            if arch != "llama":
                raise DupqError(f"{self.path.name} has a rope_freqs tensor that mlx-dupq cannot map for {arch}")
            factors = self._dequantize(self._gguf_tensors["rope_freqs.weight"]).reshape(-1)
            return llama3_rope_scaling(factors, cfg["rope_theta"], cfg["head_dim"])
        if kind in (None, "none"):
            return None
        factor = float(self._meta(f"{arch}.rope.scaling.factor", 1.0))
        if kind == "linear":
            return {"type": "linear", "rope_type": "linear", "factor": factor}
        if kind == "yarn" and arch != "qwen2moe":
            out = {"type": "yarn", "rope_type": "yarn", "factor": factor}
            orig = self._meta(f"{arch}.rope.scaling.original_context_length", None)
            if orig is not None:
                out["original_max_position_embeddings"] = int(orig)
            return out
        raise DupqError(
            f"{self.path.name} uses {kind!r} RoPE scaling, which mlx-lm's {cfg['model_type']} "
            "cannot express; convert the Hugging Face model directory instead"
        )

    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids: ``eos`` then ``eot`` / ``eom`` when the file names different ones."""
        out: list[int] = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            v = self._meta(key, None)
            if v is not None and int(v) not in out:
                out.append(int(v))
        return out

    # ---- tensors --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        def order(k: str):
            if k == "model.embed_tokens.weight":
                return (0, 0)
            i = layer_index(k)
            if i is not None:
                return (1, i)
            return (2, 0 if k == "model.norm.weight" else 1)

        return sorted(self._tensors, key=order)  # stable: file order inside a layer

    @staticmethod
    def _dequantize(t) -> np.ndarray:
        import gguf

        shape = tuple(int(d) for d in reversed(t.shape))
        if _plain_float(t.tensor_type):
            return np.asarray(t.data, dtype=np.float32).reshape(shape)
        data = t.data
        if data.ndim < 2 or data.nbytes <= _DEQUANT_CHUNK_BYTES:
            return gguf.quants.dequantize(data, t.tensor_type).reshape(shape)
        # by rows: gguf's numpy dequantization holds several float copies of its input at once (of a
        # 150k-row embedding: several times its 545 MB), a chunk of rows a few MB
        rows = data.reshape(-1, data.shape[-1])
        out = np.empty((rows.shape[0], int(np.prod(shape)) // rows.shape[0]), np.float32)
        step = max(1, _DEQUANT_CHUNK_BYTES // rows.shape[1])
        for i in range(0, rows.shape[0], step):
            out[i : i + step] = gguf.quants.dequantize(rows[i : i + step], t.tensor_type)
        return out.reshape(shape)

    def get(self, key: str) -> mx.array:
        """One tensor as an evaluated float32 ``mx.array`` of the Hugging Face shape ``(out, in)``.

        Stacked MoE experts are ``(n_experts, out, in)``; ``shared_expert_gate`` is ``(1, hidden)``.
        """
        t = self._tensors[key]
        arr = self._dequantize(t)
        if self.architecture == "llama" and (".self_attn.q_proj." in key or ".self_attn.k_proj." in key):
            n = self.config["num_attention_heads"] if ".q_proj." in key else self.config["num_key_value_heads"]
            arr = unpermute_qk(arr, n)
        if key.endswith("mlp.shared_expert_gate.weight") and arr.ndim == 1:
            arr = arr.reshape(1, -1)
        out = mx.array(np.ascontiguousarray(arr, dtype=np.float32))
        mx.eval(out)
        del arr
        _drop_pages(self._reader)
        return out

    # ---- tokenizer ------------------------------------------------------------------------
    def tokenizer_metadata(self) -> tuple[dict, dict]:
        """``(tokenizer_dict, tokenizer_config)`` in the shape transformers' GGUF builders expect."""
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
        except ImportError:  # transformers 4.x
            from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING
        if self._reader.get_field("tokenizer.ggml.tokens") is None:
            raise DupqError(
                f"{self.path.name} has no tokenizer metadata (tokenizer.ggml.tokens); "
                "use a GGUF converted with its tokenizer"
            )
        grouped = {
            group: {
                name: self._meta(f"tokenizer.{key}")
                for key, name in renames.items()
                if self._reader.get_field(f"tokenizer.{key}") is not None
            }
            for group, renames in GGUF_TOKENIZER_MAPPING.items()
        }
        tok = grouped["tokenizer"]
        cfg = {k: v for k, v in grouped.get("tokenizer_config", {}).items() if k in ("chat_template", "add_bos_token", "add_eos_token")}
        if tok.get("tokenizer_type") == "llama":
            cfg.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
        tokens = tok["tokens"]
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
            idx = self._meta(f"tokenizer.ggml.{key}_token_id", None)
            if idx is not None and 0 <= int(idx) < len(tokens):
                cfg[name] = tokens[int(idx)]
        return tok, cfg

    def save_tokenizer(self, dst: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json, chat template and generation_config.json."""
        from transformers import PreTrainedTokenizerFast

        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
        except ImportError:  # transformers 4.x
            from transformers.integrations.ggml import convert_gguf_tokenizer

        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        tok, cfg = self.tokenizer_metadata()
        try:
            backend, extra = convert_gguf_tokenizer(self.architecture, tok)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise DupqError(
                f"{self.path.name}: transformers cannot build its tokenizer ({_one_line(e)}); "
                "use the Hugging Face model directory instead"
            ) from None
        if tok.get("tokenizer_type") == "gpt2" and tok.get("pre_tokenizer_type") == "smollm":
            # llama.cpp's "smollm" split: single digits, then GPT-2's regex (SmolLM's tokenizer.json)
            from tokenizers import pre_tokenizers

            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, **{**cfg, **(extra or {})})
        hf.save_pretrained(str(dst))
        gen = {}
        if "bos_token_id" in self.config:
            gen["bos_token_id"] = self.config["bos_token_id"]
        if "eos_token_id" in self.config:
            gen["eos_token_id"] = self.config["eos_token_id"]
        (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    # ---- identity -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of (size, first MiB, last 64 KiB): cheap, stable across copies and renames."""
        size = self.path.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(self.path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read())
        return h.hexdigest()[:16]
