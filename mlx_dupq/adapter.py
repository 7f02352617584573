"""The one adapter between mlx-dupq and mlx-lm's model classes (docs/architecture.md, layer "adapter").

Everything that knows how an mlx-lm text model is laid out lives here, so the rest of the package
asks instead of guessing:

- :func:`build_skeleton`  the mlx-lm model for a config.json, with lazy random weights;
- :func:`model_classes`   mlx-lm's (Model, ModelArgs) for a config.json, plus :class:`TiedDeepseek`
  (mlx-lm's ``deepseek`` has no ``tie_word_embeddings``; a tied one is built here);
- :func:`module_kind`     which modules are quantizable, and as what;
- :func:`sanitize_group`  ``model.sanitize`` for one streamed decoder layer (expert stacking);
- :func:`layer_index` / :func:`layer_prefix`  the decoder layer a tensor or module name belongs to
  (the one regex :data:`LAYER_RE`);
- :func:`layer_owner`     the module holding the decoder-layer list (layer walking);
- :func:`final_logits`    the logits from the last decoder layer's output (final norm, then the head);
- :class:`LayerTail`      logits from any decoder layer on, with the layer inputs cached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import deepseek as _deepseek
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import _get_classes

from .errors import DupqError

#: a decoder layer inside a tensor or module name: ``model.layers.3.mlp.up_proj.weight`` -> 3
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: the input embedding's weight (where the hidden states start)
EMBED_KEY_RE = re.compile(r"(^|\.)embed_tokens\.weight$")


def layer_index(name: str) -> int | None:
    """Decoder layer number of a tensor / module name, or None (embedding, final norm, lm_head).
    A module path without a trailing parameter (``model.layers.3``) counts too."""
    m = LAYER_RE.search(name + ".")
    return int(m.group(1)) if m else None


def layer_prefix(keys: list[str]) -> str | None:
    """``model.layers.3`` for the keys of decoder layer 3 (the first key that names a layer)."""
    for k in keys:
        m = LAYER_RE.search(k)
        if m:
            return k[: m.end(1)]
    return None


@dataclass
class TiedDeepseekArgs(_deepseek.ModelArgs):
    """mlx-lm's ``deepseek`` arguments plus ``tie_word_embeddings`` (its own dataclass drops the key)."""

    tie_word_embeddings: bool = True


class TiedDeepseek(_deepseek.Model):
    """mlx-lm's ``deepseek`` model whose head is the input embedding (``tie_word_embeddings: true``).

    mlx-lm's ``deepseek.Model`` always owns an ``lm_head``; a MoE cut from a tied dense model
    (SmolLM2: its 49152 x 576 embedding is 21 % of the model) would store that matrix twice and
    pay its bits twice. This class has no ``lm_head`` and computes the logits as mlx-lm's tied
    llama does, ``embed_tokens.as_linear(h)`` (a quantized embedding too). Same parameter names
    otherwise, so packs, sanitize and expert stacking are mlx-lm's. ``mlx_lm.load`` itself builds
    the untied class and refuses such a checkpoint (``lm_head.weight`` missing); load it with
    :func:`mlx_dupq.load`.
    """

    def __init__(self, config: TiedDeepseekArgs):
        nn.Module.__init__(self)
        self.args = config
        self.model_type = config.model_type
        self.model = _deepseek.DeepseekModel(config)

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        return self.model.embed_tokens.as_linear(self.model(inputs, cache))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        for k in [k for k in weights if k.startswith("lm_head.")]:
            weights.pop(k)  # a checkpoint that also wrote the head: the embedding is the head
        return weights


def model_classes(config: dict) -> tuple[type, type]:
    """mlx-lm's ``(Model, ModelArgs)`` for ``config`` (``mlx_lm.utils._get_classes``), except a
    ``deepseek`` config with ``tie_word_embeddings: true``: :class:`TiedDeepseek`. Pass it to
    ``mlx_lm.utils.load_model(get_model_classes=...)`` too. ValueError for an unknown model type."""
    if config.get("model_type") == "deepseek" and config.get("tie_word_embeddings", False):
        return TiedDeepseek, TiedDeepseekArgs
    return _get_classes(config)


def build_skeleton(config: dict) -> nn.Module:
    """The mlx-lm model for ``config`` with lazy (never evaluated) random weights."""
    try:
        model_class, args_class = model_classes(config)
    except ValueError:
        raise DupqError(
            f"model type {config.get('model_type')!r} is not supported by mlx-lm; "
            "use a Qwen2/Qwen3/Llama/DeepSeek-MoE style model"
        ) from None
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise DupqError(f"config.json does not describe a valid {config.get('model_type')} model ({e})") from None


def module_kind(module: nn.Module) -> str | None:
    """'linear' | 'embedding' | 'switch_linear' for quantizable modules, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, SwitchLinear):
        return "switch_linear"
    return None


def sanitize_group(skeleton: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """``skeleton.sanitize`` for the weights of one streamed group (one decoder layer, or the rest).

    Stacks per-expert checkpoint tensors (``mlp.experts.E.up_proj``) into ``switch_mlp``. mlx-lm's
    qwen2_moe / mixtral / olmoe ``sanitize`` only stacks when *layer 0's* first expert is among the
    weights (it is written for a whole checkpoint), so a layer's weights are renamed to layer 0,
    sanitized, and renamed back.
    """
    if not hasattr(skeleton, "sanitize"):
        return weights
    prefix = layer_prefix(list(weights))
    if prefix is None:
        return skeleton.sanitize(weights)
    zero = re.sub(r"\d+$", "0", prefix)
    renamed = {zero + k[len(prefix):] if k.startswith(prefix + ".") else k: v for k, v in weights.items()}
    out = skeleton.sanitize(renamed)
    return {prefix + k[len(zero):] if k.startswith(zero + ".") else k: v for k, v in out.items()}


def layer_owner(model: nn.Module) -> nn.Module:
    """The module that holds the decoder-layer list as its ``layers`` child (``model.model`` in mlx-lm)."""
    for owner in (getattr(model, "model", None), model):
        if isinstance(owner, nn.Module) and isinstance(owner.get("layers") if isinstance(owner, dict) else None, list):
            return owner
    raise DupqError(f"{type(model).__name__} has no decoder-layer list (model.model.layers or model.layers); "
                    "duplication supports mlx-lm's text models")


def final_logits(model: nn.Module, h: mx.array) -> mx.array:
    """Logits from the last decoder layer's output h (..., hidden) -> (..., vocab): the final norm,
    then ``lm_head`` or, for a tied model, the input embedding (mlx-lm's text models end so)."""
    owner = layer_owner(model)
    out = owner.norm(h)
    return model.lm_head(out) if "lm_head" in model else owner.embed_tokens.as_linear(out)


class LayerTail:
    """The float model's logits from any decoder layer on, with the layer inputs cached.

    Works for mlx-lm models laid out as ``model.model.{embed_tokens, layers, norm}`` plus
    ``lm_head`` or a tied embedding; anything else (or a layout whose re-run does not reproduce
    the full forward) falls back to the full forward pass.
    """

    def __init__(self, model: nn.Module, tokens: mx.array, ref_logits: mx.array):
        self.model, self.tokens = model, tokens
        self.hidden: list[mx.array] | None = None
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
            return
        if any(getattr(layer, "use_sliding", False) for layer in inner.layers):
            return
        self.inner = inner
        try:
            h = inner.embed_tokens(tokens)
            self.mask = create_attention_mask(h, None)
            hidden = []
            for layer in inner.layers:
                hidden.append(h)
                h = layer(h, self.mask, None)
                mx.eval(h)
            hidden.append(h)
            self.hidden = hidden
            again = self.logits_from(0)
        except Exception:  # an unusual layer signature: use the full forward
            self.hidden = None
            return
        scale = float(mx.max(mx.abs(ref_logits)).item()) or 1.0
        if float(mx.max(mx.abs(again - ref_logits)).item()) > 1e-3 * scale:
            self.hidden = None

    def head(self, h: mx.array) -> mx.array:
        return final_logits(self.model, h)

    def logits_from(self, start: int | None) -> mx.array:
        """Logits re-running layers ``start..`` (None: everything, from the tokens)."""
        if self.hidden is None or start is None:
            return self.model(self.tokens)
        h = self.hidden[start]
        for layer in self.inner.layers[start:]:
            h = layer(h, self.mask, None)
        return self.head(h)
