"""Source code as text: the Python files of a pinned, permissively licensed wheel from pip.

``code`` = every ``.py`` file of ``networkx 3.4.2`` (``networkx-3.4.2-py3-none-any.whl``, BSD-3-Clause,
Copyright (C) 2004-2024 NetworkX Developers; sha256-verified, read as a zip, never installed or
run): 542 non-empty files, 6.1 M characters of library code, docstrings and tests. A document is one file;
its genre is its package directory (``networkx/algorithms/flow`` ...), so the split in
:func:`mlx_dupq.eval.data.split_documents` is stratified by package and by FILE: ``code:eval``
files are never in ``code:calib``. The same wheel on every machine gives the same text (the
standard library of the running Python would not: it changes with the Python version).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from ..errors import DupqError
from ..cache import cache_dir, pip_download, sha256_file

CODE_PACKAGE, CODE_VERSION = "networkx", "3.4.2"
CODE_WHEEL = "networkx-3.4.2-py3-none-any.whl"
CODE_SHA256 = "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f"
CODE_LICENSE = "BSD-3-Clause"


def code_documents(wheel: str | Path | None = None) -> list[tuple[str, str, str]]:
    """The ``.py`` files of the wheel as (path, package directory, text), sorted by path.

    ``wheel``: a wheel file to read (default: the pinned networkx wheel, fetched and verified)."""
    if wheel is None:
        return list(_code_cached())
    return _from_wheel(Path(wheel))


@lru_cache(maxsize=1)
def _code_cached() -> tuple[tuple[str, str, str], ...]:
    return tuple(_from_wheel(fetch_code_wheel()))


def _from_wheel(path: Path) -> list[tuple[str, str, str]]:
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.endswith(".py"))
            files = [(n, z.read(n).decode("utf-8")) for n in names]
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise DupqError(f"{path} is not a readable wheel ({type(e).__name__}); delete it and fetch again") from None
    return [(n, n.rpartition("/")[0] or ".", text) for n, text in files if text.strip()]


def fetch_code_wheel() -> Path:
    """The verified networkx wheel in the cache (``corpora/``), downloaded with pip when missing."""
    dst = cache_dir() / "corpora" / CODE_WHEEL
    if dst.is_file() and sha256_file(dst) == CODE_SHA256:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        part = pip_download(CODE_PACKAGE, CODE_VERSION, Path(tmp), "check the network or pip's index settings")
        got = sha256_file(part)
        if got != CODE_SHA256:
            raise DupqError(f"{CODE_WHEEL} has sha256 {got[:16]}..., expected {CODE_SHA256[:16]}...; "
                            "the download is corrupt or changed")
        os.replace(part, dst)
    return dst
