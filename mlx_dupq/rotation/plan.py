"""A recipe's :class:`~mlx_dupq.config.RotationSpec` applied to a streamed model, group by group.

The converter streams a model as groups (all non-layer tensors together, then one group per
decoder layer). :func:`plan_rotation` builds the rotations once from the spec and the model's
config; :meth:`RotationPlan.fold_group` folds one group's Hugging Face weight dict with the
functions of :mod:`.fold`. Everything the pack must record is known before the first group:

- ``config_update``: config.json changes (``tie_word_embeddings: False`` when QuaRot unties
  the head: ``lm_head = E diag(g) R`` becomes its own tensor),
- ``online``: ``{module_path: rotation_dict}`` of the run-time rotations,

so an interrupted conversion resumes by rebuilding the same plan.

Whole model (``layers`` None): every layer's norms are fused and the residual stream rotated by
``R`` (plus the optional head-wise Hadamard on V/O and the online Hadamard on down_proj's input,
dense MLPs only; mixture-of-experts blocks are rotated whole: router, experts, shared experts).
Partial (``layers`` given): the residual stream is left alone; each chosen layer gets its norms
fused and its q/k/v/gate/up inputs rotated by ``R`` at run time, the head-wise Hadamard folded
offline and the down_proj Hadamard at run time as above.

The head and down_proj rotations are always seeded block Hadamards (full where the width
allows): they are applied per head or at run time, where a Hadamard is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from ..specs import RotationSpec
from ..errors import DupqError
from .fold import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    check_model_type,
    down_proj_name,
    fuse_norms_layer,
    has_dense_mlp,
    model_dims,
    rotate_embeddings,
    rotate_layer,
    rotate_linear_input,
)
from .rotations import Rotation, identity, make_rotation

EMBED_GROUP = "embeddings"
INPUT_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


@dataclass
class RotationPlan:
    spec: RotationSpec
    config: dict
    residual: Rotation  # (hidden, hidden)
    head: Rotation | None  # (head_dim, head_dim)
    down: Rotation | None  # (intermediate, intermediate)
    layers: tuple[int, ...]
    config_update: dict = field(default_factory=dict)
    online: dict[str, dict] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return self.spec.layers is not None

    def fold_group(self, name: str, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """One streamed group's weights (Hugging Face names) with the rotation folded in."""
        if name == EMBED_GROUP:
            out, update = rotate_embeddings(weights, self.residual, self.config)
            if update != self.config_update:
                raise DupqError(f"rotating the embeddings changed the config by {update}, not {self.config_update} "
                                "as planned; the checkpoint's tensors do not match its config.json")
            return out
        if not name.startswith("layer."):
            return weights
        i = int(name.split(".", 1)[1])
        if i not in self.layers:
            return weights
        out = fuse_norms_layer(weights, i)
        if not self.partial:
            return rotate_layer(out, i, self.residual, self.config, head_rotation=self.head, down_rotation=self.down)
        hidden = self.residual.size
        out = rotate_layer(out, i, identity(hidden), self.config, head_rotation=self.head, down_rotation=self.down)
        for lin in INPUT_READERS:
            out = rotate_linear_input(out, f"model.layers.{i}.{lin}", self.residual)
        return out


def plan_rotation(spec: RotationSpec, config: dict, keys: list[str], get: Callable[[str], mx.array]) -> RotationPlan:
    """The rotations for a model (``keys``/``get``: its tensor names and a reader, for the final norm)."""
    check_model_type(config)
    moe = bool(config.get("n_routed_experts") or config.get("num_experts") or config.get("num_local_experts"))
    if moe and spec.layers is not None:
        raise DupqError(
            f"partial rotation (rotation.layers) is not supported for mixture-of-experts models "
            f"({config.get('model_type')}): experts cannot rotate their input at run time; rotate the whole model "
            "(remove rotation.layers)"
        )
    dims = model_dims(config)
    if spec.layers is None:
        layers = tuple(range(dims["layers"]))
    else:
        bad = [i for i in spec.layers if i >= dims["layers"]]
        if bad:
            raise DupqError(
                f"rotation layers {bad} do not exist; the model has layers 0..{dims['layers'] - 1}"
            )
        layers = spec.layers
    residual = make_rotation(spec.residual(), dims["hidden"])
    head = make_rotation({"kind": "block_hadamard", "seed": spec.seed + 1}, dims["head_dim"]) if spec.head else None
    down = (
        make_rotation({"kind": "block_hadamard", "seed": spec.seed + 2}, dims["intermediate"])
        if spec.online_down
        else None
    )
    plan = RotationPlan(spec, config, residual, head, down, layers)
    if spec.layers is None:
        if EMBED not in keys or FINAL_NORM not in keys:
            raise DupqError(f"rotation needs {EMBED} and {FINAL_NORM}; the checkpoint is not a llama/qwen layout")
        if LM_HEAD in keys or not bool(mx.all(get(FINAL_NORM) == 1)):
            plan.config_update["tie_word_embeddings"] = False
    else:
        for i in layers:
            for lin in INPUT_READERS:
                plan.online[f"model.layers.{i}.{lin}"] = residual.to_dict()
    if down is not None:  # dense MLPs only (an MoE block's experts have no single down_proj)
        for i in layers:
            if has_dense_mlp(keys, i):
                plan.online[down_proj_name(i)] = down.to_dict()
    return plan
