"""Process environment set-up: a fast BLAS for MLX's CPU backend.

The Linux CPU wheel of MLX links a slow reference BLAS. Preloading OpenBLAS (Debian package
``libopenblas0-pthread``) makes fp32 matmuls ~50-80x faster with identical results. A preload
must be in place before the process starts, so :func:`reexec_with_fast_blas` restarts the
current process once with ``LD_PRELOAD`` set. It is a no-op when

- the library is not installed (then everything still works, only slower),
- ``LD_PRELOAD`` already names it, or the re-exec already happened,
- ``MLX_DUPQ_NO_PRELOAD=1`` is set, or the platform is not Linux.
"""

from __future__ import annotations

import os
import sys

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


def preload_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """Return a copy of ``env`` with OpenBLAS preloaded, or None if nothing needs to change."""
    env = dict(os.environ if env is None else env)
    if not sys.platform.startswith("linux") or env.get("MLX_DUPQ_NO_PRELOAD") == "1":
        return None
    if env.get(_GUARD) == "1":
        return None
    lib = fast_blas_path()
    if lib is None:
        return None
    current = env.get("LD_PRELOAD", "")
    if lib in current.split(":") or lib in current.split(" "):
        return None
    env["LD_PRELOAD"] = f"{lib}:{current}" if current else lib
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
