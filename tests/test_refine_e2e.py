"""End-to-end distillation (mlx_dupq.refine.e2e) on tiny random models: gradients, KL, resume,
options, data parallel."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dupq.io.manifest import verify_pack
from mlx_dupq.testing import mlx_launch
from mlx.utils import tree_flatten, tree_unflatten

import mlx_dupq
from mlx_dupq.specs import QuantizerSpec, QuantSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.io.loader import load
from mlx_dupq.layers.cpu import use_dense_prefill
from mlx_dupq.layers.quant_linear import DupqLinear, build_module, quantize_tensor
from mlx_dupq.refine.e2e import distill_pack, kl_loss, mark_trainable, median_scale
from mlx_dupq.refine.e2e_spec import E2ESpec

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "e2e_dp_worker.py"
TEXT = ("the quick brown fox jumps over the lazy dog. hello world, this is a tiny test corpus. " * 30
        + "numbers 1 2 3 and more words here, said the cat to the dog.\n") * 6


def small_spec(data, **kw) -> E2ESpec:
    d = dict(steps=12, lr=1e-4, samples=16, valid_samples=4, seq_len=32, batch=4, top_k=64, eval_every=4,
             patience=0, data=str(data))
    d.update(kw)
    return E2ESpec(**d)


@pytest.fixture(scope="module")
def e2e_env(tiny_dirs, tmp_path_factory):
    """(float model dir, 2-bit mlx-format pack, per-channel dupq-format pack, calibration text file)."""
    root = tmp_path_factory.mktemp("e2e")
    text = root / "calib.txt"
    text.write_text(TEXT)
    src = tiny_dirs["qwen2"]
    mlx_dupq.convert(src, root / "w2", bits=2, group_size=32)
    mlx_dupq.convert(src, root / "w2ch", bits=2, group_size="channel", symmetric=True)
    return src, root / "w2", root / "w2ch", text


def _arrays(pack: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(pack.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


# --------------------------------------------------------------------------- options


def test_spec_round_trip_and_recipe_table():
    s = E2ESpec(steps=5, lr=3e-5, trainable="norms,scales")
    assert s.trainable == ("scales", "norms")
    assert E2ESpec.from_dict(s.to_dict()) == s
    assert E2ESpec.from_recipe({"refine": {"e2e": {"steps": 7}}}).steps == 7
    assert E2ESpec.from_recipe({"name": "x"}) is None


@pytest.mark.parametrize("kw, words", [
    (dict(steps=-1), "steps must be >= 0"),
    (dict(lr=0), "lr must be > 0"),
    (dict(lr=-1e-3), "lr must be > 0"),
    (dict(trainable="scales,weights"), "unknown trainable"),
    (dict(data="brown:eval"), "evaluation split"),
    (dict(samples=2, batch=4), "samples >= batch"),
    (dict(relative=True, lr_per_scale=True), "exclude each other"),
    (dict(lr_per_scale=True, trainable="biases"), "needs scales among trainable"),
    (dict(schedule="linear"), "schedule 'linear' is unknown"),
])
def test_bad_options_one_line(kw, words):
    with pytest.raises(DupqError) as e:
        E2ESpec(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DupqError, match="unknown e2e option"):
        E2ESpec.from_dict({"stepz": 3})


def test_refuses_float_model_and_non_pack(e2e_env, tmp_path):
    src, _, _, text = e2e_env
    out = tmp_path / "out"
    with pytest.raises(DupqError) as e:
        distill_pack(src, src, small_spec(text), out=out)
    assert "not an mlx-dupq pack" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DupqError, match="not a model directory"):
        distill_pack(tmp_path, src, small_spec(text), out=out)
    assert not out.exists() and not (tmp_path / "out.e2e-work").exists()


def test_cli_refine_errors_are_one_line(e2e_env, tmp_path, monkeypatch, capsys):
    from tests.test_cli import assert_one_line_error, run

    src, pack, _, text = e2e_env
    out = tmp_path / "out"
    base = ["refine", pack, "--teacher", src, "-o", out, "--data", text]
    for args, needle in ((["--steps", "-1"], "steps must be >= 0"), (["--lr", "0"], "lr must be > 0"),
                         (["--trainable", "codes"], "unknown trainable")):
        code, _, err = run(monkeypatch, capsys, *base, *args)
        assert_one_line_error(code, err, needle, exit_code=2)
    code, _, err = run(monkeypatch, capsys, "refine", src, "--teacher", src, "-o", out, "--data", text)
    assert_one_line_error(code, err, "not an mlx-dupq pack")
    assert not out.exists() and not (tmp_path / "out.e2e-work").exists()
    code, o, err = run(monkeypatch, capsys, *base, "--steps", "2", "--seq-len", "32", "--batch", "4")
    assert code == 0 and "validation KL" in o and (out / "config.json").exists(), err
    opts = json.loads((out / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]["options"]
    from mlx_dupq.auto import E2E_DEFAULTS  # refine's defaults are convert --bpw's e2e stage

    assert opts["relative"] is True and opts["lr"] == E2E_DEFAULTS["lr"]
    assert (opts["samples"], opts["chat_samples"]) == (6, 2)  # 2 x 4 windows, a third of them chat turns
    out2 = tmp_path / "out2"
    code, o, err = run(monkeypatch, capsys, "refine", pack, "--teacher", src, "-o", out2, "--data", text, "--steps",
                       "1", "--seq-len", "32", "--lr", "1e-5", "--absolute")
    opts = json.loads((out2 / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]["options"]
    assert code == 0 and opts["relative"] is False and opts["lr"] == 1e-5 and opts["samples"] == 1, err


# --------------------------------------------------------------------------- gradients


def _fd_check(module: nn.Module, x: mx.array, names=("scales", "biases"), eps=1e-3, n=6):
    """d sum(y * r) / d param at a few entries vs central finite differences."""
    r = mx.random.normal((x.shape[0], module(x).shape[-1]), key=mx.random.key(1))
    params = dict(tree_flatten(module.trainable_parameters()))
    assert params and all(k.split(".")[-1] in names for k in params)

    def f(p):
        module.update(tree_unflatten(list(p.items())))
        return (module(x) * r).sum()

    grads = mx.grad(f)(params)
    rng = np.random.default_rng(0)
    for k, v in params.items():
        g = np.array(grads[k])
        for flat in rng.choice(v.size, size=min(n, v.size), replace=False):
            idx = np.unravel_index(flat, v.shape)
            base = np.array(v)
            up, dn = base.copy(), base.copy()
            up[idx] += eps
            dn[idx] -= eps
            fu = f({**params, k: mx.array(up)}).item()
            fd = f({**params, k: mx.array(dn)}).item()
            num = (fu - fd) / (2 * eps)
            assert abs(num - g[idx]) <= 2e-2 * max(1.0, abs(num)), (k, idx, num, g[idx])
    module.update(tree_unflatten(list(params.items())))


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


@pytest.mark.parametrize("spec", [QuantSpec(bits=2, group_size=256), QuantSpec(bits=2, group_size=0, symmetric=True),
                                  QuantSpec(bits=3, group_size=64)])
@pytest.mark.parametrize("rows", [4, 32])  # the packed kernel (decode) and the CPU dense path
def test_scale_bias_gradients_match_finite_differences(spec, rows):
    w = mx.random.normal((48, 512), key=mx.random.key(0)) * 0.05
    arrays, entry = quantize_tensor(w, spec, dtype=mx.float32)
    layer = build_module("linear", (48, 512), entry)
    layer.load_weights(list(arrays.items()))
    holder = _Holder(layer)
    if entry["format"] == "mlx":
        use_dense_prefill(holder)
    else:
        assert isinstance(layer, DupqLinear)
    trained = mark_trainable(holder, ("scales", "biases"))
    assert trained == ["layer.scales"] if spec.symmetric else sorted(trained) == ["layer.biases", "layer.scales"]
    x = mx.random.normal((rows, 512), key=mx.random.key(2))
    _fd_check(holder, x)


def test_norms_trainable_and_unknown_packed_layer_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.codes = mx.zeros((4, 4), dtype=mx.uint32)

    class M(nn.Module):
        def __init__(self, odd):
            super().__init__()
            self.norm = nn.RMSNorm(8)
            self.lin = nn.QuantizedLinear(64, 8, group_size=32, bits=2)
            if odd:
                self.odd = Odd()

    assert sorted(mark_trainable(M(False), ("scales", "norms"))) == ["lin.scales", "norm.weight"]
    with pytest.raises(DupqError) as e:
        mark_trainable(M(True), ("scales",))
    assert "unknown layer kind" in str(e.value) and "\n" not in str(e.value)


def test_kl_loss_top_k_plus_rest_bucket():
    """All tokens kept: the full KL. A few kept: still sees student mass outside the teacher's top-k."""
    V = 50
    t = mx.random.normal((2, 3, V), key=mx.random.key(0)) * 3
    s = mx.random.normal((2, 3, V), key=mx.random.key(1)) * 3
    x = mx.zeros((2, 3), dtype=mx.int32)
    for T in (1.0, 2.0):
        lp, lq = nn.log_softmax(t / T, axis=-1), nn.log_softmax(s / T, axis=-1)
        full = (mx.exp(lp) * (lp - lq)).sum(-1).mean().item()
        idx = mx.broadcast_to(mx.arange(V), (2, 3, V))
        assert kl_loss(lambda _: s, x, lp, idx, T).item() == pytest.approx(full, rel=1e-4)
    # a student that moves mass off the teacher's top-4 (keeping their ratios) is penalised
    idx = mx.argsort(t, axis=-1)[..., -4:]
    lp = mx.take_along_axis(nn.log_softmax(t, axis=-1), idx, axis=-1)
    same = kl_loss(lambda _: t, x, lp, idx, 1.0).item()
    moved = t + 5.0 - mx.put_along_axis(mx.zeros_like(t), idx, mx.array(5.0), axis=-1)
    assert same == pytest.approx(0.0, abs=1e-5) and kl_loss(lambda _: moved, x, lp, idx, 1.0).item() > 0.1


# --------------------------------------------------------------------------- the stage


def _teacher_kl(pack: Path, src: Path, text: str) -> float:
    """Full-vocabulary KL(teacher || pack) on a fixed slice of the text (independent of the stage)."""
    t, tok = load(src)
    s, _ = load(pack)
    ids = mx.array(tok.encode(text)[:256]).reshape(4, 64)
    lp = nn.log_softmax(t(ids).astype(mx.float32), axis=-1)
    lq = nn.log_softmax(s(ids).astype(mx.float32), axis=-1)
    return float((mx.exp(lp) * (lp - lq)).sum(-1).mean().item())


@pytest.mark.parametrize("which", ["w2", "w2ch"])
def test_distill_lowers_kl_keeps_codes_and_records(e2e_env, tmp_path, which):
    src, w2, w2ch, text = e2e_env
    pack = w2 if which == "w2" else w2ch
    out = tmp_path / "refined"
    spec = small_spec(text, steps=20, lr=1e-4 if which == "w2" else 3e-4, trainable="scales,biases,norms")
    res = distill_pack(pack, src, spec, out=out)
    assert res.kept == "trained" and res.valid_kl_after < 0.8 * res.valid_kl_before
    assert _teacher_kl(out, src, TEXT) < _teacher_kl(pack, src, TEXT)
    a, b = _arrays(pack), _arrays(out)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    for k in a:
        if k.endswith(".weight") and a[k].dtype in (mx.uint32, mx.uint8):
            assert mx.array_equal(a[k], b[k]), k  # codes never move
    assert any(not mx.array_equal(a[k], b[k]) for k in a if k.endswith(".scales"))
    meta = json.loads((out / "config.json").read_text())["mlx_dupq"]
    rec = meta["refine"]["e2e"]
    assert rec["options"] == spec.to_dict() and rec["valid_kl_after"] == pytest.approx(res.valid_kl_after)
    assert meta["stored_bytes"] == json.loads((pack / "config.json").read_text())["mlx_dupq"]["stored_bytes"]
    assert not (tmp_path / "refined.e2e-work").exists() and not (tmp_path / "refined.tmp").exists()
    verify_pack(out)  # the manifest is rewritten for the refined shards


def test_teacher_released_before_training(e2e_env, tmp_path):
    """Once the targets are built only they are used: a teacher handed over (as convert does) is
    freed before the first step, and the refined pack is the one a teacher kept alive gives."""
    from mlx_dupq.io.loader import float_model
    from mlx_dupq.io.source import open_source

    src, pack, _, text = e2e_env
    spec = small_spec(text, steps=4, eval_every=2)
    seen, ref = [], {}

    def handed_over(m):
        ref["t"] = weakref.ref(m)
        return m

    def progress(phase, done, total, info):
        if phase == "train":
            seen.append(ref["t"]() is None)

    distill_pack(pack, handed_over(float_model(open_source(src))), spec, out=tmp_path / "a", progress=progress)
    assert seen and all(seen)
    kept = float_model(open_source(src))
    distill_pack(pack, kept, spec, out=tmp_path / "b")
    a, b = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_kept_targets_do_not_hold_the_teacher_logits():
    """The top-k indices kept per window are copies, not views of the (chunk, L, vocab) argpartition."""
    from mlx_dupq.refine.teacher import Targets, build_targets

    vocab, n, seq, k = 8192, 8, 32, 8
    windows = np.arange(n * (seq + 1)).reshape(n, seq + 1) % 100

    def teacher(x):
        return mx.random.normal((*x.shape, vocab), key=mx.random.key(int(x[0, 0].item())))

    t = Targets(None, "train", keep=True)
    mx.clear_cache()
    before = mx.get_active_memory()
    build_targets(teacher, [(t, windows, list(range(n)), 1.0)], k, 4)
    grown = mx.get_active_memory() - before
    assert grown < 64 * n * seq * k  # the targets (6 bytes an entry), not 2 x (4, 32, 8192) uint32 (2 MiB)
    vals, idx = t.get(windows[:2])
    assert vals.shape == idx.shape == (2, seq, k)


# --------------------------------------------------------------------------- the teacher, streamed


def _teacher_windows(src: Path, spec: E2ESpec) -> tuple[np.ndarray, np.ndarray]:
    from mlx_dupq.eval.data import tokenize
    from mlx_dupq.io.loader import tokenizer_of
    from mlx_dupq.io.source import open_source
    from mlx_dupq.refine.e2e import calibration_windows

    s = open_source(src)
    return calibration_windows(tokenize(tokenizer_of(s.tokenizer_dir(), s.config), TEXT), spec)


@pytest.mark.parametrize("family", ["qwen2", "llama", "deepseek"])  # tied; untied; MoE with per-expert tensors
def test_streamed_teacher_gives_the_loaded_teachers_targets(e2e_env, tiny_dirs, family):
    """The source streamed one layer at a time gives the whole float model's logits (log-probs within
    1e-5, the same top-k) and targets, both splits at their temperatures; progress comes per layer."""
    from mlx_dupq.io.loader import float_model
    from mlx_dupq.io.source import open_source
    from mlx_dupq.refine.teacher import Targets, build_targets, teacher_logits

    src = e2e_env[0] if family == "qwen2" else tiny_dirs[family]
    spec = small_spec(e2e_env[3], samples=6, valid_samples=3)
    train_w, valid_w = _teacher_windows(src, spec)
    batches = [train_w[j : j + 4, :-1] for j in range(0, len(train_w), 4)]
    whole, streamed, seen = {}, {}, []
    teacher_logits(float_model(open_source(src)), batches, whole.__setitem__)
    teacher_logits(open_source(src), batches, streamed.__setitem__, lambda *a: seen.append(a))
    n_layers = open_source(src).config["num_hidden_layers"]
    assert [(p, d, t) for p, d, t, _ in seen] == [("targets", i, n_layers + 1) for i in range(1, n_layers + 2)]
    assert all(info == {"windows": len(train_w), "unit": "layers and head"} for *_, info in seen)
    k = spec.top_k
    for j in whole:
        lw, ls = nn.log_softmax(whole[j], axis=-1), nn.log_softmax(streamed[j], axis=-1)
        assert ls.shape == lw.shape == (*batches[j].shape, open_source(src).config["vocab_size"])
        assert mx.abs(ls - lw).max().item() <= 1e-5
        top = [mx.sort(mx.argpartition(x, kth=-k, axis=-1)[..., -k:], axis=-1) for x in (lw, ls)]
        assert mx.array_equal(*top).item()

    def targets(teacher):
        t, v = Targets(None, "train", keep=True), Targets(None, "valid", keep=True)
        build_targets(teacher, [(t, train_w, list(range(len(train_w))), 2.0), (v, valid_w, [0, 2], 1.0)], k, 4)
        return t, v

    for a, b in zip(targets(float_model(open_source(src))), targets(open_source(src))):
        assert sorted(a.mem) == sorted(b.mem) and a.mem
        for i in a.mem:
            (va, ia), (vb, ib) = a.mem[i], b.mem[i]
            order_a, order_b = mx.argsort(ia, axis=-1), mx.argsort(ib, axis=-1)
            assert mx.array_equal(mx.take_along_axis(ia, order_a, -1), mx.take_along_axis(ib, order_b, -1)).item()
            assert mx.allclose(mx.take_along_axis(va, order_a, -1).astype(mx.float32),
                               mx.take_along_axis(vb, order_b, -1).astype(mx.float32), rtol=1e-3, atol=1e-4).item()


def test_streamed_teacher_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """MLX's allocated bytes while each decoder layer runs: one float layer (plus the hidden states),
    never two; the pass's peak stays under 3 layers where the whole model's is 8 layers."""
    import gc

    from mlx_dupq.io.loader import float_model
    from mlx_dupq.io.source import open_source
    from mlx_dupq.refine import teacher as T
    from mlx_dupq.testing import make_hf_dir

    src = make_hf_dir(tmp_path / "m", "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=1024)
    m = float_model(open_source(src))
    layer = sum(v.nbytes for _, v in tree_flatten(m.model.layers[0].parameters()))
    del m
    batches = [np.random.default_rng(0).integers(0, 320, (4, 32)).astype(np.int32) for _ in range(2)]
    held, real = [], T.run_layer

    def watched(layer_module, h, batch):
        held.append(mx.get_active_memory() - base)
        return real(layer_module, h, batch)

    def peak(teacher) -> int:  # MLX's peak bytes while the teacher is opened (or loaded) and run
        nonlocal base
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        T.teacher_logits(teacher(), batches, lambda j, x: mx.eval(x))
        return mx.get_peak_memory() - base

    base = 0
    monkeypatch.setattr(T, "run_layer", watched)
    streamed = peak(lambda: open_source(src))
    assert len(held) == 8 and max(held) < 1.3 * layer, (held, layer)
    whole = peak(lambda: float_model(open_source(src)))
    assert streamed < 3 * layer < whole, (streamed, layer, whole)


def test_streamed_teacher_refuses_sliding_window_layers(tmp_path):
    from mlx_dupq.io.source import open_source
    from mlx_dupq.refine.teacher import teacher_logits
    from mlx_dupq.testing import make_hf_dir

    src = make_hf_dir(tmp_path / "m", "llama", layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    with pytest.raises(DupqError, match="sliding-window layers") as e:
        teacher_logits(open_source(src), [np.zeros((1, 16), dtype=np.int32)], lambda j, x: None)
    assert "\n" not in str(e.value)


def test_cached_targets_read_no_layer(e2e_env, tmp_path):
    """A run whose targets are all in its work directory reads no tensor of the source."""
    from mlx_dupq.io.source import open_source

    src, pack, _, text = e2e_env
    out = tmp_path / "p"

    def die(phase, done, total, info):
        if phase == "train":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_pack(pack, src, small_spec(text), out=out, progress=die)
    teacher, reads, phases = open_source(src), [], []
    real_get = teacher.get
    teacher.get = lambda key: reads.append(key) or real_get(key)
    distill_pack(pack, teacher, small_spec(text, steps=2), out=out, progress=lambda p, *a: phases.append(p))
    assert reads == [] and "targets" not in phases and "train" in phases


def test_convert_e2e_streams_rotated_and_moe_sources(tiny_dirs, e2e_env, tmp_path, monkeypatch):
    """convert's e2e stage streams its teacher (progress per layer) for a source with online
    rotations (the teacher is the un-rotated float source) and a MoE one, and distills."""
    import mlx_dupq.refine.e2e as e2e_mod
    from mlx_dupq.io.base import Source
    from mlx_dupq.io.source import open_source
    from mlx_dupq.specs import RotationSpec

    teachers, real = [], e2e_mod.build_targets
    monkeypatch.setattr(e2e_mod, "build_targets", lambda teacher, *a: teachers.append(teacher) or real(teacher, *a))
    text = e2e_env[3]
    sources = (("rot", e2e_env[0], RotationSpec(online_down=True)), ("moe", tiny_dirs["deepseek"], None))
    for name, src, rotation in sources:
        rec = dataclasses.replace(_e2e_recipe(text, steps=4, eval_every=2), rotation=rotation)
        seen = []
        mlx_dupq.convert(src, tmp_path / name, rec, progress=lambda m, d, t: seen.append(m))
        assert isinstance(teachers[-1], Source) and teachers[-1].fingerprint() == open_source(src).fingerprint()
        e2e = json.loads((tmp_path / name / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
        assert e2e["steps_run"] == 4 and e2e["valid_kl_after"] <= e2e["valid_kl_before"], (name, e2e)
        assert any("teacher targets of" in m and "layers and head" in m for m in seen), seen


def test_relative_units_train_the_same_parameters(e2e_env, tmp_path):
    """relative=True: Adam moves scales / biases in units of the group's initial |scale|; the
    stored layout and the codes are unchanged, the record says so, and KL falls."""
    src, pack, _, text = e2e_env
    out = tmp_path / "rel"
    spec = small_spec(text, steps=20, lr=1e-2, relative=True, trainable="scales,biases,norms")
    res = distill_pack(pack, src, spec, out=out)
    assert res.kept == "trained" and res.valid_kl_after < 0.8 * res.valid_kl_before
    a, b = _arrays(pack), _arrays(out)
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    assert all(mx.array_equal(a[k], b[k]) for k in a if a[k].dtype == mx.uint32)
    # relative steps: each scale moved by at most ~steps x lr of its own magnitude
    for k in a:
        if k.endswith(".scales"):
            s0, s1 = a[k].astype(mx.float32), b[k].astype(mx.float32)
            assert (mx.abs(s1 - s0) <= 20 * 1e-2 * mx.abs(s0) * 1.05 + 1e-3).all().item(), k
    assert json.loads((out / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]["options"]["relative"] is True


def test_lr_per_scale_steps_in_units_of_the_median_scale(e2e_env, tmp_path):
    """lr_per_scale: Adam's lr is spec.lr x the median |scale| of the trained scales (recorded), so
    a scale moves at most about steps x that lr; the same spec in absolute units moves further."""
    src, pack, _, text = e2e_env
    a = _arrays(pack)
    med = float(np.median(np.concatenate([np.abs(np.array(v.astype(mx.float32))).ravel()
                                          for k, v in a.items() if k.endswith(".scales")])))
    assert median_scale({k: v for k, v in a.items() if k.endswith(".scales")}) == pytest.approx(med)
    out = tmp_path / "per_scale"
    res = distill_pack(pack, src, small_spec(text, steps=6, lr=2e-3, lr_per_scale=True, eval_every=3), out=out)
    assert res.lr == pytest.approx(2e-3 * med, rel=1e-6) and res.lr < 2e-3
    rec = json.loads((out / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
    assert rec["options"]["lr_per_scale"] is True and rec["lr"] == pytest.approx(res.lr)
    assert res.kept == "trained" and res.valid_kl_after < res.valid_kl_before, (med, res.history)
    b = _arrays(out)
    moved = max(float(mx.abs(b[k].astype(mx.float32) - a[k].astype(mx.float32)).max()) for k in a
                if k.endswith(".scales"))
    assert 0 < moved <= 6 * res.lr * 1.1 + 1e-3  # Adam's step is at most ~lr per step (+ fp16 rounding)
    with pytest.raises(DupqError, match="needs trained scales"):
        median_scale({"model.norm.weight": mx.ones((4,))})


def test_never_worse_than_start(e2e_env, tmp_path):
    src, pack, _, text = e2e_env
    out = tmp_path / "refined"
    res = distill_pack(pack, src, small_spec(text, steps=4, lr=10.0, eval_every=2), out=out)
    assert res.kept == "initial" and res.valid_kl_after == res.valid_kl_before
    a, b = _arrays(pack), _arrays(out)
    assert all(mx.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_gives_identical_pack(e2e_env, tmp_path, schedule):
    """Also with the cosine schedule: the resumed run continues its learning rate from the saved step."""
    src, pack, _, text = e2e_env
    spec = small_spec(text, steps=12, eval_every=4, schedule=schedule)
    full = distill_pack(pack, src, spec, out=tmp_path / "full")

    def die(phase, done, total, info):
        if phase == "train" and done == 7:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        distill_pack(pack, src, spec, out=out, progress=die)
    assert not out.exists() and json.loads((tmp_path / "resumed.e2e-work" / "state.json").read_text())["step"] == 4
    res = distill_pack(pack, src, spec, out=out, resume=True)
    assert res.history == full.history
    a, b = _arrays(tmp_path / "full"), _arrays(out)
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(DupqError, match="another pack, teacher, data or options"):
        (tmp_path / "other.e2e-work").mkdir()
        shutil.copy(tmp_path / "full" / "config.json", tmp_path / "other.e2e-work" / "x")
        state = {"fingerprint": "0" * 16, "step": 1}
        (tmp_path / "other.e2e-work" / "state.json").write_text(json.dumps(state))
        distill_pack(pack, src, spec, out=tmp_path / "other", resume=True)


def test_resume_after_a_stop_between_checkpoint_and_state(e2e_env, tmp_path, monkeypatch):
    """A run stopped after the checkpoint of step 8 was written but before state.json was: state.json
    still says step 4, the checkpoint holds its own state, and the resumed pack is the full run's."""
    import mlx_dupq.refine.e2e as e2e_mod

    src, pack, _, text = e2e_env
    spec = small_spec(text, steps=12, eval_every=4)
    full = distill_pack(pack, src, spec, out=tmp_path / "full")
    real, calls = e2e_mod.packio.write_json_atomic, []

    def stop_at_second_state(path, data):
        if Path(path).name == e2e_mod.STATE_FILE:
            calls.append(data["step"])
            if data["step"] == 8:
                raise KeyboardInterrupt
        return real(path, data)

    out = tmp_path / "resumed"
    monkeypatch.setattr(e2e_mod.packio, "write_json_atomic", stop_at_second_state)
    with pytest.raises(KeyboardInterrupt):
        distill_pack(pack, src, spec, out=out)
    monkeypatch.setattr(e2e_mod.packio, "write_json_atomic", real)
    assert json.loads((tmp_path / "resumed.e2e-work" / "state.json").read_text())["step"] == 4
    res = distill_pack(pack, src, spec, out=out, resume=True)
    assert res.history == full.history
    a, b = _arrays(tmp_path / "full"), _arrays(out)
    assert all(mx.array_equal(a[k], b[k]) for k in a)


def test_training_holds_few_copies_of_the_trained_arrays(e2e_env, tmp_path):
    """After each step the trained arrays are held in float32 as what Adam moves, its m and v and the
    student's own values, no more: not the start, nor the best so far (in the checkpoint), nor the
    gradients, nor a bias unit apart from its scales'. Measured as the MLX memory a run that trains the
    biases too holds above one that trains the scales only, per float32 bias (relative units; 7 to
    7.5 when the start, the best, a unit per bias and the gradients were held, ~3.1 now)."""
    src, pack, _, text = e2e_env
    n_bias = sum(v.size for k, v in _arrays(pack).items() if k.endswith(".biases"))
    active = {}
    for trainable in ("scales", "scales,biases"):
        seen = active.setdefault(trainable, [])

        def progress(phase, done, total, info, seen=seen):
            if phase == "train":
                seen.append(mx.get_active_memory())

        spec = small_spec(text, steps=6, eval_every=2, lr=1e-2, relative=True, trainable=trainable)
        res = distill_pack(pack, src, spec, out=tmp_path / trainable, progress=progress)
        assert res.best_step == 6 and len(seen) == 6  # (the best moved away from the start at every check)
    copies = [(b - s) / (4 * n_bias) for s, b in zip(active["scales"], active["scales,biases"])]
    assert max(copies) <= 4, copies


# --------------------------------------------------------------------------- data parallel


def _two_ranks(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python3 ARGV`` as 2 ranks under ``mlx.launch`` (ring backend, localhost)."""
    if shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not on PATH (it ships with mlx)")
    try:
        return mlx_launch(2, [sys.executable, *argv], timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except RuntimeError:
        pytest.skip("no free consecutive ports on localhost")


def test_two_ranks_equal_one_process(e2e_env, tmp_path):
    if shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not on PATH (it ships with mlx)")
    src, pack, _, text = e2e_env
    spec = small_spec(text, steps=8, eval_every=4, batch=4)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    one = distill_pack(pack, src, spec, out=tmp_path / "one")
    r = _two_ranks(str(WORKER), str(pack), str(src), str(tmp_path / "spec.json"), str(tmp_path / "two"))
    # (mlx.launch may exit 0 when a rank failed: the pack is the evidence)
    assert r.returncode == 0 and (tmp_path / "two" / "config.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
    assert two["processes"] == 2
    assert two["valid_kl_after"] == pytest.approx(one.valid_kl_after, rel=1e-4)
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    for k in a:
        assert np.allclose(np.array(a[k].astype(mx.float32)), np.array(b[k].astype(mx.float32)), rtol=1e-3, atol=1e-5), k


def test_two_machines_resume_to_the_identical_pack(e2e_env, tmp_path):
    """Two ranks as if on two machines (the same work path, different file systems): rank 1 never sees
    rank 0's work directory, so it keeps its targets in its own ``e2e-work.rank1`` (never the stale
    ones another run left where rank 0's would be), and a run stopped at step 7 and resumed gets
    rank 0's checkpoint (parameters, Adam's state, history) on both ranks: the pack and history of
    the uninterrupted two-machine run, bit for bit."""
    from mlx_dupq.refine.e2e import TARGETS_FILE

    src, pack, _, text = e2e_env
    spec = small_spec(text, steps=12, eval_every=4, batch=4)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))

    def launch(out: str, machines: str, *extra: str) -> subprocess.CompletedProcess:
        return _two_ranks(str(WORKER), str(pack), str(src), str(tmp_path / "spec.json"), str(tmp_path / out),
                          str(tmp_path / machines), *extra)

    full = launch("full", "m-full")
    assert (tmp_path / "full" / "config.json").exists(), full.stdout[-3000:] + full.stderr[-3000:]
    # another run's targets where rank 1 would find them if it took rank 0's directory for its own
    stale = tmp_path / "m-res" / "machine1" / "e2e-work"
    stale.mkdir(parents=True)
    (stale / TARGETS_FILE).write_text(json.dumps({"fingerprint": "0" * 16}))
    junk = {"logits": mx.zeros((spec.seq_len, spec.top_k), mx.float16),
            "indices": mx.zeros((spec.seq_len, spec.top_k), mx.uint32)}
    for i in range(spec.samples):
        mx.save_safetensors(str(stale / f"train-{i:06d}.safetensors"), junk)
    launch("resumed", "m-res", "7")
    state = json.loads((tmp_path / "m-res" / "machine0" / "e2e-work" / "state.json").read_text())
    assert state["step"] == 4 and not (tmp_path / "resumed").exists()
    assert not (tmp_path / "m-res" / "machine1" / "e2e-work" / "state.json").exists()
    r = launch("resumed", "m-res", "0", "resume")
    assert (tmp_path / "resumed" / "config.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    rec = {k: json.loads((tmp_path / k / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
           for k in ("full", "resumed")}
    assert rec["resumed"]["history"] == rec["full"]["history"] and rec["full"]["processes"] == 2
    a, b = _arrays(tmp_path / "full"), _arrays(tmp_path / "resumed")
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "m-res" / "machine1" / "e2e-work.rank1").exists()  # rank 1 cleaned up its own


BEST_WORKER = """
import sys
from pathlib import Path
import mlx.core as mx
from mlx_dupq.refine.e2e import _checkpoint_best
g = mx.distributed.init()
root = Path(sys.argv[1])
params = {"a.scales": mx.zeros((3, 5)), "b.biases": mx.zeros((7,))}
best = _checkpoint_best(root / f"work{g.rank()}", params, g)
mx.save_safetensors(str(root / f"best{g.rank()}.safetensors"), best)
"""


def test_best_reaches_the_ranks_without_the_checkpoint(tmp_path):
    """Only rank 0 writes the checkpoint that holds the best parameters; at the end every rank needs
    them and the others may run on other machines (their own work directory, no checkpoint): rank 0
    sends them, bit for bit (-0.0 and NaN included)."""
    from mlx_dupq.refine.e2e import CKPT_FILE

    (tmp_path / "work0").mkdir()
    (tmp_path / "work1").mkdir()
    want = {"a.scales": mx.random.normal((3, 5), key=mx.random.key(0)),
            "b.biases": mx.array([-0.0, 0.0, float("nan"), 1e-42, -3.5, float("inf"), 2.0])}
    arrays = {f"b:{k}": v for k, v in want.items()} | {f"p:{k}": v + 1 for k, v in want.items()}
    mx.save_safetensors(str(tmp_path / "work0" / CKPT_FILE), arrays)
    r = _two_ranks("-c", BEST_WORKER, str(tmp_path), timeout=120)
    for rank in (0, 1):
        f = tmp_path / f"best{rank}.safetensors"
        assert r.returncode == 0 and f.exists(), r.stdout[-3000:] + r.stderr[-3000:]
        got = mx.load(str(f))
        assert all(mx.array_equal(got[k].view(mx.uint32), v.view(mx.uint32)).item() for k, v in want.items()), rank


# --------------------------------------------------------------------------- as a convert stage


def _e2e_recipe(text, **e2e):
    from mlx_dupq.config import Recipe
    from mlx_dupq.refine.spec import RefineSpec

    opts = dict(steps=12, lr=1e-4, samples=16, valid_samples=4, seq_len=32, batch=4, top_k=64, eval_every=4,
                patience=0, trainable=["scales", "biases", "norms"], data=str(text))
    opts.update(e2e)
    return Recipe(name="e2e", default=QuantSpec(bits=2, group_size=32), refine=RefineSpec(e2e=opts))


def test_convert_with_e2e_lowers_kl_and_records(e2e_env, tmp_path):
    src, _, _, text = e2e_env
    rec = _e2e_recipe(text, steps=20)
    plain = tmp_path / "plain"  # the same conversion without the stage
    mlx_dupq.convert(src, plain, dataclasses.replace(rec, refine=None))
    out = tmp_path / "p"
    seen = []
    res = mlx_dupq.convert(src, out, rec, progress=lambda m, d, t: seen.append(m))
    meta = json.loads((out / "config.json").read_text())["mlx_dupq"]
    rec = meta["refine"]["e2e"]
    assert rec["kept"] == "trained" and rec["valid_kl_after"] < 0.8 * rec["valid_kl_before"]
    assert rec["options"]["steps"] == 20 and rec["teacher"] == str(src)
    assert meta["recipe"]["refine"]["e2e"]["steps"] == 20
    assert _teacher_kl(out, src, TEXT) < _teacher_kl(plain, src, TEXT)
    assert res.bits_per_weight == json.loads((plain / "config.json").read_text())["mlx_dupq"]["bits_per_weight"]
    assert any("ETA" in m for m in seen) and any("validation KL" in m and "->" in m for m in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "plain"]  # no work, tmp or partial directory left
    assert not (out / "e2e-work").exists()
    verify_pack(out)


def test_convert_gptq_with_e2e_only(e2e_env, tmp_path):
    """A calibrated quantizer with [refine.e2e] and no [refine.block]: every layer has calibration
    states, and the block stage must not run on them (it crashed on the missing block options)."""
    src, _, _, text = e2e_env
    rec = dataclasses.replace(_e2e_recipe(text, steps=4, eval_every=2),
                              quantizer=QuantizerSpec(method="gptq", calib_data=str(text), calib_samples=4,
                                                      calib_seq_len=32))
    mlx_dupq.convert(src, tmp_path / "p", rec)
    meta = json.loads((tmp_path / "p" / "config.json").read_text())["mlx_dupq"]
    assert meta["refine"]["e2e"]["steps_run"] == 4 and "block" not in meta["refine"]
    assert meta["recipe"]["quantizer"]["method"] == "gptq"


def test_convert_e2e_resume_continues_the_stage(e2e_env, tmp_path, monkeypatch):
    src, _, _, text = e2e_env
    rec = _e2e_recipe(text, steps=8)
    mlx_dupq.convert(src, tmp_path / "fresh", rec)
    import mlx_dupq.refine.e2e as e2e_mod

    real = e2e_mod.distill_pack

    def interrupted(*a, **kw):
        outer = kw["progress"]

        def die(phase, done, total, info):
            outer(phase, done, total, info)
            if phase == "train" and done == 6:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "progress": die})

    monkeypatch.setattr(e2e_mod, "distill_pack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mlx_dupq.convert(src, tmp_path / "p", rec)
    work = tmp_path / "p.partial" / "e2e-work"
    assert json.loads((work / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(e2e_mod, "distill_pack", real)
    mlx_dupq.convert(src, tmp_path / "p", rec, resume=True)
    a, b = _arrays(tmp_path / "fresh"), _arrays(tmp_path / "p")
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.mark.parametrize("bad, words", [
    (dict(steps=-1), "steps must be >= 0"),
    (dict(lr=0), "lr must be > 0"),
    (dict(trainable=["codes"]), "unknown trainable"),
    (dict(stepz=3), "unknown e2e option"),
])
def test_convert_bad_e2e_options_fail_in_one_line_before_writing(e2e_env, tmp_path, bad, words):
    src, _, _, text = e2e_env
    with pytest.raises(DupqError) as e:
        mlx_dupq.convert(src, tmp_path / "p", _e2e_recipe(text, **bad))
    assert words in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_restart_with_other_lr_reuses_the_interrupted_runs_targets(e2e_env, tmp_path):
    """A run stopped (e.g. its loss diverged) and started over with another lr / steps keeps the
    teacher targets in its work directory; the pack equals a run that computed them itself."""
    src, pack, _, text = e2e_env

    def die(phase, done, total, info):
        if phase == "train" and done == 2:
            raise KeyboardInterrupt

    def computed(run) -> int:  # teacher windows a run computed (what its targets progress says)
        seen = {}

        def progress(phase, done, total, info):
            if phase == "targets":
                seen["windows"] = info["windows"]
        run(progress)
        return seen.get("windows", 0)

    out, work = tmp_path / "p", tmp_path / "p.e2e-work"
    with pytest.raises(KeyboardInterrupt):
        distill_pack(pack, src, small_spec(text, lr=1e-2), out=out, progress=die)
    kept = {f.name: f.stat().st_mtime_ns for f in work.glob("*-*.safetensors")}
    assert kept and (work / "state.json").exists()
    spec = small_spec(text, lr=1e-4, steps=8, samples=12)
    results = {}
    n_reused = computed(lambda p: results.setdefault("reused", distill_pack(pack, src, spec, out=out, progress=p)))
    n_fresh = computed(lambda p: results.setdefault("fresh", distill_pack(pack, src, spec, out=tmp_path / "f",
                                                                         progress=p)))
    assert n_fresh >= 12 and n_reused < n_fresh - 8  # most windows were the interrupted run's
    assert results["reused"].history == results["fresh"].history
    a, b = _arrays(out), _arrays(tmp_path / "f")
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    # targets made another way (top_k) are not reused
    with pytest.raises(KeyboardInterrupt):
        distill_pack(pack, src, small_spec(text), out=tmp_path / "q", progress=die)
    n_other = computed(lambda p: distill_pack(pack, src, small_spec(text, top_k=32, steps=2), out=tmp_path / "q",
                                              progress=p))
    assert n_other >= 16


# --------------------------------------------------------------------------- unpacked codes (speed)


def _loss_and_grads(model, x, fn):
    params = {k: v.astype(mx.float32) for k, v in tree_flatten(model.trainable_parameters())}

    def f(p):
        model.update(tree_unflatten(list(p.items())))
        return fn(model, x)

    loss, grads = mx.value_and_grad(f)(params)
    mx.eval(loss, grads)
    return loss, grads


def _same_with_unpacked_codes(model, x, fn):
    from mlx_dupq.refine.train_codes import CODES, unpack_codes

    plain = _loss_and_grads(model, x, fn)
    restore = unpack_codes(model)
    assert any(hasattr(m, CODES) for _, m in model.named_modules())
    fast = _loss_and_grads(model, x, fn)
    restore()
    assert not any(hasattr(m, CODES) for _, m in model.named_modules())
    again = _loss_and_grads(model, x, fn)
    for name, other in (("fast", fast), ("again", again)):  # bit for bit: same weights, loss, gradients
        assert mx.array_equal(plain[0], other[0]), (name, plain[0], other[0])
        assert plain[1].keys() == other[1].keys()
        assert all(mx.array_equal(plain[1][k], other[1][k]) for k in plain[1]), plain[1].keys()


@pytest.mark.parametrize("which", ["w2", "w2ch"])
def test_unpacked_codes_give_the_same_loss_and_gradients(e2e_env, which):
    """The training fast path (codes unpacked once, ``codes * s + b``) against the plain dense path
    (``mx.dequantize`` of the packed codes) on a tiny pack: identical loss and gradients."""
    src, w2, w2ch, text = e2e_env
    model, tok = load(w2 if which == "w2" else w2ch)
    mark_trainable(model, ("scales", "biases", "norms"))
    ids = mx.array(tok.encode(TEXT)[:65])[None]
    t_logp = nn.log_softmax(mx.random.normal((1, 64, model.args.vocab_size), key=mx.random.key(3)), axis=-1)
    t_idx = mx.argpartition(t_logp, kth=-16, axis=-1)[..., -16:]
    t_logp = mx.take_along_axis(t_logp, t_idx, axis=-1)
    _same_with_unpacked_codes(model, ids[:, :-1], lambda m, x: kl_loss(m, x, t_logp, t_idx, 1.0))


@pytest.mark.parametrize("bits, group", [(1.58, 128), (2, 256), (3, 64)])
def test_unpacked_codes_dupq_layers_and_tied_head(bits, group):
    """DupqLinear (ternary re-encoded to 2-bit kernel codes, grouped wider than the kernel) and a
    DupqEmbedding's lookup + tied head: same loss and gradients; training the scales keeps the
    kernel codes (a ternary layer is not re-encoded every step)."""
    spec = QuantSpec(bits=bits, group_size=group, symmetric=bits == 1.58)
    arrays, entry = quantize_tensor(mx.random.normal((48, 512), key=mx.random.key(0)) * 0.05, spec, dtype=mx.float32)
    lin = build_module("linear", (48, 512), entry)
    lin.load_weights(list(arrays.items()))
    e_arrays, e_entry = quantize_tensor(mx.random.normal((40, 512), key=mx.random.key(5)), spec, dtype=mx.float32)
    emb = build_module("embedding", (40, 512), e_entry)
    emb.load_weights(list(e_arrays.items()))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.emb = lin, emb

        def __call__(self, ids):
            h = self.emb(ids)
            return self.emb.as_linear(h + self.lin(h).sum(-1, keepdims=True))

    m = M()
    use_dense_prefill(m)  # mlx-format layers as the loader gives them
    mark_trainable(m, ("scales", "biases"))
    ids = mx.array(np.random.default_rng(0).integers(0, 40, (2, 24)).astype(np.int32))
    r = mx.random.normal((2, 24, 40), key=mx.random.key(7))
    _same_with_unpacked_codes(m, ids, lambda mod, x: (mod(x) * r).sum())
    if entry["format"] == "dupq":
        codes = lin._kernel().weight
        lin.update({"scales": lin["scales"] * 1.5})
        k = lin._kernel()
        assert k.weight is codes
        assert mx.array_equal(k.scales, mx.repeat(lin["scales"], group // k.group_size, axis=-1))


def test_quantized_teacher_is_loaded_whole(e2e_env, tmp_path):
    """A pack as the teacher (e.g. an 8-bit pack distilling a 2-bit one): no float source reads it, so
    it is loaded whole, as before the streamed teacher; the stage runs and records it."""
    src, pack, _, text = e2e_env
    teacher = tmp_path / "w8"
    mlx_dupq.convert(src, teacher, bits=8, group_size=32)
    res = distill_pack(pack, teacher, small_spec(text, steps=2, eval_every=2), out=tmp_path / "out")
    rec = json.loads((tmp_path / "out" / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
    assert rec["teacher"] == str(teacher) and res.steps_run == 2
def test_cosine_schedule_decays_to_zero(e2e_env, tmp_path, monkeypatch):
    """schedule = "cosine": Adam's learning rate follows lr * (1 + cos(pi * t / steps)) / 2 (the lr at
    the first step, ~0 at the last); "constant" keeps lr."""
    import mlx.optimizers as optim

    src, pack, _, text = e2e_env
    seen = {}
    real = optim.Adam.apply_gradients

    def spy(self, gradients, parameters):  # the rate this step used is the state's after the update
        out = real(self, gradients, parameters)
        seen.setdefault(id(self), []).append(float(self.learning_rate))
        return out

    monkeypatch.setattr(optim.Adam, "apply_gradients", spy)
    lrs = {}
    for schedule in ("constant", "cosine"):
        seen.clear()
        distill_pack(pack, src, small_spec(text, steps=8, eval_every=4, lr=1e-3, schedule=schedule),
                     out=tmp_path / schedule)
        (used,) = seen.values()
        lrs[schedule] = used
    assert lrs["constant"] == pytest.approx([1e-3] * 8)
    want = [1e-3 * (1 + np.cos(np.pi * t / 8)) / 2 for t in range(8)]
    assert lrs["cosine"] == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_routers_train_and_nothing_else_moves(e2e_env, tiny_dirs, tmp_path):
    """``trainable = routers`` on a MoE pack: only the float routers (``mlp.gate.weight``) change, the
    validation KL does not rise, the refined pack loads; on a dense pack there is nothing to train
    (one line, no output)."""
    src, w2, _, text = e2e_env
    moe = tmp_path / "moe"
    mlx_dupq.convert(tiny_dirs["deepseek"], moe, bits=2, group_size=32)
    out = tmp_path / "routers"
    res = distill_pack(moe, tiny_dirs["deepseek"], small_spec(text, lr=1e-3, trainable="routers"), out=out)
    assert res.n_trainable > 0 and res.valid_kl_after <= res.valid_kl_before
    a, b = _arrays(moe), _arrays(out)
    changed = sorted(k for k in a if not mx.array_equal(a[k], b[k]))
    assert changed and all(k.endswith(".mlp.gate.weight") for k in changed), changed
    model, _ = mlx_dupq.load(out)
    assert mx.isfinite(model(mx.array([[1, 2, 3, 4]]))).all().item()
    with pytest.raises(DupqError) as e:
        distill_pack(w2, src, small_spec(text, trainable="routers"), out=tmp_path / "dense")
    assert "nothing to train" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "dense").exists()
