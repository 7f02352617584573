"""Model sources, part 1: the :class:`Source` base class and the Hugging Face directory source.

A :class:`Source` exposes a Hugging Face style ``config`` dict and tensors under Hugging
Face names (``model.layers.3.self_attn.q_proj.weight``), read one at a time so that a
conversion never holds more than one decoder layer in memory.

Kinds: a local Hugging Face directory (config.json + safetensors + tokenizer), a hub repo id
(downloaded with huggingface-hub), a ``.gguf`` file (see :mod:`mlx_dupq.io.gguf`) and the
named real models of :mod:`mlx_dupq.io.models`. :func:`mlx_dupq.io.source.open_source` picks the
right one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

import mlx.core as mx

from ..adapter import layer_index
from ..cache import cache_dir
from ..errors import DupqError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

class Source(ABC):
    """Float weights + config + tokenizer of one model."""

    #: human-readable origin (path, repo id or model name)
    name: str
    #: Hugging Face style config (``model_type``, sizes, ...)
    config: dict

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names, Hugging Face spelling."""

    @abstractmethod
    def get(self, key: str) -> mx.array:
        """One tensor in its stored float dtype (bf16/fp16/fp32; float32 for dequantized GGUF),
        evaluated; the caller casts (in row chunks for big tensors) and may free it after use."""

    @abstractmethod
    def save_tokenizer(self, dst: Path) -> None:
        """Write the tokenizer files (tokenizer.json, tokenizer_config.json, ...) into ``dst``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short string that changes when the weights change (for ``--resume``)."""

    def groups(self) -> list[tuple[str, list[str]]]:
        """Tensor names grouped for streaming: ``("other", [...])`` then ``("layer.N", [...])``."""
        other: list[str] = []
        layers: dict[int, list[str]] = {}
        for k in self.keys():
            i = layer_index(k)
            if i is None:
                other.append(k)
            else:
                layers.setdefault(i, []).append(k)
        out = [("other", other)] if other else []
        out += [(f"layer.{i}", layers[i]) for i in sorted(layers)]
        return out

    def tokenizer_dir(self) -> Path:
        """A directory holding this model's tokenizer files (cached)."""
        d = cache_dir() / "tokenizers" / self.fingerprint()
        if not (d / "tokenizer_config.json").exists():
            tmp = d.with_name(d.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.save_tokenizer(tmp)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        return d


class HFDirSource(Source):
    """A local Hugging Face model directory: config.json + *.safetensors + tokenizer files."""

    def __init__(self, path: Path, name: str | None = None):
        path = Path(path)
        if not path.is_dir():
            raise DupqError(f"{path} is not a directory (expected a Hugging Face model directory or a .gguf file)")
        cfg = path / "config.json"
        if not cfg.exists():
            raise DupqError(f"config.json not found in {path} (expected a Hugging Face model directory or a .gguf file)")
        try:
            self.config = json.loads(cfg.read_text())
        except ValueError as e:
            raise DupqError(f"{cfg} is not valid JSON ({e}); re-download the model") from None
        if "model_type" not in self.config:
            raise DupqError(f"{cfg} has no model_type; is this a Hugging Face transformers model directory?")
        if "quantization" in self.config or "mlx_dupq" in self.config:
            raise DupqError(
                f"{path} is already a quantized MLX model; convert from the original float model instead"
            )
        self.path = path
        self.name = name or str(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise DupqError(f"no .safetensors files in {path}; convert .bin checkpoints to safetensors first")
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                arrays = mx.load(str(f))  # lazy: nothing is read until a tensor is evaluated
            except Exception as e:  # mlx raises RuntimeError/ValueError for corrupt files
                raise DupqError(f"{f} could not be read ({e}); the file may be truncated, re-download it") from None
            for k in arrays:
                self._where[k] = f
            del arrays

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> mx.array:
        arr = mx.load(str(self._where[key]))[key]
        mx.eval(arr)
        return arr

    def save_tokenizer(self, dst: Path) -> None:
        copied = False
        for name in TOKENIZER_FILES:
            if (self.path / name).exists():
                shutil.copy(self.path / name, dst / name)
                copied = True
        if not copied:
            raise DupqError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, ...) in {self.path}")

    def tokenizer_dir(self) -> Path:
        return self.path

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in sorted(set(self._where.values())):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _looks_like_repo_id(s: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s) is not None


def hub_snapshot(repo_id: str) -> Path:
    """Download a Hugging Face hub repo's config, tokenizer and safetensors (huggingface-hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - dependency
        raise DupqError("huggingface-hub is not installed; pip install huggingface-hub") from None
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"],
        )
    except Exception as e:
        kind = type(e).__name__
        raise DupqError(
            f"could not download {repo_id!r} from the Hugging Face hub ({kind}); "
            "check the repo id and your network, or pass a local directory or .gguf file"
        ) from None
    return Path(path)
