"""Model sources: where float weights come from, one tensor at a time.

:func:`open_source` resolves a MODEL argument to a :class:`~mlx_dupq.io.base.Source`: a named model
(:mod:`mlx_dupq.io.models`), a ``.gguf`` file (:mod:`mlx_dupq.io.gguf`), a local Hugging Face
directory or a hub repo id (:mod:`mlx_dupq.io.base`). :func:`write_hf_dir` writes any source as a
plain Hugging Face directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

from ..errors import DupqError
from . import models
from .base import (  # noqa: F401  (re-exported: these lived here before)
    TOKENIZER_FILES,
    HFDirSource,
    Source,
    _looks_like_repo_id,
    hub_snapshot,
    layer_index,
)
from .gguf import GGUFSource


def open_source(model: str | Path) -> Source:
    """Resolve a MODEL argument: a named model, a .gguf file, a local directory or a hub id."""
    s = str(model)
    if models.is_named(s):
        return models.open_named(s)
    p = Path(s).expanduser()
    if p.suffix == ".gguf" or (p.is_file() and p.exists()):
        if not p.exists():
            raise DupqError(f"{p} does not exist (expected a .gguf file)")
        return GGUFSource(p)
    if p.exists():
        return HFDirSource(p)
    if _looks_like_repo_id(s) and not s.startswith((".", "/")):
        return HFDirSource(hub_snapshot(s), name=s)
    names = ", ".join(models.names())
    raise DupqError(
        f"{s} does not exist; pass a local model directory, a .gguf file, a Hugging Face repo id "
        f"(org/name) or a named model ({names})"
    )


def write_hf_dir(src: Source, path: str | Path, dtype: str = "float32") -> Path:
    """Write ``src`` as a plain Hugging Face directory (config.json + safetensors + tokenizer).

    Used to hand a GGUF model to tools that only read Hugging Face directories (e.g. mlx-lm's
    own ``convert``), streaming one group of tensors per shard. Written to a temp dir, then renamed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dt = getattr(mx, dtype)
    weight_map = {}
    groups = src.groups()
    for i, (_, keys) in enumerate(groups):
        shard = {k: src.get(k).astype(dt) for k in keys}
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        del shard
    config = dict(src.config, torch_dtype=dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    src.save_tokenizer(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
