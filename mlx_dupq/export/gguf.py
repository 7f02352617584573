"""``mlx-dupq export PACK --gguf OUT.gguf``: a pack as a GGUF file that llama.cpp runs.

**Exact by default.** Every quantized weight goes into the smallest llama.cpp type that holds
its numbers bit for bit (:mod:`mlx_dupq.export.blocks`: Q4_0, Q4_1, Q8_0 -- a 2/3/4-bit pack
with float16 scales fits Q4_1); a weight no GGUF quantized type holds (e.g. 8-bit groups whose
zero is not on the grid) is written as ``fallback`` (F32 by default: exact, 4 bytes a weight).
Float tensors keep their stored precision (F16 / BF16 / F32; norms and biases F32).
A rotation folded into the weights needs nothing at run time and exports as any weight.

**Lossy on request.** ``requantize=TYPE`` re-quantizes every quantized weight from the pack's
dequantized (float, rotation-folded) values to ``TYPE`` with gguf's own quantizers (Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0, BF16, F16) or, for the k-quants (Q2_K ... Q6_K), with llama.cpp's
(:mod:`mlx_dupq.export.ggml`, needs ``llama-cpp-python``); a k-quant tensor whose rows do not
split into 256-weight blocks gets llama-quantize's 32-block fallback (Q4_K -> Q5_0, ...).
``fallback=TYPE`` does the same only for the weights that no type holds exactly. The result
records, per tensor, its type and whether it is exact.

**Refused** (one line each): packs that apply a rotation at run time (``online_rotations``),
duplicated copies of linears, run-time activation quantization, MoE packs, and architectures
other than ``llama`` and ``qwen2`` -- llama.cpp would run a different model.

The file gets llama.cpp's metadata for the architecture, llama's Q/K row permutation
(:func:`mlx_dupq.io.gguf.permute_qk`), and the tokenizer (GPT-2 style BPE: tokens, merges,
special ids, chat template, and the pre-tokenizer's llama.cpp name). It is written to
``OUT.tmp`` and renamed: never a half-written OUT.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import mlx.core as mx
import numpy as np

from ..errors import DupqError, UsageError
from ..io import pack as packio
from ..io.gguf import gguf_name, llama3_rope_factors, permute_qk
from ..quant.bitpack import unpack
from ..quant.qtensor import QTensor, dequantize
from . import blocks
from .ggml import GGML_QUANT_TYPES, ggml_quantize, type_for_rows

ARCHITECTURES = ("llama", "qwen2")
#: types gguf-py quantizes in numpy
NUMPY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
REQUANT_TYPES = NUMPY_TYPES + GGML_QUANT_TYPES

#: llama.cpp's pre-tokenizer name for the pre-tokenizers (tokenizer.json) it implements
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass
class TensorRecord:
    """How one tensor went into the GGUF."""

    name: str  # GGUF name
    type: str  # GGML type name
    exact: bool
    n_params: int
    nbytes: int
    source: str  # "4-bit g32" / "float16" ...


@dataclass
class ExportResult:
    path: Path
    architecture: str
    tensors: list[TensorRecord] = field(default_factory=list)
    requantize: str | None = None
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(t.nbytes for t in self.tensors) / max(1, self.n_params)

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "architecture": self.architecture, "requantize": self.requantize,
            "exact": self.exact, "n_params": self.n_params, "bits_per_weight": self.bits_per_weight,
            "types": self.type_counts(), "seconds": self.seconds,
            "tensors": [t.__dict__ for t in self.tensors],
        }


# ------------------------------------------------------------------------------------- checks


def check_exportable(path: Path, config: dict) -> str:
    """The llama.cpp architecture of pack ``path``, or DupqError saying why llama.cpp cannot run it."""
    meta = config["mlx_dupq"]
    name = path.name
    if meta.get("online_rotations"):
        raise DupqError(
            f"{name} applies a rotation at run time ({len(meta['online_rotations'])} modules), which llama.cpp "
            "cannot do; convert without the rotation's online part (a folded rotation exports fine)")
    if meta.get("duplication"):
        raise DupqError(
            f"{name} has duplicated copies of linears ({meta['duplication'].get('mode')} mode), which a GGUF "
            "cannot hold; export a pack converted without duplication")
    if (meta.get("recipe") or {}).get("activations"):
        raise DupqError(f"{name} quantizes activations at run time, which llama.cpp does not; "
                        "export a pack converted without 'activations'")
    arch = config.get("model_type")
    if arch not in ARCHITECTURES or (meta.get("recipe") or {}).get("moe"):
        raise DupqError(f"{name} is a {arch!r} model; GGUF export supports {', '.join(ARCHITECTURES)} (dense) packs")
    rs = config.get("rope_scaling")
    if rs and (rs.get("rope_type") or rs.get("type")) not in ("llama3", "linear"):
        raise DupqError(f"{name} uses {rs.get('rope_type') or rs.get('type')!r} RoPE scaling, which GGUF export "
                        "does not map; export a model without rope_scaling, llama3 or linear")
    return arch


def _check_type(t: str | None, what: str) -> str | None:
    if t is None:
        return None
    t = t.upper()
    if t not in REQUANT_TYPES:
        raise DupqError(f"{what} {t!r} is not a type mlx-dupq writes; use one of {', '.join(REQUANT_TYPES)}")
    return t


# ------------------------------------------------------------------------------------ tensors


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if mx.issubdtype(a.dtype, mx.floating) else np.array(a)


def _float_tensor(a: np.ndarray, qtype: str) -> tuple[np.ndarray, str]:
    """(data for GGUFWriter.add_tensor, type) for a float tensor written as ``qtype`` (or, for a
    k-quant whose rows do not split into its 256-weight blocks, llama-quantize's fallback type)."""
    if a.ndim == 2:
        qtype = type_for_rows(qtype, a.shape[1])
    t = gguf.GGMLQuantizationType[qtype]
    if qtype in GGML_QUANT_TYPES:
        return ggml_quantize(a, qtype), qtype
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), t), qtype


def _quantized(qt: QTensor, permute_heads: int | None, requantize: str | None, fallback: str):
    """(data, type, exact) for one quantized 2-D weight."""
    codes = np.array(qt.codes).astype(np.uint8)
    scales = np.array(qt.scales.astype(mx.float32))
    offsets = np.array(qt.offsets())
    if codes.ndim != 2:
        raise DupqError(f"cannot export a quantized tensor of shape {codes.shape} (expected 2-D)")
    if permute_heads:
        codes, scales, offsets = (permute_qk(a, permute_heads) for a in (codes, scales, offsets))
    if requantize is None:
        found = blocks.best_exact(codes, scales, offsets, int(qt.spec.bits))
        if found is not None:
            return found[1], found[0], True
    w = np.array(dequantize(qt))
    if permute_heads:
        w = permute_qk(w, permute_heads)
    qtype = requantize or fallback
    data, qtype = _float_tensor(w, qtype)
    return data, qtype, qtype == "F32"


def _stored_type(a: mx.array) -> str:
    return {mx.float16: "F16", mx.bfloat16: "BF16"}.get(a.dtype, "F32")


# ---------------------------------------------------------------------------------- metadata


def tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) of a tokenizer.json's pre-tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == _QWEN2_REGEX:
            return "qwen2"
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
    raise DupqError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) is not one mlx-dupq can name "
                    "for llama.cpp (gpt-2, smollm, qwen2, llama-bpe); GGUF export cannot write its tokenizer")


def add_tokenizer(writer: gguf.GGUFWriter, pack: Path, n_vocab: int) -> None:
    """Write a byte-level BPE tokenizer (``gpt2`` in llama.cpp) from the pack's tokenizer files."""
    tj_path = pack / "tokenizer.json"
    if not tj_path.exists():
        raise DupqError(f"{pack} has no tokenizer.json; GGUF export needs the pack's tokenizer (convert it again)")
    tj = json.loads(tj_path.read_text())
    if (tj.get("model") or {}).get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise DupqError(f"{pack}'s tokenizer is not a byte-level BPE; GGUF export writes only those (gpt2 in llama.cpp)")
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(max(n_vocab, len(by_id))):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(pack, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def add_hparams(writer: gguf.GGUFWriter, config: dict, name: str) -> None:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    rs = config.get("rope_scaling") or {}
    if (rs.get("rope_type") or rs.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rs["factor"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(records: list[TensorRecord]) -> int:
    """llama.cpp's ``general.file_type``: the type holding most of the 2-D weights' parameters."""
    weights: dict[str, int] = {}
    for r in records:
        if r.name.endswith(".weight") and "norm" not in r.name:
            weights[r.type] = weights.get(r.type, 0) + r.n_params
    main = max(weights, key=weights.get) if weights else "F32"
    if main == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    for key in (f"MOSTLY_{main}", f"MOSTLY_{main}_M"):
        if key in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[key])
    return int(gguf.LlamaFileType.GUESSED)


# ------------------------------------------------------------------------------------- export


def export_gguf(pack: str | Path, out: str | Path, requantize: str | None = None, fallback: str = "F32",
                force: bool = False, progress: Callable[[str, int, int], None] | None = None) -> ExportResult:
    """Write pack ``pack`` as the GGUF file ``out`` (see the module docstring)."""
    t0 = time.time()
    pack, out = Path(pack), Path(out)
    if not (pack.is_dir() and packio.is_pack(pack)):
        raise DupqError(f"{pack} is not an mlx-dupq pack; export takes a pack written by `mlx-dupq convert`")
    requantize = _check_type(requantize, "--requantize")
    fallback = _check_type(fallback, "--fallback")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    config = packio.read_config(pack)
    arch = check_exportable(pack, config)
    entries: dict[str, dict] = config["mlx_dupq"]["modules"]
    weights = packio.load_weights(pack)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)

    def heads_of(key: str) -> int | None:
        if arch != "llama":
            return None
        return heads if ".self_attn.q_proj." in key else kv_heads if ".self_attn.k_proj." in key else None

    quant_keys = {f"{p}.{n}" for p in entries for n in ("weight", "scales", "biases")}
    names = [(p, "quantized") for p in entries] + [(k, "float") for k in weights if k not in quant_keys]
    result = ExportResult(path=out, architecture=arch, requantize=requantize)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        add_hparams(writer, config, config["mlx_dupq"].get("source", {}).get("name") or pack.name)
        add_tokenizer(writer, pack, int(config["vocab_size"]))
        for i, (key, kind) in enumerate(sorted(names)):
            if progress:
                progress("writing tensors", i, len(names))
            hf = f"{key}.weight" if kind == "quantized" else key
            gname = gguf_name(hf)
            if gname is None:
                raise DupqError(f"{pack.name} has a tensor GGUF export cannot place ({key}); it is not a plain {arch} model")
            if kind == "quantized":
                e = entries[key]
                arrays = {n: weights[f"{key}.{n}"] for n in ("weight", "scales", "biases") if f"{key}.{n}" in weights}
                qt = unpack(arrays, e)
                data, qtype, exact = _quantized(qt, heads_of(hf), requantize, fallback)
                source = f"{e['bits']}-bit g{e['group_size']}{' sym' if e.get('symmetric') else ''}"
            else:
                a = weights[key]
                arr = _np(a)
                if heads_of(hf):
                    arr = permute_qk(arr, heads_of(hf))
                qtype = _stored_type(a) if arr.ndim == 2 else "F32"
                data, qtype = _float_tensor(arr, qtype)
                exact, source = True, str(a.dtype).removeprefix("mlx.core.")
            raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gname, data, raw_dtype=raw)
            n = int(np.prod(qt.shape)) if kind == "quantized" else int(arr.size)
            result.tensors.append(TensorRecord(gname, qtype, exact, n, int(data.nbytes), source))
        rs = config.get("rope_scaling") or {}
        if (rs.get("rope_type") or rs.get("type")) == "llama3":
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
            factors = llama3_rope_factors(rs, float(config.get("rope_theta", 10000.0)), head_dim).astype(np.float32)
            writer.add_tensor("rope_freqs.weight", factors)
        writer.add_file_type(_file_type(result.tensors))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as e:
        raise DupqError(f"could not write {out} ({e.strerror or e}); check the path and free space") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    if progress:
        progress("writing tensors", len(names), len(names))
    result.seconds = time.time() - t0
    return result
