"""Streaming conversion: a float model in, an mlx-dupq pack out, one layer at a time.

The recipe decides every module's :class:`~mlx_dupq.config.QuantSpec`; this module only
walks the source, quantizes and writes. Peak memory is about one decoder layer (plus the
largest single non-layer tensor, e.g. the embedding), never the whole model.

Crash safety: everything is written into ``OUT.partial/`` and renamed to ``OUT`` at the end.
Each finished group (one decoder layer, or one non-layer tensor) is recorded in
``OUT.partial/progress.json``; ``resume=True`` continues an interrupted conversion without
redoing those groups.

Rotation: when the recipe has a ``rotation``, each group is folded (norms fused, weights rotated,
see :mod:`mlx_dupq.rotation.plan`) before it is quantized. The non-layer tensors then form one
group (embedding, final norm and lm_head are rotated together); the config changes and the
run-time rotations are planned up front and recorded in the pack's config.json.
"""

from __future__ import annotations

import re

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .config import Recipe, load_recipe
from .errors import DupqError
from .io import pack as packio
from .io.source import Source, open_source
from .quant.bpw import tensor_bits
from .calib_state import EMBED_KEY_RE, Calibration, layer_prefix
from .dup.convert import check_dup_recipe, group_passes, planned_copies, quantize_dup_linear
from .layers.quant_linear import quantize_tensor
from .quant.methods import quantize_weight
from .quant.packing import pack
from .quant.qtensor import dequantize
from .rotation.fold import FINAL_NORM
from .rotation.plan import EMBED_GROUP, RotationPlan, plan_rotation

Progress = Callable[[str, int, int], None]  # (message, done, total)
CHUNK_ELEMS = 1 << 26  # quantize big tensors in row blocks of ~64M weights


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    bits_per_weight: float
    n_params: int
    stored_bytes: int
    seconds: float
    groups_total: int
    groups_resumed: int


def module_kind(module: nn.Module) -> str | None:
    """'linear' | 'embedding' | 'switch_linear' for quantizable modules, else None."""
    from mlx_lm.models.switch_layers import SwitchLinear

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, SwitchLinear):
        return "switch_linear"
    return None


def quantize_chunked(w: mx.array, spec, dtype) -> tuple[dict[str, mx.array], dict]:
    """quantize_tensor over row blocks so that temporaries stay small; same result.

    Row blocks are independent for group / channel granularity; per-tensor (-1) needs the
    whole tensor and is quantized in one piece.
    """
    rows = w.shape[-2] if w.ndim >= 2 else 1
    if w.ndim != 2 or spec.group_size == -1 or w.size <= CHUNK_ELEMS:
        return quantize_tensor(w.astype(mx.float32), spec, dtype)
    step = max(1, CHUNK_ELEMS // w.shape[-1])
    parts: list[dict[str, mx.array]] = []
    entry: dict = {}
    for r in range(0, rows, step):
        arrays, entry = quantize_tensor(w[r : r + step].astype(mx.float32), spec, dtype)
        mx.eval(arrays)
        parts.append(arrays)
    merged = {k: mx.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    mx.eval(merged)
    return merged, entry


def _quantize_group(weights: dict[str, mx.array], modules: dict[str, nn.Module], rec: Recipe, storage,
                    stats: dict, keep: bool = False,
                    dup=None, moe=None) -> tuple[dict[str, mx.array], dict[str, dict], dict[str, mx.array]]:
    """Quantize one group's weights as the recipe says.

    Returns (arrays to store, module entries, and when ``keep`` the dequantized weights under their
    weight keys, for advancing the calibration state through the quantized layer). ``dup``: the
    recipe's duplication plan resolved for this model; linears of its layers are stored as copies
    (:func:`mlx_dupq.dup.convert.quantize_dup_linear`).
    """
    arrays: dict[str, mx.array] = {}
    entries: dict[str, dict] = {}
    dequantized: dict[str, mx.array] = {}
    for key in sorted(weights):
        w = weights[key]
        path, _, param = key.rpartition(".")
        mod = modules.get(path)
        kind = module_kind(mod) if mod is not None else None
        spec = rec.spec_for(path) if kind and param == "weight" else None
        if spec is None:
            arrays[key] = w.astype(storage) if mx.issubdtype(w.dtype, mx.floating) else w
            continue
        if moe is not None:  # expert-wise precision (SPEC F6.4): shared experts' spec, per-expert widths
            spec = moe.linear_specs.get(path, spec)
        expert_specs = moe.expert_specs(path, spec) if moe is not None and kind == "switch_linear" else None
        fitted = spec.fit(w.shape[-1])
        copy_specs = planned_copies(dup, path) if kind == "linear" else None
        dplan = dup
        if moe is not None and path in moe.linear_copies:  # shared expert as residual copies (SPEC F6.5)
            from .moe.duplication import shared_dup_plan

            dplan, copy_specs = shared_dup_plan(moe.linear_copies[path])
        if expert_specs is not None:
            q_arrays, entry, wq = _quantize_switch(w, path, expert_specs, moe, rec, storage, stats.get(path), keep)
            fitted = spec  # the entry records its own groups
            if keep:
                dequantized[key] = wq
        elif copy_specs is not None:
            q_arrays, entry, wq = quantize_dup_linear(w, fitted, copy_specs, dplan, storage, stats.get(path), keep,
                                                      rec.quantizer)
            if keep:
                dequantized[key] = wq
        elif rec.quantizer.method == "rtn" and not keep:
            q_arrays, entry = quantize_chunked(w, fitted, storage)
        else:
            qt = quantize_weight(w.astype(mx.float32), fitted, storage, rec.quantizer, stats.get(path))
            q_arrays, entry = pack(qt)
            if keep:
                dequantized[key] = dequantize(qt)
        entry = dict(entry, kind=kind, shape=list(w.shape))
        if fitted != spec:
            entry["requested_group_size"] = spec.group_size
        entries[path] = entry
        for suffix, a in q_arrays.items():
            arrays[f"{path}.{suffix}"] = a
    return arrays, entries, dequantized


def _quantize_switch(w: mx.array, path: str, expert_specs, moe, rec: Recipe, storage, stats=None,
                     keep: bool = False) -> tuple[dict, dict, mx.array | None]:
    """A switch layer (E, out, in) with the expert plan's widths, copies and rotation
    -> (arrays, moe_mixed entry, when ``keep`` the dequantized (E, out, in) float32 weight).

    A calibrated quantizer (gptq, awq) with the layer's :class:`~mlx_dupq.calib.SwitchStats` quantizes
    each expert's first copy on its own against that expert's statistics (:func:`_expert_quantizer`);
    without statistics (or for residual copies >= 2) it falls back to ``mse`` like any stacked weight.
    """
    from .layers.moe_linear import quantize_experts

    rotation = moe.rotation_for(w.shape[-1])
    quantize = (None if rec.quantizer.method == "rtn"
                else lambda wg, s: pack(quantize_weight(wg.astype(mx.float32), s, storage, rec.quantizer, None)))
    first, fallback = None, []
    if rec.quantizer.calibrated and stats is not None:
        first = _expert_quantizer(stats, rec.quantizer, storage, rotation, fallback)
    arrays, entry = quantize_experts(w, [s.fit(w.shape[-1]) for s in expert_specs], storage, quantize=quantize,
                                     copies=moe.copies_for(path), rotation=rotation, first_copy=first)
    if first is not None:  # experts no calibration row reached (quantized with mse)
        entry["calib_fallback_experts"] = sorted(fallback)
    wq = None
    if keep:
        from .layers.quant_linear import build_module

        m = build_module("switch_linear", tuple(w.shape), entry)
        m.load_weights(list(arrays.items()))
        wq = m.dequantized()  # in the input's basis: Q(W R) R^T
    return arrays, entry, wq


def _expert_quantizer(stats, quantizer, storage, rotation, fallback: list[int]):
    """``first_copy(w_group (n_g, out, in), spec, ids) -> (arrays, entry)`` for
    :func:`~mlx_dupq.layers.moe_linear.quantize_experts`: expert ``ids[i]`` is quantized alone,
    (out, in), with ``quantize_weight`` and its own :class:`~mlx_dupq.calib.LinearStats`
    (``stats.expert(e)``; in the rotated basis ``R^T H R`` when the experts are rotated), and the
    QTensors are stacked and packed. An expert without statistics gets ``mse`` and its id is
    appended to ``fallback``. Per-tensor specs (one scale for the whole stack) stay stacked ``mse``.
    """
    import dataclasses

    from .quant.qtensor import QTensor

    R = None if rotation is None else rotation.matrix()

    def first_copy(wg: mx.array, spec, ids: list[int]):
        if spec.group_size == -1:
            fallback.extend(ids)
            return pack(quantize_weight(wg.astype(mx.float32), spec, storage, quantizer, None))
        qts = []
        for i, e in enumerate(ids):
            st = stats.expert(e)
            if st is None:
                fallback.append(e)
            elif R is not None:  # x R is what the stored W R sees; E|x R| is not kept, its RMS stands in
                h = R.T @ st.hessian @ R
                st = dataclasses.replace(st, hessian=h, mean_abs=mx.sqrt(mx.maximum(mx.diagonal(h), 0.0)))
            qt = quantize_weight(wg[i].astype(mx.float32), spec, storage, quantizer, st)
            mx.eval(qt.codes, qt.scales, *([] if qt.biases is None else [qt.biases]))
            qts.append(qt)
        return pack(QTensor(codes=mx.stack([q.codes for q in qts]), scales=mx.stack([q.scales for q in qts]),
                            biases=None if qts[0].biases is None else mx.stack([q.biases for q in qts]),
                            spec=qts[0].spec))

    return first_copy


def sanitize_group(skeleton: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """``skeleton.sanitize`` for the weights of one streamed group (one decoder layer, or the rest).

    Stacks per-expert checkpoint tensors (``mlp.experts.E.up_proj``) into ``switch_mlp``. mlx-lm's
    qwen2_moe / mixtral / olmoe ``sanitize`` only stacks when *layer 0's* first expert is among the
    weights (it is written for a whole checkpoint), so a layer's weights are renamed to layer 0,
    sanitized, and renamed back.
    """
    if not hasattr(skeleton, "sanitize"):
        return weights
    from .calib_state import layer_prefix

    prefix = layer_prefix(list(weights))
    if prefix is None:
        return skeleton.sanitize(weights)
    zero = re.sub(r"\d+$", "0", prefix)
    renamed = {zero + k[len(prefix):] if k.startswith(prefix + ".") else k: v for k, v in weights.items()}
    out = skeleton.sanitize(renamed)
    return {prefix + k[len(zero):] if k.startswith(zero + ".") else k: v for k, v in out.items()}


def _fail_write(path: Path, e: OSError) -> DupqError:
    return DupqError(
        f"could not write {path} ({e.strerror or e}); free disk space or choose another output "
        "directory, then rerun with --resume"
    )


def _stream_groups(src: Source, rotated: bool = False) -> list[tuple[str, list[str]]]:
    """Decoder layers as groups; every non-layer tensor (embedding, norm, lm_head) on its own,
    or all of them in one group when ``rotated`` (a residual rotation changes them together)."""
    out: list[tuple[str, list[str]]] = []
    for name, keys in src.groups():
        if name == "other" and rotated:
            out.append((EMBED_GROUP, keys))
        elif name == "other":
            out += [(k, [k]) for k in keys]
        else:
            out.append((name, keys))
    return out


def _head_group(groups: list[tuple[str, list[str]]], modules: dict[str, nn.Module], rec: Recipe) -> tuple[int, str] | None:
    """(index of the group holding ``lm_head``, "lm_head") when the recipe calibrates the head
    (``quantizer.calib_head``) and the model has a separate ``lm_head``. A tied embedding is also the
    input embedding: fitting it to the head's statistics alone made a tiny model's output error larger
    than ``mse`` (tests/test_calibrated_convert.py), so it keeps ``mse``. A rotated model whose final
    norm is not all ones gets an untied head, which is calibrated."""
    if not (rec.quantizer.calibrated and rec.quantizer.calib_head):
        return None
    if not isinstance(modules.get("lm_head"), nn.Linear) or rec.spec_for("lm_head") is None:
        return None
    for gi, (gname, keys) in enumerate(groups):
        if gname == EMBED_GROUP or "lm_head.weight" in keys:
            return gi, "lm_head"
    return None


def _head_stats(calib: Calibration, modules: dict[str, nn.Module], weights: dict[str, mx.array], src: Source):
    """LinearStats of the head's input: the final norm applied to the calibration hidden states."""
    from .calib import LinearStats
    from .quant.gptq import HessianAccumulator

    norm_key = FINAL_NORM if FINAL_NORM in weights or FINAL_NORM in src.keys() else None
    x = calib.h
    if norm_key is not None:
        norm = modules[norm_key.rpartition(".")[0]]
        w = weights[norm_key] if norm_key in weights else src.get(norm_key)
        norm.load_weights([("weight", w.astype(mx.float32))])
        x = norm(x)
    flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    acc = HessianAccumulator(flat.shape[-1])
    acc.add(flat)
    return LinearStats(acc.finalize(), mx.abs(flat).mean(axis=0), int(flat.shape[0]))


def build_skeleton(config: dict) -> nn.Module:
    """The mlx-lm model for ``config`` with lazy (never evaluated) random weights."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except ValueError:
        raise DupqError(
            f"model type {config.get('model_type')!r} is not supported by mlx-lm; "
            "use a Qwen2/Qwen3/Llama/DeepSeek-MoE style model"
        ) from None
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise DupqError(f"config.json does not describe a valid {config.get('model_type')} model ({e})") from None


def convert(
    model: str | Path,
    out: str | Path,
    recipe: Recipe | str | Path | None = None,
    *,
    bits: float | str | None = None,
    group_size: int | str | None = None,
    symmetric: bool | None = None,
    dtype: str | None = None,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Quantize ``model`` (named model, HF dir, hub id or .gguf) into the pack directory ``out``.

    ``bits`` / ``group_size`` / ``symmetric`` override the recipe's default spec; ``dtype``
    its storage dtype. Returns where the pack went and its all-in bits per weight.
    """
    t0 = time.time()
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    rec = rec.with_overrides(bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
    out = Path(out).expanduser()
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not force:
        raise DupqError(f"output {out} already exists; pass --force to overwrite it or choose another -o")
    if partial.exists() and not resume:
        if not force:
            raise DupqError(
                f"{partial} holds an interrupted conversion; pass --resume to continue it or --force to start over"
            )
        shutil.rmtree(partial)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fail_write(out.parent, e) from None

    src = open_source(model)
    plan: RotationPlan | None = None
    if rec.rotation is not None:
        plan = plan_rotation(rec.rotation, src.config, src.keys(), lambda k: src.get(k).astype(mx.float32))
    config_update = plan.config_update if plan else {}
    skeleton = build_skeleton({**src.config, **config_update})
    modules = dict(skeleton.named_modules())
    groups = _stream_groups(src, rotated=plan is not None and not plan.partial)
    storage = getattr(mx, rec.dtype)
    dup = check_dup_recipe(rec, skeleton, plan.online if plan else None)
    head = _head_group(groups, modules, rec)
    if head is not None:  # the calibrated head goes last: it needs the final hidden states
        groups = groups[: head[0]] + groups[head[0] + 1 :] + [groups[head[0]]]
    moe = None
    if rec.moe is not None:  # expert-wise precision: score the experts on calibration text (SPEC F6.4)
        from .moe.precision import plan_for_convert, scoring_message

        (progress or (lambda *a: None))(scoring_message(rec), 0, len(groups))
        moe = plan_for_convert(rec, model, skeleton)

    state = packio.PartialState.open(partial, src.fingerprint(), rec.to_dict(), len(groups), resume)
    resumed = len(state.done)
    say = progress or (lambda *a: None)
    calib = None
    if rec.quantizer.calibrated:
        say(f"calibration: {rec.quantizer.calib_samples} x {rec.quantizer.calib_seq_len} tokens of "
            f"{rec.quantizer.calib_data}", 0, len(groups))
        calib = Calibration(rec.quantizer, src.tokenizer_dir(), partial)
        index = {name: i for i, (name, _) in enumerate(groups)}
        calib.resume([index[n] for n in state.done], {i for i, (n, _) in enumerate(groups) if n.startswith("layer.")})
        if calib.h is None:  # no layer done yet: h starts from the (folded) float embedding
            for gname, keys in groups:
                if any(EMBED_KEY_RE.search(k) for k in keys):
                    w = {k: src.get(k).astype(mx.float32) for k in keys}
                    calib.start(plan.fold_group(gname, w) if plan is not None else w)
    for gi, (gname, keys) in enumerate(groups):
        say(f"quantizing {gname}", gi, len(groups))
        if gname in state.done:
            continue
        weights = {k: src.get(k) for k in keys}
        added = 0  # parameters the fold creates (an untied lm_head): stored, not the model's own
        if plan is not None:
            folded = plan.fold_group(gname, {k: v.astype(mx.float32) for k, v in weights.items()})
            added = sum(int(v.size) for k, v in folded.items() if k not in weights)
            weights = folded
        weights = sanitize_group(skeleton, weights)
        # the bpw denominator is the source model's parameter count (a tied embedding once)
        n_params = (sum(int(v.size) for v in weights.values()) - added) if weights else 0
        arrays, entries = {}, {}
        try:
            # one pass per serial copy of this layer (each calibrated at its own input), else one
            for sub, rename in group_passes(dup, list(weights)):
                stats, layer, prefix, wrapped = {}, None, None, set()
                if calib is not None:
                    prefix = layer_prefix(list(weights)) if gname.startswith("layer.") else None
                    if prefix is not None:
                        layer = modules[prefix]
                        stats, wrapped = calib.capture(layer, prefix, weights, plan.online if plan else {},
                                                       switch=moe is not None)
                    elif head is not None and gi == len(groups) - 1:
                        stats = {head[1]: _head_stats(calib, modules, weights, src)}
                a, e, dequantized = _quantize_group(weights, modules, rec, storage, stats, keep=layer is not None,
                                                    dup=sub, moe=moe)
                if plan is not None and plan.online:
                    a = {packio.online_key(k, plan.online): v for k, v in a.items()}
                mx.eval(a)
                if layer is not None:
                    calib.advance(layer, prefix, dequantized, wrapped, gi)
                del dequantized
                arrays.update({rename(k): v for k, v in a.items()})
                entries.update({rename(k): v for k, v in e.items()})
            del weights
            state.write_group(gi, gname, arrays, entries, n_params, tensor_bits(arrays))
            if layer is not None:
                calib.prune(gi)
        except OSError as e:
            raise _fail_write(partial, e) from None
        del arrays
        mx.clear_cache()
    if calib is not None:
        calib.cleanup()
    say("writing config and tokenizer", len(groups), len(groups))

    try:
        info = state.finish(src, rec, config_update=config_update, online_rotations=plan.online if plan else None,
                            duplication=None if dup is None else dup.to_dict())
        if rec.activations is not None and rec.activations.mode == "static" and not rec.activations.passthrough:
            from .layers.act_quant import calibrate_pack_ranges

            say("calibrating static activation ranges", len(groups), len(groups))
            calibrate_pack_ranges(partial, rec)  # the finished pack's inputs -> config.json act_ranges
    except OSError as e:
        raise _fail_write(partial, e) from None
    try:
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(out)
    except OSError as e:
        raise _fail_write(out, e) from None
    return ConvertResult(
        path=out,
        bits_per_weight=info["bits_per_weight"],
        n_params=info["n_params"],
        stored_bytes=info["stored_bytes"],
        seconds=time.time() - t0,
        groups_total=len(groups),
        groups_resumed=resumed,
    )
