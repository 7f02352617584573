"""llama.cpp's own quantizers for the types gguf-py cannot write (the k-quants).

``ggml_quantize_chunk`` from the ggml library that ``llama-cpp-python`` ships (``libggml-base``),
called through ctypes on a float32 ``(rows, n)`` array; the output is ggml's block bytes, what
``llama-quantize`` writes for that type without an importance matrix. Optional: without
``llama-cpp-python`` a k-quant export says which package to install.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import gguf
import numpy as np

from ..errors import DupqError

GGML_QUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: llama-quantize's type for a tensor whose rows do not split into 256-weight k-quant blocks
#: (``tensor_type_fallback`` in llama.cpp's src/llama-quant.cpp)
KQUANT_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def type_for_rows(qtype: str, n: int) -> str:
    """``qtype``, or llama-quantize's 32-block fallback when rows of ``n`` do not split into its blocks."""
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return KQUANT_FALLBACK.get(qtype, qtype) if n % block else qtype


@cache
def _library() -> ctypes.CDLL:
    try:
        import llama_cpp  # deferred: optional dependency (a llama.cpp build), only for k-quant export
    except ImportError:
        raise DupqError("k-quant export uses llama.cpp's quantizer: pip install llama-cpp-python "
                        "(or pick Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0)") from None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "libggml.so", "libggml.dylib"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        raise DupqError(f"no ggml library in {lib_dir}; reinstall llama-cpp-python")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """``(rows, n)`` float -> ``(rows, n / block * type_size)`` uint8 blocks of ``qtype`` (llama.cpp's code)."""
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    rows, n = w.shape
    if n % block:
        raise DupqError(f"rows of {n} weights do not split into {qtype}'s blocks of {block}; "
                        "pick a type with 32-weight blocks (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0)")
    lib = _library()
    if lib.ggml_quantize_requires_imatrix(int(t)):
        raise DupqError(f"{qtype} needs an importance matrix, which mlx-dupq does not make; pick another type")
    src = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(t), src.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if written != out.nbytes:
        raise DupqError(f"llama.cpp's {qtype} quantizer wrote {written} bytes, expected {out.nbytes}")
    return out
