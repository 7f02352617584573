"""Process environment set-up: a fast BLAS for MLX's CPU backend.

The Linux CPU wheel of MLX links a slow reference BLAS. Preloading OpenBLAS (Debian package
``libopenblas0-pthread``) makes fp32 matmuls ~50-80x faster with identical results. A preload
must be in place before the process starts, so :func:`reexec_with_fast_blas` restarts the
current process once with ``LD_PRELOAD`` set. It is a no-op when

- the library is not installed (then everything still works, only slower),
- ``LD_PRELOAD`` already names it, or the re-exec already happened,
- ``MLX_DUPQ_NO_PRELOAD=1`` is set, or the platform is not Linux.

The restart also sets ``OPENBLAS_CORETYPE`` when it is unset (:func:`openblas_coretype`): OpenBLAS
picks its kernels by CPU model, and a model it does not know (a virtual machine's generic "Intel(R)
Xeon(R) Processor") gets the SSE3 kernels of 2004's Prescott. On this project's 2-core AVX-512
machine that made fp32 matmul 6x slower (27 against 167 GFLOP/s, 2048 x 896 x 4864).

:func:`machine_record` says what a result was measured with (CPU, BLAS, versions, device): the
``machine`` entry of result files, so that two numbers that differ can be traced to their machines.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from ._version import __version__

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
_GUARD = "MLX_DUPQ_PRELOADED"


def fast_blas_path() -> str | None:
    """Path of an installed OpenBLAS ``libblas.so.3``, or None."""
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def openblas_coretype(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """OpenBLAS's kernel set for this CPU's instruction set ("SkylakeX" with AVX-512 F/CD/BW/DQ/VL,
    "Haswell" with AVX2 and FMA), or None (other CPUs: OpenBLAS's own detection stands)."""
    flags = _cpuinfo(cpuinfo)[1]
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def preload_env(env: dict[str, str] | None = None, cpuinfo: str = "/proc/cpuinfo") -> dict[str, str] | None:
    """Return a copy of ``env`` with OpenBLAS preloaded and its kernel set named
    (:func:`openblas_coretype`, unless ``OPENBLAS_CORETYPE`` is set), or None if nothing needs to change."""
    env = dict(os.environ if env is None else env)
    if not sys.platform.startswith("linux") or env.get("MLX_DUPQ_NO_PRELOAD") == "1":
        return None
    if env.get(_GUARD) == "1":
        return None
    lib = fast_blas_path()
    if lib is None:
        return None
    current = env.get("LD_PRELOAD", "")
    preloaded = lib in current.split(":") or lib in current.split(" ")
    core = None if env.get("OPENBLAS_CORETYPE") else openblas_coretype(cpuinfo)
    if preloaded and core is None:
        return None
    if not preloaded:
        env["LD_PRELOAD"] = f"{lib}:{current}" if current else lib
    if core is not None:
        env["OPENBLAS_CORETYPE"] = core
    env[_GUARD] = "1"
    return env


def reexec_with_fast_blas(argv: list[str] | None = None) -> None:
    """Restart this process with OpenBLAS preloaded (never returns if it restarts)."""
    env = preload_env()
    if env is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return  # keep running without the preload


#: environment variables that change which BLAS runs and how (recorded when set)
BLAS_ENV = ("LD_PRELOAD", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MLX_DUPQ_NO_PRELOAD")
_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def _cpu(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(CPU model name, the SIMD flags of :data:`_CPU_FLAGS` it has) from /proc/cpuinfo, else platform."""
    name, flags = _cpuinfo(cpuinfo)
    return name or platform.processor() or platform.machine(), [f for f in _CPU_FLAGS if f in flags]


def _cpuinfo(cpuinfo: str) -> tuple[str, set[str]]:
    """(model name or "", every flag) of the first CPU in /proc/cpuinfo; ("", set()) if unreadable."""
    name, flags = "", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not name:
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def _version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """Commit of the mlx_dupq checkout this code runs from (``+dirty`` with uncommitted changes), or None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed package (another repository may hold site-packages)
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "mlx_dupq"], capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def blas_record() -> dict:
    """The BLAS libraries mapped into this process, the one whose symbols win (a preloaded one),
    OpenBLAS's kernel set and threads when it is in use, and the BLAS environment variables set."""
    mapped: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "blas" in Path(path).name and path not in mapped:
                    mapped.append(path)
    except OSError:
        pass
    real = {os.path.realpath(p): p for p in mapped}
    preload = [os.path.realpath(p) for p in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    # a preloaded BLAS's symbols win over the one mlx links; else the libblas mlx links
    in_use = next((real[p] for p in preload if p in real), None) or next(
        (p for p in mapped if Path(p).name.startswith("libblas")), mapped[0] if mapped else None)
    rec: dict = {"in_use": in_use, "mapped": mapped, "fast_blas_path": fast_blas_path(),
                 "env": {k: os.environ[k] for k in BLAS_ENV if k in os.environ}}
    if in_use:
        try:  # an OpenBLAS says which kernels it picked (DYNAMIC_ARCH) and its thread count
            lib = ctypes.CDLL(in_use)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            lib.openblas_get_config.restype = ctypes.c_char_p
            rec["openblas_core"] = lib.openblas_get_corename().decode()
            rec["openblas_config"] = lib.openblas_get_config().decode()
            rec["openblas_threads"] = int(lib.openblas_get_num_threads())
        except (OSError, AttributeError):
            pass  # not an OpenBLAS (the reference BLAS of MLX's wheel)
    return rec


def machine_record() -> dict:
    """What produced a result, for its JSON (``"machine"``): CPU model and SIMD flags, logical cores
    (and those this process may use), load average, OS, Python, mlx / mlx-lm / mlx-dupq versions
    (and the commit of the checkout at the time of the record), the device mlx computes on and the BLAS
    in use (:func:`blas_record`). Without mlx (a GPU machine that runs bench/kernel_cuda_device.py with
    CuPy alone) ``mlx`` and ``device`` are None."""
    try:
        import mlx.core as mx  # deferred: _env runs before mlx is loaded (cli's re-exec, `--help`)
    except ImportError:
        mx = None

    cpu, flags = _cpu()
    wheels = [d for d in ("mlx-cpu", "mlx-metal", "mlx-cuda") if _version_of(d)]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu, "cpu_flags": flags, "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg": load, "os": platform.platform(), "python": platform.python_version(),
        "mlx": None if mx is None else mx.__version__ + (f" ({', '.join(wheels)})" if wheels else ""),
        "mlx_lm": _version_of("mlx-lm"), "mlx_dupq": __version__, "mlx_dupq_commit": _git_commit(),
        "device": None if mx is None else str(mx.default_device()), "blas": blas_record(),
    }


def release_memory() -> int:
    """Give memory that is free inside this process back to the operating system; returns how many
    bytes of resident memory that released (0 where it cannot tell).

    MLX's buffer cache is emptied and glibc's heap trimmed (``malloc_trim``): freed blocks of up to a
    few MiB (a layer's tensors, numpy temporaries) come from glibc's heap, which keeps them resident
    after they are freed unless they sit at its top (``bench/source_memory.py``). Costs milliseconds; a no-op
    off glibc."""
    import gc

    import mlx.core as mx

    before = resident_bytes()
    gc.collect()
    mx.clear_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (macOS, musl): nothing to trim
        pass
    after = resident_bytes()
    return max(before - after, 0) if before and after else 0


def resident_bytes() -> int:
    """This process's resident memory now, in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
