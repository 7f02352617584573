"""Where mlx-dupq caches downloaded and derived files, and the file hash it checks them with."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

#: progress(done_bytes, total_bytes, message)
Progress = Callable[[int, int, str], None]
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where named models and derived files are cached: ``$MLX_DUPQ_CACHE`` or ``~/.cache/mlx_dupq``."""
    env = os.environ.get("MLX_DUPQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_dupq"


def sha256_file(path: Path, progress: Progress | None = None, message: str = "") -> str:
    """sha256 hex digest of a file, read in chunks (``progress(done, total, message)`` if given)."""
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total, message)
    return h.hexdigest()
