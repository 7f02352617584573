"""``mlx-dupq export PACK --gguf``: exact GGUF blocks, the pack -> GGUF round trip, refusals, and
(when llama-cpp-python is installed) llama.cpp's logits against the pack's."""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

import mlx_dupq
from mlx_dupq.config import QuantSpec, Recipe, RotationSpec
from mlx_dupq.dup.specs import DupPlan
from mlx_dupq.errors import DupqError
from mlx_dupq.export import gguf as export_mod
from mlx_dupq.export.blocks import best_exact, exact_blocks
from mlx_dupq.export.gguf import export_gguf
from mlx_dupq.export.verify import llama_cpp_logits, open_llama
from mlx_dupq.io import pack as packio
from mlx_dupq.io.gguf import hf_name, unpermute_qk
from mlx_dupq.quant.bitpack import unpack
from mlx_dupq.quant.qtensor import QTensor, dequantize
from mlx_dupq.quant.rtn import rtn_quantize
from tests.test_cli import assert_one_line_error, run
from tests.tiny import TOKENS, logits, rel_err

T = gguf.GGMLQuantizationType


def _np(qt: QTensor):
    return np.array(qt.codes), np.array(qt.scales.astype(mx.float32)), np.array(qt.offsets())


def _gguf_dequant(blocks: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, T[qtype])


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 64, True), (4, 128, False), (2, 32, False),
                                                  (3, 64, False)])
def test_q4_1_holds_our_2_to_4_bit_grids_bit_exactly(bits, group, symmetric):
    w = mx.random.normal((48, 256), key=mx.random.key(bits + group)) * 0.05
    qt = rtn_quantize(w, QuantSpec(bits=bits, group_size=group, symmetric=symmetric), dtype=mx.float16)
    blocks = exact_blocks(*_np(qt), bits, "Q4_1")
    assert blocks is not None and blocks.shape == (48, 256 // 32 * 20)
    assert np.array_equal(_gguf_dequant(blocks, "Q4_1"), np.array(dequantize(qt)))
    # symmetric grids put zero between two levels: no offset-free type holds them
    if symmetric:
        assert exact_blocks(*_np(qt), bits, "Q4_0") is None


def test_q4_0_and_q8_0_hold_grids_with_an_integer_zero_point():
    rng = np.random.default_rng(0)
    s = (rng.integers(1, 64, (16, 4)) / 4096).astype(np.float16)  # 6 significant bits: k * s is an fp16 number
    for bits, qtype, k in ((4, "Q4_0", 8), (4, "Q4_0", 5), (8, "Q8_0", 128), (8, "Q8_0", 100)):
        hi = min(15, 7 + k) if qtype == "Q4_0" else min(255, 127 + k)  # codes whose q - k fit the type
        codes = rng.integers(0, hi + 1, (16, 128)).astype(np.uint8)
        qt = QTensor(codes=mx.array(codes), scales=mx.array(s), biases=mx.array((-k * s.astype(np.float32)).astype(np.float16)),
                     spec=QuantSpec(bits=bits, group_size=32))
        blocks = exact_blocks(*_np(qt), bits, qtype)
        assert blocks is not None, (qtype, k)
        assert np.array_equal(_gguf_dequant(blocks, qtype), np.array(dequantize(qt)))
    # an offset that is not an integer number of steps, or codes out of range: not that type
    assert exact_blocks(codes, s.astype(np.float32), -127.5 * s.astype(np.float32), 8, "Q8_0") is None
    assert exact_blocks(np.full((16, 128), 255), s.astype(np.float32), 0 * s.astype(np.float32), 8, "Q8_0") is None
    # scales that are not fp16 numbers: nothing is exact
    s32 = np.full((16, 4), 0.1 + 1e-7, np.float32)
    assert best_exact(np.zeros((16, 128), np.uint8), s32, -8 * s32, 4) is None


@pytest.fixture(scope="module")
def packs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for mt in ("llama", "qwen2"):
        p = root / f"{mt}-w4g32"
        mlx_dupq.convert(tiny_dirs[mt], p, bits=4, group_size=32)
        out[mt] = p
    return out


@pytest.mark.parametrize("mt", ["llama", "qwen2"])
def test_pack_to_gguf_is_bit_exact(packs, mt, tmp_path):
    pack = packs[mt]
    res = export_gguf(pack, tmp_path / "m.gguf")
    assert res.exact and {t.type for t in res.tensors if t.source.startswith("4-bit")} == {"Q4_1"}
    cfg = packio.read_config(pack)
    weights = packio.load_weights(pack)
    entries = cfg["mlx_dupq"]["modules"]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.get_field("general.architecture").contents() == mt
    seen = 0
    for t in reader.tensors:
        hf = hf_name(t.name)
        module = hf.rsplit(".", 1)[0]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if mt == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            got = unpermute_qk(got, cfg["num_attention_heads"] if ".q_proj." in hf else cfg["num_key_value_heads"])
        if module in entries and hf.endswith(".weight"):
            arrays = {n: weights[f"{module}.{n}"] for n in ("weight", "scales", "biases") if f"{module}.{n}" in weights}
            want = np.array(dequantize(unpack(arrays, entries[module])))
        else:
            want = np.array(weights[hf].astype(mx.float32))
        assert np.array_equal(got, want), t.name
        seen += 1
    assert seen == len(res.tensors)
    # and mlx-dupq's own GGUF import runs the same model: identical logits
    m, _ = mlx_dupq.load(pack)
    g, _ = mlx_dupq.load(tmp_path / "m.gguf")
    assert rel_err(logits(g), logits(m)) < 1e-6


def test_tokenizer_goes_with_the_model(packs, tmp_path):
    export_gguf(packs["qwen2"], tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert r.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert len(r.get_field("tokenizer.ggml.tokens").contents()) == 320
    assert r.get_field("tokenizer.ggml.merges") is not None
    _, tok = mlx_dupq.load(packs["qwen2"])
    _, gtok = mlx_dupq.load(tmp_path / "m.gguf")
    text = "the quick brown fox, hello world 123"
    assert gtok.encode(text) == tok.encode(text)


@pytest.mark.parametrize("pre,name", [
    (pre_tokenizers.ByteLevel(add_prefix_space=False), "gpt-2"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False)]), "smollm"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(export_mod._QWEN2_REGEX), "isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "qwen2"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(export_mod._LLAMA3_REGEX), "isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "llama-bpe"),
    (pre_tokenizers.Whitespace(), None),
])
def test_pre_tokenizer_names(pre, name):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tj = json.loads(tok.to_str())
    if name is None:
        with pytest.raises(DupqError, match="not one mlx-dupq can name"):
            export_mod.tokenizer_pre(tj)
    else:
        assert export_mod.tokenizer_pre(tj) == name


def test_requantize_and_fallback_are_lossy_and_say_so(packs, tmp_path):
    res = export_gguf(packs["llama"], tmp_path / "q8.gguf", requantize="q8_0")
    quantized = [t for t in res.tensors if t.source[0].isdigit()]
    assert quantized and all(t.type == "Q8_0" and not t.exact for t in quantized)
    m, _ = mlx_dupq.load(packs["llama"])
    g, _ = mlx_dupq.load(tmp_path / "q8.gguf")
    assert 0 < rel_err(logits(g), logits(m)) < 0.02
    # the 8-bit embedding / lm_head have no exact quantized type: F32 by default, Q8_0 on request
    exact = export_gguf(packs["llama"], tmp_path / "x.gguf")
    eight = [t for t in exact.tensors if t.source.startswith("8-bit")]
    assert eight and all(t.type == "F32" and t.exact for t in eight)
    small = export_gguf(packs["llama"], tmp_path / "s.gguf", fallback="Q8_0")
    assert {t.type for t in small.tensors if t.source.startswith("8-bit")} == {"Q8_0"}
    assert small.bits_per_weight < exact.bits_per_weight and not small.exact
    # a k-quant on rows that do not split into 256-weight blocks: llama-quantize's fallback type
    k = export_gguf(packs["llama"], tmp_path / "k.gguf", requantize="Q4_K")
    assert {t.type for t in k.tensors if t.source[0].isdigit()} == {"Q5_0"}


def test_refusals_in_one_line(tiny_dirs, packs, tmp_path):
    rot = tmp_path / "rot"
    mlx_dupq.convert(tiny_dirs["qwen2"], rot, Recipe(name="r", default=QuantSpec(bits=4, group_size=32),
                                                     rotation=RotationSpec(online_down=True)))
    dup = tmp_path / "dup"
    mlx_dupq.convert(tiny_dirs["qwen2"], dup, Recipe(name="d", default=QuantSpec(bits=2, group_size=32),
                                                     duplication=DupPlan(mode="residual", copies={1: 2})))
    cases = [
        (rot, {}, "rotation at run time"),
        (dup, {}, "duplicated copies"),
        (tiny_dirs["qwen2"], {}, "not an mlx-dupq pack"),
        (packs["qwen2"], {"requantize": "Q3"}, "not a type mlx-dupq writes"),
    ]
    for src, kw, msg in cases:
        with pytest.raises(DupqError, match=msg) as e:
            export_gguf(src, tmp_path / "x.gguf", **kw)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()
    export_gguf(packs["qwen2"], tmp_path / "y.gguf")
    with pytest.raises(DupqError, match="pass --force"):
        export_gguf(packs["qwen2"], tmp_path / "y.gguf")


def test_folded_rotation_exports_exactly(tiny_dirs, tmp_path):
    pack = tmp_path / "folded"
    mlx_dupq.convert(tiny_dirs["llama"], pack, Recipe(name="f", default=QuantSpec(bits=4, group_size=32),
                                                      rotation=RotationSpec(head=True)))
    res = export_gguf(pack, tmp_path / "f.gguf")
    assert res.exact
    m, _ = mlx_dupq.load(pack)
    g, _ = mlx_dupq.load(tmp_path / "f.gguf")
    assert rel_err(logits(g), logits(m)) < 1e-6


def test_a_failed_write_leaves_no_file(packs, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise DupqError("simulated failure")

    monkeypatch.setattr(export_mod, "add_tokenizer", boom)
    with pytest.raises(DupqError, match="simulated"):
        export_gguf(packs["qwen2"], tmp_path / "z.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mt", ["llama", "qwen2"])
def test_llama_cpp_runs_the_export_with_the_packs_logits(packs, mt, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    path = tmp_path / "m.gguf"
    export_gguf(packs[mt], path)
    tokens = [int(t) for t in np.array(TOKENS[0])]
    got = llama_cpp_logits(path, tokens)
    m, _ = mlx_dupq.load(packs[mt])
    want = np.array(logits(m)[0])
    # llama.cpp rounds the activations to 8 bits (Q8_1) for Q4_1 matmuls: close, not bitwise
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 0.02, err
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    # and llama.cpp reads text into the same token ids as the pack's tokenizer
    _, tok = mlx_dupq.load(packs[mt])
    llm = open_llama(path, 64)
    text = "the quick brown fox, hello world 123!"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    llm.close()


def test_cli_export_says_what_it_wrote_and_refuses_in_one_line(packs, tiny_dirs, tmp_path, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "export", packs["qwen2"], "--gguf", tmp_path / "m.gguf",
                         "--json", tmp_path / "m.json")
    assert code == 0, err
    assert "exact" in out and "Q4_1" in out and "no GGUF quantized type holds token_embd.weight" in out
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["exact"] and rec["command"].startswith("mlx-dupq export")
    code, out, err = run(monkeypatch, capsys, "export", packs["qwen2"], "--gguf", tmp_path / "m.gguf")
    assert_one_line_error(code, err, "pass --force", exit_code=2)
    code, out, err = run(monkeypatch, capsys, "export", tiny_dirs["qwen2"], "--gguf", tmp_path / "n.gguf")
    assert_one_line_error(code, err, "not an mlx-dupq pack")
