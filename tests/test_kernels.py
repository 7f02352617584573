"""Kernels: reference twins, the GPU bodies run by the CPU harness, dispatch and its self-check."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_dupq.config import TERNARY, QuantSpec, Recipe
from mlx_dupq.errors import DupqError
from mlx_dupq.kernels import dispatch, ops
from mlx_dupq.kernels import reference as R
from mlx_dupq.kernels.cpu_harness import HarnessUnavailable, gqmv_cpu, load_harness
from mlx_dupq.kernels.layout import kernel_pack, split_stacked
from mlx_dupq.layers.quant_linear import quantize_tensor

BITS = (1, TERNARY, 2, 3, 4)
GROUPS = (32, 64, 128, 256, 512, 0, -1)


@pytest.fixture(scope="module")
def harness():
    try:
        return load_harness()
    except HarnessUnavailable as e:
        pytest.skip(f"CPU kernel harness unavailable: {e}")


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    yield
    dispatch.set_backend(None)


def layer(spec: QuantSpec, out: int = 11, n: int = 512, dtype=mx.float16):
    return quantize_tensor(mx.random.normal((out, n)), spec.fit(n), dtype)


def close(a, b, tol=2e-3):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    assert a.shape == b.shape
    err = float(mx.max(mx.abs(a - b)))
    assert err <= tol * max(1.0, float(mx.max(mx.abs(b)))), err


def one(m):
    return mx.zeros((m, 1), mx.int32), mx.ones((m, 1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", (False, True))
def test_qmv_every_format(harness, bits, group, sym):
    arrays, entry = layer(QuantSpec(bits, group, sym))
    kp = kernel_pack([(arrays, entry)])
    x = mx.random.normal((3, 512))
    want = R.qmv_ref(x, arrays, entry)
    idx, coef = one(3)
    close(gqmv_cpu(x, kp, idx, coef, True)[:, 0], want)
    close(R.gqmv_reference(x, kp, idx, coef, True)[:, 0], want)


@pytest.mark.parametrize("tg,rows,stage", [(1, 1, True), (8, 8, False), (8, 2, True), (64, 2, True), (128, 4, False),
                                           (96, 3, True), (128, 32, False)])
def test_launch_shapes(harness, tg, rows, stage):
    """Thread count, rows per group (O not a multiple) and x staging do not change the result."""
    arrays, entry = layer(QuantSpec(3, 64), out=13, n=256)
    kp = kernel_pack([(arrays, entry)])
    x = mx.random.normal((2, 256))
    got = gqmv_cpu(x, kp, *one(2), True, rows=rows, tg=tg, stage_x=stage)[:, 0]
    close(got, R.qmv_ref(x, arrays, entry))


@pytest.mark.parametrize("n,block", [(256, 256), (256, 32), (512, 128), (512, 2)])
@pytest.mark.parametrize("bits", (2, TERNARY))
def test_hadamard_qmv(harness, n, block, bits):
    arrays, entry = layer(QuantSpec(bits, 64), n=n)
    kp = kernel_pack([(arrays, entry)])
    x = mx.random.normal((2, n))
    signs = mx.where(mx.random.uniform(shape=(n,)) < 0.5, -1.0, 1.0)
    want = R.hadamard_qmv_ref(x, signs, block, arrays, entry)
    close(gqmv_cpu(x, kp, *one(2), True, signs, block)[:, 0], want)
    close(ops.hadamard_qmv(x, kp, signs, block), want)


def test_hadamard_reference_matches_rotation():
    """rotate_ref is the project's randomized block-Hadamard rotation (signs, then blocks)."""
    from mlx_dupq.rotation.rotations import block_hadamard_rotation

    rot = block_hadamard_rotation(384, seed=3, block=128)
    x = mx.random.normal((2, 384))
    close(R.rotate_ref(x, rot.signs, rot.block), rot.apply(x), 1e-5)


@pytest.mark.parametrize("mode", R.MODES)
def test_multi_copy(harness, mode):
    copies = [layer(QuantSpec(2, 64)), layer(QuantSpec(TERNARY, 128, True)), layer(QuantSpec(3, 0))]
    kp = kernel_pack(copies)
    x = mx.random.normal((2, 512))
    want = R.multi_copy_ref(x, copies, mode)
    k = len(copies)
    idx = mx.broadcast_to(mx.arange(k, dtype=mx.int32), (2, k))
    coef = mx.full((2, k), 1.0 / k if mode == "mean" else 1.0)
    close(gqmv_cpu(x, kp, idx, coef, True)[:, 0], want)
    close(ops.multi_copy_qmv(x, kp, mode), want)


def test_gather_per_expert_bits(harness):
    experts = [layer(QuantSpec(b, g)) for b, g in ((2, 64), (3, 128), (TERNARY, 256), (1, 32))]
    kp = kernel_pack(experts)
    x = mx.random.normal((3, 512))
    idx = mx.array([[0, 2], [3, 1], [2, 2]], dtype=mx.int32)
    want = R.gather_qmv_ref(x, experts, idx)
    close(gqmv_cpu(x, kp, idx, mx.ones(idx.shape), False), want)
    close(ops.gather_qmv(x, kp, idx), want)


def test_split_stacked_switch_pack(harness):
    arrays, entry = quantize_tensor(mx.random.normal((4, 9, 256)), QuantSpec(TERNARY, 64))
    experts = split_stacked(arrays, entry)
    kp = kernel_pack(experts)
    x = mx.random.normal((2, 256))
    idx = mx.array([[1, 3], [0, 1]], dtype=mx.int32)
    close(gqmv_cpu(x, kp, idx, mx.ones(idx.shape), False), R.gather_qmv_ref(x, experts, idx))


def test_kernel_pack_errors():
    a, e = layer(QuantSpec(2, 64))
    b, f = layer(QuantSpec(2, 64), out=5)
    with pytest.raises(DupqError, match="share one shape"):
        kernel_pack([(a, e), (b, f)])
    c, g = quantize_tensor(mx.random.normal((4, 40)), QuantSpec(2, 0))
    with pytest.raises(DupqError, match="multiple of 32"):
        kernel_pack([(c, g)])


def test_qmv_op_shapes():
    arrays, entry = layer(QuantSpec(2, 64))
    kp = kernel_pack([(arrays, entry)])
    x = mx.random.normal((2, 3, 512))
    close(ops.qmv(x, kp), R.qmv_ref(x, arrays, entry))
    with pytest.raises(DupqError, match="512"):
        ops.qmv(mx.zeros((1, 64)), kp)


# ---- dispatch -------------------------------------------------------------------------------

def test_probe_and_env(monkeypatch):
    assert dispatch.probe()[-1] == "reference"
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert dispatch.choose() == "reference"
    monkeypatch.setenv(dispatch.ENV, "vulkan")
    with pytest.raises(DupqError, match="not a kernel backend"):
        dispatch.choose()
    missing = [b for b in ("metal", "cuda") if b not in dispatch.probe()]
    if missing:
        monkeypatch.setenv(dispatch.ENV, missing[0])
        with pytest.raises(DupqError, match="offers only"):
            dispatch.choose()
    monkeypatch.delenv(dispatch.ENV)
    assert dispatch.choose() == dispatch.probe()[0]


def test_env_forces_the_harness(harness, monkeypatch):
    """MLX_DUPQ_KERNELS=harness: the GPU body on the CPU, behind the self-check, used by the layers."""
    monkeypatch.setenv(dispatch.ENV, "harness")
    dispatch.set_backend(None)
    b = dispatch.backend()
    assert isinstance(b, dispatch.CheckedBackend) and b.name == "harness" and dispatch.custom_active()
    lin = packed_linear(QuantSpec(TERNARY, 64))
    x = mx.random.normal((1, 256))
    got = lin(x)
    assert b.verdicts and all(b.verdicts.values())
    close(got, x @ lin.dequantized().T)


class FakeGpu:
    """A GPU backend stand-in: correct, wrong by a constant, or raising."""

    def __init__(self, behaviour: str):
        self.name, self.behaviour, self.calls = "fake", behaviour, 0

    def gqmv(self, x, kp, idx, coef, summed, signs=None, had=0):
        self.calls += 1
        if self.behaviour == "raise":
            raise RuntimeError("no device")
        y = R.gqmv_reference(x, kp, idx, coef, summed, signs, had)
        return (y + 1.0 if self.behaviour == "wrong" else y).astype(x.dtype)


@pytest.mark.parametrize("behaviour", ("good", "wrong", "raise"))
def test_self_check_fallback(behaviour):
    fake = FakeGpu(behaviour)
    checked = dispatch.CheckedBackend(fake)
    dispatch.set_backend(checked)
    arrays, entry = layer(QuantSpec(2, 64))
    kp = kernel_pack([(arrays, entry)])
    x = mx.random.normal((1, 512))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = ops.qmv(x, kp)
        y2 = ops.qmv(x, kp)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    close(y1, R.qmv_ref(x, arrays, entry))  # right answer whichever backend ran
    close(y2, y1, 1e-6)
    if behaviour == "good":
        assert not msgs and fake.calls == 3  # one self-check + two real calls
    else:
        assert len(msgs) == 1 and "self-check" in msgs[0]  # warned once, then remembered
        assert fake.calls == 1
    assert list(checked.verdicts.values()) == [behaviour == "good"]


class WrongForTernary(FakeGpu):
    """Right for every expert but ternary ones (a bug confined to one format)."""

    def gqmv(self, x, kp, idx, coef, summed, signs=None, had=0):
        self.calls += 1
        y = R.gqmv_reference(x, kp, idx, coef, summed, signs, had)
        bad = any(kp.specs[int(e)].ternary for e in idx.reshape(-1).tolist())
        return (y + 1.0 if bad else y).astype(x.dtype)


def test_self_check_reaches_every_format_with_the_calls_shape():
    """A one-token, one-slot gather over four 2-bit experts and a ternary one: the check runs launches
    of that same shape (1 row, 1 slot) until every format was used, so the ternary bug is caught."""
    fake = WrongForTernary("good")
    checked = dispatch.CheckedBackend(fake)
    dispatch.set_backend(checked)
    experts = [layer(QuantSpec(2, 64))] * 4 + [layer(QuantSpec(TERNARY, 128))]
    kp = kernel_pack(experts)
    x = mx.random.normal((1, 512))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.gather_qmv(x, kp, mx.array([[0]], dtype=mx.int32))
    assert any("self-check" in str(w.message) for w in caught)
    assert fake.calls == 2  # expert 0, then the ternary expert 4: same 1 x 1 launch shape
    close(y[:, 0], R.qmv_ref(x, *experts[0]))
    (key,) = checked.verdicts
    assert key[1:5] == (11, 512, 1, 1)  # the real pack's shape and the call's rows / slots


def test_self_check_per_configuration():
    fake = FakeGpu("good")
    checked = dispatch.CheckedBackend(fake)
    dispatch.set_backend(checked)
    experts = [layer(QuantSpec(2, 64)), layer(QuantSpec(TERNARY, 128))]
    kp = kernel_pack(experts)
    x = mx.random.normal((2, 512))
    ops.multi_copy_qmv(x, kp)
    ops.gather_qmv(x, kp, mx.array([[0], [1]], dtype=mx.int32))
    ops.multi_copy_qmv(x, kp)
    assert len(checked.verdicts) == 2


def test_gpu_kernel_objects_build():
    """Building the kernel object needs no GPU (calling it does); skip if this mlx cannot."""
    from mlx_dupq.kernels.gpu import GpuBackend, kernel_source

    header, body = kernel_source("metal")
    assert "thread_position_in_threadgroup" in body and "DQ_BARRIER" in header
    for kind in ("metal", "cuda"):
        try:
            GpuBackend(kind).kernel()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"mx.fast.{kind}_kernel cannot build here: {e}")


def test_bench_fails_in_one_line_without_cuda():
    if dispatch.probe()[0] == "cuda":
        pytest.skip("this machine has CUDA")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "bench/kernel_bandwidth.py"), "--out", os.devnull],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "CUDA" in res.stderr


# ---- layers: dispatch inside DupqLinear / DupLinear / RotatedInput ---------------------------
# The harness backend runs the GPU body exactly as a GPU backend launches it (same launch plan),
# so "layer output through the kernels == the layer's mlx path" is checked here without a GPU.

@pytest.fixture(params=["harness", *[k for k in dispatch.probe() if k in ("metal", "cuda")]])
def kbackend(request):
    """A fresh kernel backend factory: the CPU harness always, and every GPU backend this mlx
    offers (so on a GPU machine these layer tests run the real kernels too)."""
    if request.param == "harness":
        try:
            load_harness()
        except HarnessUnavailable as e:
            pytest.skip(f"CPU kernel harness unavailable: {e}")
        from mlx_dupq.kernels.cpu_harness import HarnessBackend

        return HarnessBackend
    from mlx_dupq.kernels.gpu import GpuBackend

    return lambda: GpuBackend(request.param)


def both(fn, kbackend):
    """fn() on the reference backend (the layers' mlx path) and on a kernel backend (launches of
    the second call counted: the first one also runs the self-checks)."""
    dispatch.set_backend("reference")
    want = fn()
    inner = kbackend()
    checked = dispatch.CheckedBackend(inner)
    dispatch.set_backend(checked)
    mx.eval(fn())  # first use: the self-checks launch too
    inner.launches = 0
    got = fn()
    mx.eval(want, got)
    assert all(checked.verdicts.values())
    return want, got, inner.launches


def packed_linear(spec: QuantSpec, out: int = 24, n: int = 256, bias: bool = False):
    from mlx_dupq.layers.quant_linear import build_module

    arrays, entry = quantize_tensor(mx.random.normal((out, n)), spec.fit(n))
    m = build_module("linear", (out, n), entry, bias=bias)
    items = list(arrays.items()) + ([("bias", mx.random.normal((out,)))] if bias else [])
    m.load_weights(items)
    return m


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", (32, 128, 256, 0, -1))
@pytest.mark.parametrize("sym", (False, True))
def test_dupq_linear_routes_decode(kbackend, bits, group, sym):
    from mlx_dupq.layers.quant_linear import DupqLinear

    lin = packed_linear(QuantSpec(bits, group, sym), bias=True)
    x = mx.random.normal((1, 3, 256))
    want, got, launches = both(lambda: lin(x), kbackend)
    close(got, want)
    assert (launches > 0) == isinstance(lin, DupqLinear)  # mlx formats keep mlx's own kernel


def test_prefill_and_reference_keep_the_mlx_path(kbackend):
    from mlx_dupq.kernels.route import DECODE_MAX_ROWS

    lin = packed_linear(QuantSpec(TERNARY, 64))
    want, got, launches = both(lambda: lin(mx.random.normal((DECODE_MAX_ROWS + 1, 256))), kbackend)
    assert launches == 0
    dispatch.set_backend("reference")
    assert not dispatch.custom_active()


@pytest.mark.parametrize("mode,mix", [("parallel", None), ("residual", None), ("parallel", "scalar"),
                                      ("parallel", "channel")])
def test_dup_linear_one_pass(kbackend, mode, mix):
    from mlx_dupq.layers.dup_linear import DupLinear

    copies = [packed_linear(QuantSpec(2, 64)), packed_linear(QuantSpec(TERNARY, 128)),
              packed_linear(QuantSpec(3, 0, True))]
    weights = {None: None, "scalar": mx.array([0.5, 0.3, 0.2]), "channel": mx.random.uniform(shape=(3, 24))}[mix]
    dup = DupLinear(copies, mode, weights, bias=mx.random.normal((24,)))
    x = mx.random.normal((2, 256))
    want, got, launches = both(lambda: dup(x), kbackend)
    close(got, want)
    if mix == "channel":  # (K, out) mixes do not fit one pass: the copies run one by one
        assert launches == 2  # the two dupq-format copies, each through qmv
    else:
        assert launches == 1  # every copy in one launch, x read once


@pytest.mark.parametrize("kind", ("block", "randomized", "plain", "block12"))
@pytest.mark.parametrize("bits", (2, TERNARY))
def test_rotated_input_fused(kbackend, kind, bits):
    from mlx_dupq.layers.online_rotation import RotatedInput
    from mlx_dupq.rotation import rotations as rots

    n = 768 if kind == "block12" else 256
    rot = {"block": lambda: rots.block_hadamard_rotation(n, seed=1, block=64),
           "randomized": lambda: rots.randomized_hadamard(n, seed=2),
           "plain": lambda: rots.hadamard(n),
           "block12": lambda: rots.block_hadamard_rotation(n, seed=3, block=384)}[kind]()  # 12 x 32: not 2^k
    layer = RotatedInput(packed_linear(QuantSpec(bits, 64), n=n, bias=True), rot)
    x = mx.random.normal((1, 2, n))
    want, got, launches = both(lambda: layer(x), kbackend)
    close(got, want)
    assert launches == 1


@pytest.mark.parametrize("recipe", ("ternary-dup-rot", "3bit-channel-parallel"))
def test_tiny_model_unchanged_through_kernels(kbackend, tiny_dirs, tmp_path, recipe):
    """A whole tiny model: logits of a 6-token input through the kernels == the mlx path."""
    import mlx_dupq
    from mlx_dupq.config import RotationSpec
    from mlx_dupq.dup.specs import DupPlan

    if recipe == "ternary-dup-rot":
        r = Recipe(name="k", default=QuantSpec(TERNARY, 64), rotation=RotationSpec(layers=(1,)),
                   duplication=DupPlan(mode="residual", copies={0: 2}))
        src = tiny_dirs["llama"]
    else:
        r = Recipe(name="k", default=QuantSpec(3, 0, True), duplication=DupPlan(mode="parallel", copies={0: 2}))
        src = tiny_dirs["qwen2"]
    mlx_dupq.convert(src, tmp_path / "p", r)
    model, _ = mlx_dupq.load(tmp_path / "p")
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert {"DupLinear", "DupqLinear"} <= kinds and (recipe != "ternary-dup-rot" or "RotatedInput" in kinds)
    tokens = mx.array([[1, 5, 9, 20, 33, 47]])
    want, got, launches = both(lambda: model(tokens), kbackend)
    assert launches > 0
    close(got, want, 1e-3)


def test_mixed_switch_per_expert_widths(kbackend):
    """The per-expert-width MoE layer's experts through gather_qmv == its own grouped gather_qmm."""
    from mlx_dupq.kernels import route
    from mlx_dupq.layers.moe_linear import MixedSwitchLinear, quantize_experts

    specs = [QuantSpec(2, 64), QuantSpec(TERNARY, 64), QuantSpec(3, 0, True), QuantSpec(2, 64), QuantSpec(4, 128)]
    arrays, entry = quantize_experts(mx.random.normal((5, 24, 256)), specs)
    layer = MixedSwitchLinear(256, 24, 5, entry)
    layer.load_weights(list(arrays.items()))
    indices = mx.array([[[0, 1], [2, 4], [3, 1]]], dtype=mx.int32)  # (1, 3 tokens, top-2)
    for x in (mx.random.normal((1, 3, 1, 1, 256)), mx.random.normal((1, 3, 2, 1, 256))):  # gate/up, down
        want, got, launches = both(lambda: route.switch(layer, route.mixed_groups(layer), x, indices)
                                   if dispatch.custom_active() else layer(x, indices), kbackend)
        assert got.shape == want.shape == (1, 3, 2, 1, 24) and launches == 1
        close(got, want)


def test_tiny_moe_model_unchanged_through_kernels(kbackend, tiny_dirs, tmp_path):
    """DeepSeek-style tiny model, ternary experts (DupqSwitchLinear): 4 tokens through the kernels."""
    import mlx_dupq

    mlx_dupq.convert(tiny_dirs["deepseek"], tmp_path / "p", Recipe(name="k", default=QuantSpec(TERNARY, 32)))
    model, _ = mlx_dupq.load(tmp_path / "p")
    assert "DupqSwitchLinear" in {type(m).__name__ for _, m in model.named_modules()}
    tokens = mx.array([[1, 5, 9, 20]])
    want, got, launches = both(lambda: model(tokens), kbackend)
    assert launches > 0
    close(got, want, 1e-3)


def test_layer_keeps_mlx_path_after_failed_self_check():
    """A GPU kernel that fails its self-check: one warning, then the layer's own mlx path runs."""
    lin = packed_linear(QuantSpec(TERNARY, 64))
    x = mx.random.normal((1, 256))
    dispatch.set_backend("reference")
    want = lin(x)
    fake = FakeGpu("wrong")
    fake.custom = True
    dispatch.set_backend(dispatch.CheckedBackend(fake))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [lin(x), lin(x)]
    assert sum("self-check" in str(w.message) for w in caught) == 1
    assert fake.calls == 1  # the self-check only
    for y in got:
        close(y, want, 1e-6)


def test_dup_copies_share_the_concatenated_codes(kbackend):
    """After the first one-pass call the copies' codes are views of the pack: held once, and the
    mlx path (prefill) still gives the same answer."""
    from mlx_dupq.kernels.route import DECODE_MAX_ROWS
    from mlx_dupq.layers.dup_linear import DupLinear

    copies = [packed_linear(QuantSpec(2, 64), out=512, n=2048) for _ in range(2)]
    dup = DupLinear(copies, "residual")
    x1, xp = mx.random.normal((1, 2048)), mx.random.normal((DECODE_MAX_ROWS + 4, 2048))
    dispatch.set_backend("reference")
    want1, wantp = dup(x1), dup(xp)
    mx.eval(want1, wantp, x1, xp)
    stored = sum(c.weight.nbytes + c.scales.nbytes + c.biases.nbytes for c in copies)
    mx.clear_cache()
    before = mx.get_active_memory()
    dispatch.set_backend(dispatch.CheckedBackend(kbackend()))
    got1 = dup(x1)  # builds the pack, re-points the copies at it, self-checks
    mx.eval(got1)
    close(got1, want1)
    del got1
    mx.clear_cache()
    assert mx.get_active_memory() - before < stored // 4  # the pack did not add a second copy
    dispatch.set_backend("reference")
    close(dup(xp), wantp)  # the mlx path on the shared codes
    kp = dup._kernel_pack[1]
    assert kp.w.size == sum(c.weight.size for c in copies)


def test_shared_codes_copies_stored_once(kbackend):
    """Copies that share one codes array (different scales) enter the pack once and still add up right."""
    from mlx_dupq.layers.dup_linear import DupLinear

    a = packed_linear(QuantSpec(2, 64))
    b = packed_linear(QuantSpec(2, 64))
    b.weight = a.weight  # shared codes, own scales and offsets
    dup = DupLinear([a, b], "parallel", mx.array([0.7, 0.3]))
    x = mx.random.normal((1, 256))
    want, got, launches = both(lambda: dup(x), kbackend)
    close(got, want)
    assert launches == 1 and dup._kernel_pack[1].w.size == a.weight.size


def test_launch_shape_with_lanes_not_a_power_of_two_is_refused(harness):
    """TG / ROWS lanes per row must be a power of two (the per-row tree reduction)."""
    arrays, entry = layer(QuantSpec(2, 64), out=8, n=256)
    kp = kernel_pack([(arrays, entry)])
    with pytest.raises(RuntimeError, match="bad launch parameters"):
        gqmv_cpu(mx.random.normal((1, 256)), kp, *one(1), True, rows=5, tg=8)


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 8, TERNARY))
def test_each_code_word_is_read_once(harness, bits):
    """Memory access pattern: a chunk's `bits` words are read once per (x row, slot), not per code.

    Binary widths read exactly out * (in/32) * bits words per slot; a ternary chunk (32 trits in
    <= 8 bytes) reads the 2 or 3 words those bytes lie in.
    """
    from mlx_dupq.kernels.cpu_harness import last_w_reads

    out, n = 8, 512
    arrays, entry = layer(QuantSpec(bits, 64), out=out, n=n)
    kp = kernel_pack([(arrays, entry)] * 2)
    x = mx.random.normal((2, n))
    idx = mx.array([[0, 1], [1, 0]], dtype=mx.int32)
    gqmv_cpu(x, kp, idx, mx.ones((2, 2)), True, rows=2, tg=16)
    reads = last_w_reads()
    chunks = 2 * 2 * out * (n // 32)  # x rows * slots * chunks
    if bits == TERNARY:
        assert 2 * chunks <= reads <= 3 * chunks
    else:
        assert reads == chunks * bits


def test_launch_plan():
    """x is staged when it fits; a batch too wide to stage runs in one launch reading x from memory
    (the weights are read once), and only a fused Hadamard splits the rows to fit shared memory."""
    from mlx_dupq.kernels.gpu import XS_MAX, plan

    assert plan(1, 896, 1, True) == gpu_plan(0, True, 1)
    assert plan(4, 4864, 1, True) == gpu_plan(0, False, 4)
    assert plan(4, 4864, 1, True, 128) == gpu_plan(128, True, XS_MAX // 4864)
    assert plan(4, 896, 1, True, 128) == gpu_plan(128, True, 4)
    assert plan(1, 8960, 1, True, 128) == gpu_plan(0, False, 1)  # too wide to fuse: mlx rotates first
    assert plan(1, 896, 1, True, 96) == gpu_plan(0, True, 1)  # not a power of two: mlx rotates first
    assert plan(8, 256, 8, False) == gpu_plan(0, True, 2)  # 16 partial sums per thread at most
    with pytest.raises(ValueError, match="slots per row"):
        plan(1, 256, 17, False)


def gpu_plan(had, stage, rows):
    from mlx_dupq.kernels.gpu import Plan

    return Plan(had, stage, rows)
