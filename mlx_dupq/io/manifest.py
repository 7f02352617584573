"""A pack's manifest: the size and sha256 of every file, the tool version and the recipe.

``manifest.json`` is written as the last step of a conversion, inside ``OUT.partial/`` just before
the rename to ``OUT``, so a pack without one was never finished. :func:`verify_pack` re-hashes
every file (``mlx-dupq verify``); :func:`check_sizes` only compares sizes (every ``load``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .._version import __version__
from ..errors import DupqError
from .atomic import write_json_atomic

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
MANIFEST_VERSION = 1


class PackDamaged(DupqError):
    """A pack's files do not match its manifest (or it has none)."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every regular file under ``root`` except the manifest itself, as sorted POSIX relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: str | Path, recipe: dict | None) -> dict:
    """Hash every file of the finished pack at ``root`` and write ``root/manifest.json``."""
    root = Path(root)
    files = {f: {"size": (root / f).stat().st_size, "sha256": sha256_file(root / f)} for f in _files(root)}
    manifest = {"manifest_version": MANIFEST_VERSION, "tool": f"mlx-dupq {__version__}", "recipe": recipe,
                "files": files}
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of the pack at ``root``, or None when it has none."""
    p = Path(root) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
        if not isinstance(m.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, AttributeError) as e:
        raise PackDamaged(f"{p} is damaged ({e}); convert the pack again") from None
    return m


def check_sizes(root: str | Path) -> None:
    """Cheap load-time check: every file the manifest lists exists with its recorded size.

    A pack without a manifest (written before manifests existed) is checked against its safetensors
    index (every shard there); ``verify`` refuses it.
    """
    root = Path(root)
    m = read_manifest(root)
    if m is None:
        _check_index(root)
        return
    for name, rec in m["files"].items():
        p = root / name
        if not p.is_file():
            raise PackDamaged(f"{root} is missing {name}; the pack is incomplete, convert it again")
        size = p.stat().st_size
        if size != rec["size"]:
            raise PackDamaged(f"{p} is damaged ({size} bytes, the manifest says {rec['size']}); convert it again")


def _check_index(root: Path) -> None:
    """Every shard ``model.safetensors.index.json`` names exists (a directory without an index passes)."""
    index = root / INDEX
    if not index.is_file():
        return
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PackDamaged(f"{index} is damaged; convert the pack again") from None
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise PackDamaged(f"{root} is missing {missing[0]} ({len(missing)} of the {len(shards)} shards its {INDEX} "
                          "names); the model is incomplete: convert or download it again")


def verify_pack(root: str | Path) -> dict:
    """Re-hash every file of the pack at ``root`` against its manifest; raise :class:`PackDamaged`
    naming the first missing, changed or unexpected file. Returns the manifest."""
    root = Path(root)
    if not root.is_dir():
        raise PackDamaged(f"{root} is not a directory (expected an mlx-dupq pack)")
    m = read_manifest(root)
    if m is None:
        hint = "an unfinished conversion" if root.name.endswith(".partial") else "not a finished mlx-dupq pack"
        raise PackDamaged(f"{root} has no {MANIFEST} ({hint}); convert it again")
    check_sizes(root)
    for name, rec in m["files"].items():
        if sha256_file(root / name) != rec["sha256"]:
            raise PackDamaged(f"{root / name} is damaged (sha256 differs from the manifest); convert it again")
    extra = [f for f in _files(root) if f not in m["files"]]
    if extra:
        raise PackDamaged(f"{root / extra[0]} is not in the manifest ({len(extra)} unexpected file(s)); "
                          "remove it or convert again")
    return m
