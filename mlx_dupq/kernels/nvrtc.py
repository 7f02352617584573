"""Compile the CUDA kernel exactly as ``mx.fast.cuda_kernel`` would, with NVRTC, without a GPU.

mlx's CUDA backend (``mlx/backend/cuda/custom_kernel.cpp``, ``build_kernel``) wraps our header and
body into one translation unit: its default header (``mlx/backend/cuda/device/utils.cuh`` and
``<cooperative_groups.h>``), our header, then inside ``namespace mlx::core::cu`` a
``__global__ void custom_kernel_<name><template hash>(const <type>* <input>, ..., <type>* <output>)``
whose first lines are the template arguments as ``constexpr int`` / ``using T = <type>``, then the
body. ``jit_module.cpp`` compiles that with NVRTC (``--device-as-default-execution-space``,
``--gpu-architecture=sm_<cc>[a]``, include paths for mlx's bundled headers, CCCL and the CUDA
runtime headers). :func:`cuda_source` rebuilds the same text and :func:`compile_cuda` runs the
same NVRTC call here, on the CPU, from the pip wheels mlx's CUDA build depends on
(``nvidia-cuda-nvrtc-cu12==12.9.*``, plus ``nvidia-cuda-runtime-cu12`` / ``nvidia-cuda-cccl-cu12``
for the headers), with mlx's device headers vendored under ``mlx_dupq/kernels/src/mlx_cuda`` (mlx 0.32.2, MIT).

What a successful compile proves and does not: docs/kernels.md ("CUDA: compiled with NVRTC").
:func:`compile_cuda` also returns ptxas' resource report (registers, spill and stack bytes,
shared memory) and counts of memory instructions in the PTX: static facts, not timings.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import mlx.core as mx

from .gpu import INPUTS, kernel_source

MLX_HEADERS_DIR = Path(__file__).resolve().parent / "src" / "mlx_cuda"
MLX_HEADERS = ("mlx/backend/cuda/device/utils.cuh", "mlx/backend/cuda/device/complex.cuh",
               "mlx/backend/cuda/device/config.h")
DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
# mlx's dtype_to_cuda_type and get_type_string (the template hash) for the dtypes we pass
CUDA_TYPES = {mx.float32: ("float", "float32"), mx.float16: ("__half", "float16"),
              mx.bfloat16: ("__nv_bfloat16", "bfloat16"), mx.uint32: ("uint32_t", "uint32"),
              mx.int32: ("int32_t", "int32")}
# dtype of every input besides x / scales / biases (which take T): see gpu.GpuBackend.launch
INPUT_DTYPES = {"w": mx.uint32, "meta": mx.int32, "idx": mx.int32, "coef": mx.float32, "signs": mx.float32}
# sm_90a: H100/H200 (mlx adds the "a" tag for compute capability >= 9); sm_80: A100; sm_89: L4/L40
ARCHS = ("sm_90a", "sm_80", "sm_89")


class NvrtcUnavailable(RuntimeError):
    """NVRTC or the CUDA headers are not installed here."""


class CompileError(RuntimeError):
    """NVRTC rejected the source; the message carries its log."""


@dataclass
class CompileResult:
    arch: str
    kernel: str  # mlx's kernel name (custom_kernel_dupq_gqmv_<hash>)
    lowered: str  # mangled name NVRTC gives it
    log: str
    ptx: str
    resources: dict = field(default_factory=dict)  # ptxas -v: registers, spill/stack bytes, smem
    ptx_ops: dict = field(default_factory=dict)  # counts of global/shared loads and stores in the PTX


def template_hash(template: list[tuple[str, object]]) -> str:
    """mlx's ``template_arguments_hash``: ``_<int>`` / ``_t``/``_f`` / ``_<type string>``."""
    out = ""
    for _, v in template:
        if isinstance(v, bool):
            out += "_t" if v else "_f"
        elif isinstance(v, int):
            out += f"_{v}"
        else:
            out += "_" + CUDA_TYPES[v][1]
    return out


def cuda_source(template: list[tuple[str, object]], name: str = "dupq_gqmv") -> tuple[str, str]:
    """(kernel name, full source) as mlx's ``build_kernel`` writes them for our gqmv launch.

    ``template``: a launch's template list (:func:`~mlx_dupq.kernels.gpu.launch_template`).
    """
    header, body = kernel_source("cuda")
    tdict = dict(template)
    if tdict.get("T") not in (mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"template T must be float32, float16 or bfloat16, got {tdict.get('T')!r}")
    kname = "custom_kernel_" + name + template_hash(template)
    src = DEFAULT_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += f"__global__ void {kname}(\n"
    for inp in INPUTS:
        dt = INPUT_DTYPES.get(inp, tdict["T"])
        src += f"    const {CUDA_TYPES[dt][0]}* {inp},\n"
        # mlx adds <name>_shape / _strides / _ndim parameters only when the body names them
        for suffix in ("_shape", "_strides", "_ndim"):
            if inp + suffix in body:
                raise ValueError(f"the body names {inp + suffix}; cuda_source does not model shape parameters")
    src += f"    {CUDA_TYPES[tdict['T']][0]}* y) {{\n"
    for k, v in template:
        if isinstance(v, bool):
            src += f"  constexpr bool {k} = {'true' if v else 'false'};\n"
        elif isinstance(v, int):
            src += f"  constexpr int {k} = {v};\n"
        else:
            src += f"  using {k} = {CUDA_TYPES[v][0]};\n"
    src += "\n" + body + "\n}\n\n} // namespace mlx::core::cu\n"
    return kname, src


@dataclass(frozen=True)
class Toolkit:
    """An NVRTC library and the CUDA headers beside it (pip wheel layouts of CUDA 12 and 13)."""

    name: str  # "12" or "13"
    lib: Path
    includes: tuple[Path, ...]  # CCCL first, then the CUDA runtime headers (mlx's order)


# (name, libnvrtc relative to site-packages/nvidia, include dirs): cu12 wheels
# (nvidia-cuda-nvrtc-cu12 ...) and cu13 wheels (nvidia-cuda-nvrtc==13.* ...)
LAYOUTS = (("12", "cuda_nvrtc/lib/libnvrtc.so.12", ("cuda_cccl/include", "cuda_runtime/include")),
           ("13", "cu13/lib/libnvrtc.so.13", ("cu13/include/cccl", "cu13/include")))
INSTALL_HINT = ("pip install 'nvidia-cuda-nvrtc-cu12==12.9.*' 'nvidia-cuda-runtime-cu12==12.9.*' "
                "'nvidia-cuda-cccl-cu12==12.9.*' (or: pip install -e '.[cuda-check]')")


def _nvidia_dirs() -> list[Path]:
    """site-packages/nvidia folders: the installed namespace package, then $MLX_DUPQ_NVIDIA_DIRS (":"-separated)."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        dirs += [Path(p) for p in nvidia.__path__]
    except ImportError:
        pass
    dirs += [Path(p) for p in os.environ.get("MLX_DUPQ_NVIDIA_DIRS", "").split(":") if p]
    return dirs


def toolkits() -> list[Toolkit]:
    """Every complete NVRTC + headers set found, CUDA 12 first (mlx-cuda-12's pin)."""
    found = []
    for name, lib, incs in LAYOUTS:
        for d in _nvidia_dirs():
            if (d / lib).exists() and all((d / i).is_dir() for i in incs):
                found.append(Toolkit(name, d / lib, tuple(d / i for i in incs)))
                break
    return found


def toolkit(name: str | None = None) -> Toolkit:
    """The toolkit called ``name`` ("12", "13"), or the first one found."""
    found = toolkits()
    for tk in found:
        if name is None or tk.name == name:
            return tk
    have = ", ".join(tk.name for tk in found) or "none"
    want = f"CUDA {name} " if name else ""
    raise NvrtcUnavailable(f"no {want}NVRTC with its headers is installed (found: {have}); {INSTALL_HINT}")


@cache
def _lib(path: Path | None = None) -> ctypes.CDLL:
    path = path or toolkit().lib
    try:
        dll = ctypes.CDLL(str(path))
    except OSError as e:
        raise NvrtcUnavailable(f"cannot load {path}: {e}") from e
    dll.nvrtcGetErrorString.restype = ctypes.c_char_p
    return dll


def include_args(tk: Toolkit | None = None) -> list[str]:
    """The --include-path options mlx's ``include_path_args`` gives NVRTC (CCCL, CUDA runtime)."""
    return [f"--include-path={p}" for p in (tk or toolkit()).includes]


def version(tk: Toolkit | None = None) -> tuple[int, int]:
    lib = _lib((tk or toolkit()).lib)
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        raise CompileError(f"{what} failed: {lib.nvrtcGetErrorString(rc).decode()}")


def _get(lib: ctypes.CDLL, prog, size_fn: str, get_fn: str) -> bytes:
    n = ctypes.c_size_t()
    _check(lib, getattr(lib, size_fn)(prog, ctypes.byref(n)), size_fn)
    buf = ctypes.create_string_buffer(n.value)
    _check(lib, getattr(lib, get_fn)(prog, buf), get_fn)
    return buf.raw


def _resources(log: str) -> dict:
    """Parse ptxas -v lines of the log: registers, stack frame, spill bytes, shared/constant memory."""
    res: dict = {}
    for key, pat in (("registers", r"Used (\d+) registers"), ("stack_frame_bytes", r"(\d+) bytes stack frame"),
                     ("spill_store_bytes", r"(\d+) bytes spill stores"),
                     ("spill_load_bytes", r"(\d+) bytes spill loads"), ("shared_bytes", r"(\d+) bytes smem")):
        m = re.search(pat, log)
        if m:
            res[key] = int(m.group(1))
    res.setdefault("shared_bytes", 0)
    return res


def _ptx_ops(ptx: str) -> dict:
    """Counts of memory instructions in the PTX text (static, per compiled kernel)."""
    ops = {}
    for key, pat in (("ld_global", r"\bld\.global(?:\.nc)?[.\w]*"), ("ld_shared", r"\bld\.shared[.\w]*"),
                     ("st_shared", r"\bst\.shared[.\w]*"), ("st_global", r"\bst\.global[.\w]*"),
                     ("ld_local", r"\bld\.local[.\w]*"), ("st_local", r"\bst\.local[.\w]*"),
                     ("bar_sync", r"\bbar\.sync\b|\bbarrier\.sync\b")):
        ops[key] = len(re.findall(pat, ptx))
    return ops


def compile_cuda(template: list[tuple[str, object]], arch: str = "sm_90a", tk: Toolkit | None = None) -> CompileResult:
    """NVRTC-compile the gqmv kernel of ``template`` for ``arch``, with mlx's options.

    Raises :class:`CompileError` (with NVRTC's log) when the source does not compile and
    :class:`NvrtcUnavailable` when NVRTC or the headers are missing.
    """
    tk = tk or toolkit()
    lib = _lib(tk.lib)
    kname, src = cuda_source(template)
    names = [h.encode() for h in MLX_HEADERS]
    texts = [(MLX_HEADERS_DIR / h).read_bytes() for h in MLX_HEADERS]
    arr = ctypes.c_char_p * len(names)
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{kname}.cu".encode(), len(names),
                                       arr(*texts), arr(*names)), "nvrtcCreateProgram")
    try:
        full = "mlx::core::cu::" + kname
        _check(lib, lib.nvrtcAddNameExpression(prog, full.encode()), "nvrtcAddNameExpression")
        opts = ["--device-as-default-execution-space", f"--gpu-architecture={arch}", *include_args(tk),
                "--ptxas-options=-v"]
        copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), copts)
        log = _get(lib, prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog").rstrip(b"\0").decode(errors="replace")
        if rc != 0:
            raise CompileError(f"NVRTC {tk.name} could not compile {kname} for {arch}: "
                               f"{lib.nvrtcGetErrorString(rc).decode()}\n{log}")
        lowered = ctypes.c_char_p()
        _check(lib, lib.nvrtcGetLoweredName(prog, full.encode(), ctypes.byref(lowered)), "nvrtcGetLoweredName")
        ptx = _get(lib, prog, "nvrtcGetPTXSize", "nvrtcGetPTX").rstrip(b"\0").decode()
        if arch.startswith("sm_"):
            _get(lib, prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")  # SASS was produced (as mlx loads it)
        return CompileResult(arch=arch, kernel=kname, lowered=lowered.value.decode(), log=log, ptx=ptx,
                             resources=_resources(log), ptx_ops=_ptx_ops(ptx))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
