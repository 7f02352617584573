"""The CUDA kernel compiles under NVRTC exactly as mx.fast.cuda_kernel builds it (no GPU needed).

Skipped when the nvidia-cuda-nvrtc-cu12 wheel is not installed (scripts/setup.sh installs it on
Linux). What this proves and does not: docs/kernels.md.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_dupq.kernels import gpu, nvrtc


@pytest.fixture(scope="module")
def have_nvrtc():
    try:
        nvrtc.version()
        nvrtc.include_args()
    except nvrtc.NvrtcUnavailable as e:
        pytest.skip(str(e))


def test_source_is_mlx_build_kernel_layout():
    """Name, signature and template lines as mlx's build_kernel writes them (custom_kernel.cpp)."""
    t = gpu.launch_template(mx.float16, 896, 4864, 1, 3, True, 128, True)
    name, src = nvrtc.cuda_source(t)
    assert name == "custom_kernel_dupq_gqmv_float16_896_4864_1_3_1_" + "_".join(
        str(v) for k, v in t if k in ("ROWS", "HAD", "XS", "TG"))
    assert src.startswith(nvrtc.DEFAULT_HEADER + "// dq_portable.h")
    assert f"__global__ void {name}(\n    const __half* x,\n    const uint32_t* w,\n    const __half* scales," in src
    assert "    const int32_t* meta,\n    const int32_t* idx,\n    const float* coef,\n    const float* signs,\n" in src
    assert "    __half* y) {\n  using T = __half;\n  constexpr int N = 896;\n" in src
    assert src.rstrip().endswith("} // namespace mlx::core::cu")


CASES = [  # (dtype, n, out, rows, J, summed, had, stage): decode, batch, fused Hadamard, copies, gather, x unstaged
    (mx.float16, 896, 4864, 1, 1, True, 0, True),
    (mx.bfloat16, 896, 4864, 4, 1, True, 128, True),
    (mx.float32, 4864, 896, 1, 3, True, 0, True),
    (mx.float16, 256, 256, 1, 8, False, 0, True),
    (mx.float16, 8960, 1536, 1, 1, True, 0, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0]).split('.')[-1]}-{c[1]}x{c[2]}-M{c[3]}J{c[4]}")
def test_compiles_for_h100_without_spills(have_nvrtc, case):
    res = nvrtc.compile_cuda(gpu.launch_template(*case), "sm_90a")
    assert res.lowered.startswith("_ZN3mlx4core2cu") and res.kernel in res.lowered
    r = res.resources
    assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, res.log
    assert 0 < r["registers"] <= 128, res.log  # 2 threadgroups of 128+ threads stay resident per SM
    assert r["shared_bytes"] <= 48 * 1024, res.log  # static shared memory limit without opt-in
    assert res.ptx_ops["ld_global"] > 0 and res.ptx_ops["st_global"] > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_89"])
def test_compiles_for_other_architectures(have_nvrtc, arch):
    res = nvrtc.compile_cuda(gpu.launch_template(mx.float16, 896, 4864, 1, 2, True, 0, True), arch)
    assert res.resources["spill_store_bytes"] == 0


def test_broken_body_is_reported_with_the_log(have_nvrtc, monkeypatch):
    """The check can fail: a body NVRTC rejects raises CompileError carrying NVRTC's message."""
    header, body = gpu.kernel_source("cuda")
    monkeypatch.setattr(nvrtc, "kernel_source", lambda kind: (header, body + "\nundeclared_name += 1;\n"))
    with pytest.raises(nvrtc.CompileError, match="undeclared_name"):
        nvrtc.compile_cuda(gpu.launch_template(mx.float16, 512, 64, 1, 1, True, 0, True))


def test_metal_only_code_does_not_leak_into_cuda(have_nvrtc, monkeypatch):
    """The header's Metal branch is not compiled by NVRTC: a Metal-only construct in the body fails."""
    header, body = gpu.kernel_source("cuda")
    monkeypatch.setattr(nvrtc, "kernel_source",
                        lambda kind: (header, "threadgroup_barrier(mem_flags::mem_threadgroup);\n" + body))
    with pytest.raises(nvrtc.CompileError):
        nvrtc.compile_cuda(gpu.launch_template(mx.float16, 512, 64, 1, 1, True, 0, True))


def test_unavailable_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(nvrtc, "_nvidia_dirs", lambda: [])
    with pytest.raises(nvrtc.NvrtcUnavailable, match="no NVRTC with its headers is installed.*pip install"):
        nvrtc.compile_cuda(gpu.launch_template(mx.float16, 512, 64, 1, 1, True, 0, True))


@pytest.mark.parametrize("name", [tk.name for tk in nvrtc.toolkits()] or ["12"])
def test_every_installed_toolkit(have_nvrtc, name):
    """CUDA 12 (mlx-cuda-12's NVRTC) in CI; CUDA 13 too where its wheels are installed."""
    tk = nvrtc.toolkit(name)
    assert nvrtc.version(tk)[0] == int(name)
    res = nvrtc.compile_cuda(gpu.launch_template(mx.float16, 896, 4864, 1, 1, True, 128, True), "sm_90a", tk)
    assert res.resources["spill_store_bytes"] == 0
