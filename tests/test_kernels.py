"""Kernels: reference twins, the GPU bodies run by the CPU harness, dispatch and its self-check."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_dupq.config import TERNARY, QuantSpec
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


@pytest.mark.parametrize("tg,rows,stage", [(1, 1, True), (8, 5, False), (64, 2, True), (128, 4, False)])
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
