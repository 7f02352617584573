"""mlx_dupq._env: the machine record of result files (CPU, BLAS, versions, device)."""

from __future__ import annotations

import json
import os
import re
import sys

import mlx.core as mx

from mlx_dupq import _env
from mlx_dupq._version import __version__


def test_machine_record_says_what_ran():
    mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))  # mlx loaded and its BLAS mapped
    rec = _env.machine_record()
    json.dumps(rec)  # goes into result files as it is
    assert rec["cpu"] and rec["logical_cores"] == os.cpu_count() and 1 <= rec["usable_cores"] <= rec["logical_cores"]
    assert len(rec["load_avg"]) == 3 and all(x >= 0 for x in rec["load_avg"])
    assert rec["mlx"].split()[0] == mx.__version__ and rec["mlx_dupq"] == __version__ and rec["mlx_lm"]
    assert rec["device"] == str(mx.default_device()) and rec["python"].count(".") == 2
    assert rec["mlx_dupq_commit"] is None or re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", rec["mlx_dupq_commit"])
    blas = rec["blas"]
    assert blas["fast_blas_path"] == _env.fast_blas_path()
    if sys.platform.startswith("linux"):  # (macOS: Accelerate, no /proc/self/maps)
        assert blas["mapped"], "mlx's CPU backend links a BLAS: /proc/self/maps names it"
        assert blas["in_use"] in blas["mapped"]
    preloaded = os.environ.get("LD_PRELOAD", "")
    if blas["fast_blas_path"] and blas["fast_blas_path"] in preloaded:  # (conftest preloads it when installed)
        assert blas["in_use"] == blas["fast_blas_path"] and blas["env"]["LD_PRELOAD"] == preloaded
        assert blas["openblas_core"] and blas["openblas_config"].startswith("OpenBLAS") and blas["openblas_threads"] >= 1


def test_blas_environment_is_recorded_when_set(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = _env.blas_record()["env"]
    assert env["OPENBLAS_CORETYPE"] == "Haswell" and "OMP_NUM_THREADS" not in env


def test_cpu_model_and_flags_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                   "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    assert _env._cpu(str(x86)) == ("Intel(R) Xeon(R) Gold 6338", ["sse4_2", "avx", "avx2", "fma"])
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    name, flags = _env._cpu(str(arm))
    assert flags == ["asimd", "sve"] and name  # no model name: platform's answer
    assert _env._cpu(str(tmp_path / "missing"))[1] == []


def test_openblas_kernels_named_from_the_cpu_flags(tmp_path, monkeypatch):
    """A CPU model OpenBLAS does not know gets its SSE3 kernels: the restart names the set the flags allow."""
    def cpu(flags):
        p = tmp_path / f"cpu{len(flags)}"
        p.write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: {flags}\n")
        return str(p)
    avx512 = cpu("fpu sse4_2 avx avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl")
    assert _env.openblas_coretype(avx512) == "SkylakeX"
    assert _env.openblas_coretype(cpu("fpu sse4_2 avx avx2 fma avx512f")) == "Haswell"  # no BW/DQ/VL
    assert _env.openblas_coretype(cpu("fpu sse4_2 avx")) is None
    assert _env.openblas_coretype(str(tmp_path / "missing")) is None
    monkeypatch.setattr(_env.sys, "platform", "linux")
    monkeypatch.setattr(_env, "fast_blas_path", lambda: "/lib/libblas.so.3")
    env = _env.preload_env({"PATH": "/bin"}, cpuinfo=avx512)
    assert env["LD_PRELOAD"] == "/lib/libblas.so.3" and env["OPENBLAS_CORETYPE"] == "SkylakeX"
    # preloaded already: restart only to name the kernels; a user's choice stands; once only
    env = _env.preload_env({"LD_PRELOAD": "/lib/libblas.so.3"}, cpuinfo=avx512)
    assert env["OPENBLAS_CORETYPE"] == "SkylakeX" and env["LD_PRELOAD"] == "/lib/libblas.so.3"
    assert _env.preload_env({"LD_PRELOAD": "/lib/libblas.so.3", "OPENBLAS_CORETYPE": "Haswell"}, cpuinfo=avx512) is None
    assert _env.preload_env({"LD_PRELOAD": "/lib/libblas.so.3"}, cpuinfo=cpu("fpu sse4_2")) is None
    assert _env.preload_env({**env}, cpuinfo=avx512) is None
    env = _env.preload_env({"OPENBLAS_CORETYPE": "Zen"}, cpuinfo=avx512)
    assert env["OPENBLAS_CORETYPE"] == "Zen" and env["LD_PRELOAD"] == "/lib/libblas.so.3"


def test_release_memory_gives_freed_heap_back(monkeypatch):
    """Blocks freed in the middle of glibc's heap stay resident until trimmed: release_memory() returns them."""
    import numpy as np

    if not sys.platform.startswith("linux") or _env.resident_bytes() == 0:
        return  # RSS comes from /proc (Linux); elsewhere release_memory only empties MLX's cache
    big, small = [], []
    for _ in range(2000):  # 100 KB blocks (below glibc's mmap threshold) with small live blocks between
        big.append(np.ones(100_000 // 8))
        small.append(np.ones(2000))
    del big
    assert _env.release_memory() > 100e6  # of 200 MB freed
    assert _env.release_memory() < 20e6  # nothing left to give back
