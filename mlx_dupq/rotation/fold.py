"""QuaRot-style rotation folded offline into Hugging Face weight dicts, one decoder layer at a time.

Why it is exact (computational invariance, QuaRot sec. 4 / SliceGPT). An RMSNorm without its
weight, ``n(x) = x / sqrt(mean(x^2) + eps)``, commutes with any orthogonal ``R``: ``||x R|| = ||x||``,
so ``mean((x R)^2) = mean(x^2)`` and ``n(x R) = n(x) R``. So:

1. *Fuse norms*: fold each RMSNorm weight ``g`` into the linears that read its output
   (``W <- W diag(g)``: input_layernorm into q/k/v, post_attention_layernorm into gate/up, the final
   norm into lm_head) and set ``g = 1``. The model computes the same function.
2. *Rotate the residual stream* by ``R`` (n_hidden x n_hidden): every writer gets ``R`` on its
   output and every reader ``R^T`` on its input, so they cancel:
   embedding ``E <- E R``; q/k/v/gate/up and lm_head ``W <- W R`` (they read ``x R``);
   o_proj and down_proj ``W <- R^T W`` and ``b <- b R`` (they write into the stream).
   The residual adds and the weightless norms commute with ``R``, so logits are unchanged.
3. *Head-wise rotation* (SpinQuant's R2) with ``H`` (head_dim x head_dim): each value head's output
   ``v_h <- v_h H`` (rows of v_proj: ``W_h <- H^T W_h``, bias ``b_h <- b_h H``) and o_proj's input per
   head ``W_o <- W_o blockdiag(H)``. Attention mixes value rows linearly over tokens, so the head's
   output carries ``H`` and o_proj undoes it. Grouped-query heads share ``H``, so any kv grouping works.
4. *Online rotation* where folding is impossible: the SwiGLU product before down_proj is not
   produced by a linear, so ``W_down <- W_down H_int`` offline and ``a <- a H_int`` at run time
   (:class:`mlx_dupq.layers.online_rotation.RotatedInput`). The same mechanism rotates the input of
   any chosen linear (:func:`rotate_linear_input`), which is how *partial rotation* (only the layers
   with massive activations) is done without touching the residual stream.

Mixture-of-experts layers (``deepseek``, ``qwen2_moe``, ``qwen3_moe``, ``mixtral``, ``olmoe``): every
linear of the MoE block that reads the normed stream -- the router (``gate``), each expert's
gate/up (``w1``/``w3``), the shared expert(s) and Qwen2-MoE's ``shared_expert_gate`` -- gets
``diag(g) R`` on its input, each down projection (``w2``) ``R^T`` on its output, whether the
checkpoint stores experts one by one (``mlp.experts.3.gate_proj``) or stacked (``mlp.switch_mlp.
gate_proj``, (E, out, in)). The router then sees ``x R W_r^T R``-rotated weights, i.e. the same logits,
so routing is unchanged. Online down_proj rotations apply to dense MLPs only.

Model types: ``llama``, ``mistral`` (mlx-lm runs it with the llama classes), ``qwen2`` (q/k/v biases:
an input rotation leaves them unchanged) and ``qwen3`` (``q_norm`` / ``k_norm`` normalise q and k per
head *after* the projections; the residual rotation acts only on the projections' inputs and the
head-wise rotation only on v / o_proj, so both norms see exactly the original q and k and stay
unfolded). After steps 1-3 with no online rotation the result is a plain model of the same type that
mlx-lm's classes load unchanged (with ``tie_word_embeddings`` turned off when the head was untied).

All functions take and return ``{hf_name: mx.array}`` dicts (a new dict; untouched tensors are shared),
compute in float32 and return float32 for every tensor they change.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import DupqError
from .rotations import Rotation

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "deepseek", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
MLP_PREFIXES = ("mlp.", "block_sparse_moe.")
MLP_READERS = ("gate_proj", "up_proj", "w1", "w3", "gate", "shared_expert_gate")  # read the normed stream
MLP_WRITERS = ("down_proj", "w2")  # write into the residual stream

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def check_model_type(config: dict) -> str:
    """The config's model_type if rotation folding supports it, else a DupqError."""
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise DupqError(
            f"rotation folding supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, not {mt!r}; "
            "convert without a rotation (remove [rotation] from the recipe)"
        )
    return mt


def model_dims(config: dict) -> dict[str, int]:
    """hidden, intermediate, heads, kv_heads, head_dim, layers from a Hugging Face config dict."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {
        "hidden": hidden,
        "intermediate": int(config["intermediate_size"]),
        "heads": heads,
        "kv_heads": kv,
        "head_dim": head_dim,
        "layers": int(config["num_hidden_layers"]),
    }


def _f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32)


def _require(weights: dict, key: str) -> mx.array:
    if key not in weights:
        raise DupqError(
            f"tensor {key} is missing from the model weights; "
            "the checkpoint is incomplete or not a llama/qwen layout"
        )
    return weights[key]


def rotate_in(w: mx.array, r: Rotation) -> mx.array:
    """(out, n) -> (out, n): ``W R`` (the linear now reads ``x R``)."""
    return r.apply(_f32(w))


def rotate_out(w: mx.array, r: Rotation) -> mx.array:
    """(..., n, in) -> ``R^T W`` (the linear now writes ``y R``; stacked experts too); a bias (n,) -> ``b R``."""
    if w.ndim == 1:
        return r.apply(_f32(w))
    return r.apply(_f32(w).swapaxes(-1, -2)).swapaxes(-1, -2)


def mlp_linears(weights: dict, i: int) -> tuple[list[str], list[str]]:
    """(readers, writers): weight keys of layer ``i``'s MLP / MoE block that read the normed residual
    stream and that write into it -- dense, per-expert or stacked experts, router, shared experts."""
    p = f"model.layers.{i}."
    readers, writers = [], []
    for k in weights:
        if not (k.startswith(p) and k.endswith(".weight") and k[len(p):].startswith(MLP_PREFIXES)):
            continue
        mod = k[: -len(".weight")].rsplit(".", 1)[-1]
        if mod in MLP_READERS:
            readers.append(k)
        elif mod in MLP_WRITERS:
            writers.append(k)
    if not readers or not writers:
        raise DupqError(
            f"layer {i}'s MLP projections ({p}mlp.gate_proj / up_proj / down_proj, or experts) are missing "
            "from the model weights; the checkpoint is incomplete or not a llama/qwen/MoE layout"
        )
    return sorted(readers), sorted(writers)


def _per_head(w: mx.array, r: Rotation) -> mx.array:
    """(..., heads * d) -> (..., heads * d): rotate each contiguous chunk of ``d = r.size``."""
    shape = w.shape
    return r.apply(_f32(w).reshape(*shape[:-1], shape[-1] // r.size, r.size)).reshape(shape)


def fuse_norms_layer(weights: dict, i: int) -> dict:
    """Fold layer ``i``'s input_layernorm into q/k/v and post_attention_layernorm into the MLP's readers
    (gate/up; for an MoE block the router, experts and shared experts too: :func:`mlp_linears`).

    ``W (..., out, hidden) <- W * g`` and the norm weight becomes ones (float32).
    """
    p = f"model.layers.{i}."
    out = dict(weights)
    mlp_readers = mlp_linears(weights, i)[0]
    for norm, keys in (
        ("input_layernorm", [f"{p}self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")]),
        ("post_attention_layernorm", mlp_readers),
    ):
        g = _f32(_require(weights, f"{p}{norm}.weight"))
        for key in keys:
            out[key] = _f32(_require(weights, key)) * g
        out[f"{p}{norm}.weight"] = mx.ones_like(g)
    return out


def _check_fused(weights: dict, key: str) -> None:
    g = weights.get(key)
    if g is not None and not bool(mx.all(g == 1)):
        raise ValueError(f"{key} is not folded; call fuse_norms_layer / rotate_embeddings' norm folding first")


def rotate_linear_input(weights: dict, name: str, r: Rotation) -> dict:
    """``W <- W R`` for the linear ``name`` (e.g. ``model.layers.3.mlp.down_proj``).

    Exact only together with an online rotation of that linear's input at run time
    (record ``{name: r.to_dict()}`` and install it with ``apply_online_rotations``).
    """
    key = f"{name}.weight"
    w = _require(weights, key)
    if w.shape[-1] != r.size:
        raise DupqError(
            f"{r.kind} rotation of width {r.size} does not fit {key} with {w.shape[-1]} inputs; "
            f"use a rotation of width {w.shape[-1]}"
        )
    out = dict(weights)
    out[key] = rotate_in(w, r)
    return out


def rotate_layer(
    weights: dict,
    i: int,
    r: Rotation,
    config: dict,
    *,
    head_rotation: Rotation | None = None,
    down_rotation: Rotation | None = None,
) -> dict:
    """Rotate decoder layer ``i`` (norms already fused) for a residual stream carrying ``x R``.

    r:             (hidden, hidden) residual rotation, the same for every layer and the embeddings
    head_rotation: (head_dim, head_dim) head-wise rotation of v_proj outputs / o_proj inputs
    down_rotation: (intermediate, intermediate) online rotation of down_proj's input:
                   ``W_down <- W_down H`` here; the caller installs ``H`` at run time
    """
    check_model_type(config)
    dims = model_dims(config)
    if r.size != dims["hidden"]:
        raise DupqError(
            f"residual rotation has width {r.size} but the model's hidden size is {dims['hidden']}; "
            f"build it with size {dims['hidden']}"
        )
    if head_rotation is not None and head_rotation.size != dims["head_dim"]:
        raise DupqError(
            f"head rotation has width {head_rotation.size} but head_dim is {dims['head_dim']}; "
            f"build it with size {dims['head_dim']}"
        )
    if down_rotation is not None and down_rotation.size != dims["intermediate"]:
        raise DupqError(f"down_proj rotation has width {down_rotation.size} but intermediate_size is {dims['intermediate']}")
    p = f"model.layers.{i}."
    _check_fused(weights, f"{p}input_layernorm.weight")
    _check_fused(weights, f"{p}post_attention_layernorm.weight")
    out = dict(weights)
    readers, writers = mlp_linears(weights, i)
    for key in [f"{p}self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")] + readers:
        out[key] = rotate_in(_require(weights, key), r)
    if head_rotation is not None:
        wv = f"{p}self_attn.v_proj.weight"
        out[wv] = _per_head(out[wv].T, head_rotation).T
        bv = f"{p}self_attn.v_proj.bias"
        if bv in weights:
            out[bv] = _per_head(weights[bv], head_rotation)
        wo = f"{p}self_attn.o_proj.weight"
        out[wo] = _per_head(_require(weights, wo), head_rotation)
    if down_rotation is not None and has_dense_mlp(weights, i):
        wd = f"{p}mlp.down_proj.weight"
        out[wd] = rotate_in(_require(weights, wd), down_rotation)
    for key in [f"{p}self_attn.o_proj.weight"] + writers:
        out[key] = rotate_out(_require(out, key), r)
        bias = key[: -len("weight")] + "bias"
        if bias in weights:
            out[bias] = rotate_out(weights[bias], r)
    return out


def has_dense_mlp(weights_or_keys, i: int) -> bool:
    """Whether layer ``i`` has a plain (dense) MLP, the only kind an online down_proj rotation applies to."""
    return f"model.layers.{i}.mlp.down_proj.weight" in weights_or_keys


def rotate_embeddings(weights: dict, r: Rotation, config: dict) -> tuple[dict, dict]:
    """Rotate the embedding, fold the final norm into lm_head and rotate lm_head.

    ``E <- E R``; ``W_head <- (W_head diag(g)) R`` with ``W_head = E`` when the checkpoint ties them;
    ``g <- 1``. Returns ``(weights, config_update)``: a tied model whose final norm is not all ones
    gets its own ``lm_head.weight`` and ``config_update = {"tie_word_embeddings": False}``.
    """
    check_model_type(config)
    if r.size != model_dims(config)["hidden"]:
        raise DupqError(f"residual rotation has width {r.size} but the model's hidden size is {config['hidden_size']}")
    e = _require(weights, EMBED)
    g = _f32(_require(weights, FINAL_NORM))
    out = dict(weights)
    out[EMBED] = rotate_in(e, r)
    out[FINAL_NORM] = mx.ones_like(g)
    update: dict = {}
    head = weights.get(LM_HEAD)
    if head is None and bool(mx.all(g == 1)):
        return out, update  # still tied: the rotated embedding is also the rotated head
    src = e if head is None else head
    out[LM_HEAD] = rotate_in(_f32(src) * g[None, :], r)
    update["tie_word_embeddings"] = False
    return out, update


def down_proj_name(i: int) -> str:
    """Module path of layer ``i``'s down_proj (Hugging Face and mlx-lm spell it the same)."""
    return f"model.layers.{i}.mlp.down_proj"


def fold_rotation(
    weights: dict,
    config: dict,
    r: Rotation,
    *,
    head_rotation: Rotation | None = None,
    down_rotation: Rotation | None = None,
) -> tuple[dict, dict, dict]:
    """Fuse norms and rotate a whole (in-memory) model; the streaming converter calls the per-layer steps.

    Returns ``(weights, config_update, online)`` with ``online = {module_path: rotation_dict}`` for
    the run-time rotations to record in config.json (down_proj inputs when ``down_rotation`` is set).
    """
    out, update = rotate_embeddings(weights, r, config)
    online: dict = {}
    for i in range(model_dims(config)["layers"]):
        out = fuse_norms_layer(out, i)
        dense = has_dense_mlp(out, i)
        out = rotate_layer(out, i, r, config, head_rotation=head_rotation, down_rotation=down_rotation)
        if down_rotation is not None and dense:
            online[down_proj_name(i)] = down_rotation.to_dict()
    return out, update, online
