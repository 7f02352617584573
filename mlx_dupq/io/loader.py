"""``load(MODEL) -> (model, tokenizer)`` for every kind of MODEL.

- an mlx-dupq pack: rebuilt exactly from its config.json (:func:`mlx_dupq.io.pack.load_pack`);
- an mlx-lm model directory (``quantization`` in config.json): mlx-lm's own loader;
- anything :func:`mlx_dupq.io.source.open_source` accepts (named model, .gguf, HF directory,
  hub id): the float model, dequantized, in ``compute_dtype`` — the "full-precision reference".

The same float model streamed from a source, for passes that must not hold it whole:
:func:`float_embedding` (the first hidden states), :func:`float_layers` (one decoder layer at a
time) and :func:`load_float_head` (the final norm and the head, for
:func:`~mlx_dupq.adapter.final_logits`).

Models are mlx-lm ``nn.Module``s; tokenizers mlx-lm ``TokenizerWrapper``s. On the CPU compute
in float32 (mlx's CPU build runs fp16/bf16 quantized matmuls ~9x slower).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from .._env import release_memory
from ..errors import DupqError, UsageError
from . import pack as packio
from .manifest import check_sizes
from .source import Source, open_source
from ..layers.cpu import use_dense_prefill
from ..adapter import EMBED_KEY_RE, build_skeleton, layer_owner, layer_prefix, model_classes, sanitize_group

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def tokenizer_of(path: Path, config: dict):
    """mlx-lm's ``TokenizerWrapper`` for the tokenizer files in ``path`` (eos from ``config``)."""
    from mlx_lm.utils import load_tokenizer

    eos = config.get("eos_token_id")
    try:
        return load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    except Exception as e:
        raise DupqError(f"could not load the tokenizer from {path} ({type(e).__name__}: {e})") from None


def load_model(model: str | Path, compute_dtype: str = "float32", lazy: bool = False) -> tuple[nn.Module, dict, Path]:
    """(model, config, tokenizer directory) for MODEL; see the module docstring."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"compute dtype {compute_dtype!r} is not supported; use one of {', '.join(COMPUTE_DTYPES)}")
    p = Path(str(model)).expanduser()
    if p.is_dir():
        check_sizes(p)  # a pack's manifest: every file there at its size (cheap; `verify` hashes)
    if p.is_dir() and packio.is_pack(p):
        m, config = packio.load_pack(p, compute_dtype=compute_dtype, lazy=lazy)
        return m, config, p
    if packio.is_quantized_dir(p):  # (a pack went above: an mlx-lm quantized model)
        from mlx_lm.utils import load_model as mlx_load_model

        try:
            m, config = mlx_load_model(p, lazy=True, get_model_classes=model_classes)
        except Exception as e:
            raise DupqError(f"mlx-lm could not load {p} ({type(e).__name__}: {e})") from None
        packio.cast_floats(m, getattr(mx, compute_dtype))
        if not lazy:
            mx.eval(m.parameters())
        return m, config, p

    src = open_source(model)
    return float_model(src, compute_dtype, lazy), src.config, src.tokenizer_dir()


def float_model(src: Source, compute_dtype: str = "float32", lazy: bool = False) -> nn.Module:
    """The float mlx-lm model of an opened source, every weight in ``compute_dtype``."""
    m = build_skeleton(src.config)
    weights = {k: src.get(k) for k in src.keys()}
    if hasattr(m, "sanitize"):
        weights = m.sanitize(weights)
    dtype = getattr(mx, compute_dtype)
    weights = [(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()]
    m.eval()
    try:
        m.load_weights(weights, strict=True)
    except ValueError as e:
        raise DupqError(f"the weights of {src.name} do not match its config ({e})") from None
    if not lazy:
        mx.eval(m.parameters())
        del weights
        release_memory()  # the dequantization's temporaries, freed into the heap
    return m


def float_embedding(src: Source, tokens: mx.array) -> mx.array:
    """The float32 embedding rows of ``tokens`` (n, T) -> (n, T, hidden), read from ``src``: the first
    hidden states of a streamed pass (the embedding itself is not kept)."""
    keys = [k for name, keys in src.groups() if name == "other" for k in keys if EMBED_KEY_RE.search(k)]
    if not keys:
        raise DupqError(f"{src.name} has no token embedding (model.embed_tokens.weight); pass the original float model")
    h = src.get(keys[0])[tokens].astype(mx.float32)
    mx.eval(h)
    return h


def _load_float(src: Source, skeleton: nn.Module, module: nn.Module, prefix: str, keys: list[str]) -> None:
    """Load the tensors ``keys`` of ``src`` (sanitized: experts stacked) into ``module``, the module at
    ``prefix`` in ``skeleton``, in float32; every parameter of the module must be among them. Cast
    one tensor at a time, each stored tensor freed once cast: about the module's float32 bytes, not more."""
    weights = sanitize_group(skeleton, {k: src.get(k) for k in keys})
    items = []
    for k in list(weights):
        v = weights.pop(k)
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.float32:
            v = v.astype(mx.float32)
        mx.eval(v)
        items.append((k[len(prefix) + 1:], v))
    try:
        module.load_weights(items, strict=True)
    except ValueError as e:
        raise DupqError(f"the weights of {src.name} {prefix} do not match its config "
                        f"({' '.join(str(e).split())})") from None


def float_layers(src: Source, skeleton: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """``(i, decoder layer i of skeleton)`` holding the float32 weights of ``src``'s layer i, one layer
    at a time: the streamed twin of :func:`float_model`. Layer i is read when the loop asks for it
    and gets its lazy (never evaluated) skeleton parameters back before layer i + 1 is read, so a
    pass holds one float layer; leaving the loop early reads no further layer."""
    layers = layer_owner(skeleton).layers
    groups = dict(src.groups())
    for i, layer in enumerate(layers):
        keys = groups.get(f"layer.{i}")
        if not keys:
            raise DupqError(f"{src.name} has no weights for decoder layer {i} of its {len(layers)}; "
                            "the checkpoint does not match its config.json")
        original = layer.parameters()
        try:
            _load_float(src, skeleton, layer, layer_prefix(keys), keys)
            yield i, layer
        finally:
            layer.update(original)
            mx.clear_cache()


def load_float_head(src: Source, skeleton: nn.Module) -> None:
    """Load the final norm and the head (``lm_head``, or the input embedding of a tied model) of
    ``src`` into ``skeleton`` in float32: what :func:`~mlx_dupq.adapter.final_logits` uses, nothing more
    (an untied model's input embedding stays unread)."""
    owner = layer_owner(skeleton)
    path = {id(m): p for p, m in skeleton.named_modules()}
    other = [k for name, keys in src.groups() if name == "other" for k in keys]
    for module in (owner.norm, skeleton["lm_head"] if "lm_head" in skeleton else owner.embed_tokens):
        prefix = path[id(module)]
        _load_float(src, skeleton, module, prefix, [k for k in other if k.startswith(prefix + ".")])


def load(model: str | Path, compute_dtype: str = "float32", lazy: bool = False):
    """Load MODEL as ``(model, tokenizer)``; MODEL is a pack, mlx-lm dir, HF dir, .gguf, name or hub id.

    On the CPU, mlx's quantized layers are switched to dense prefill (see
    :mod:`mlx_dupq.layers.cpu`): same weights, ~10x faster prompt processing and evaluation.
    """
    m, config, tok_dir = load_model(model, compute_dtype=compute_dtype, lazy=lazy)
    if mx.default_device() == mx.cpu:
        use_dense_prefill(m)
    return m, tokenizer_of(tok_dir, config)


_tokenizer = tokenizer_of  # the name before it was public (kept for code written against it)
