"""Streaming conversion: a float model in, an mlx-dupq pack out, one layer at a time.

The recipe decides every module's :class:`~mlx_dupq.specs.QuantSpec`; this module only
walks the source, quantizes and writes. It is the small core of docs/architecture.md ("Convert
flow"): features (duplication, MoE precision, static activation ranges, refinement) plug in
through :mod:`mlx_dupq.features.protocol` and are never named here. Peak memory is about one decoder layer (plus the
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

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ._env import release_memory
from .adapter import EMBED_KEY_RE, build_skeleton, layer_prefix, module_kind, sanitize_group  # noqa: F401
from .input_stats import LinearStats
from .calibration import Calibration
from .config import Recipe, load_recipe
from .errors import DupqError, UsageError
from .features.protocol import ConvertContext, Feature, LayerStep
from .features.table import plan_features
from .io import pack as packio
from .io.manifest import write_manifest
from .io.source import Source, open_source
from .layers.quant_linear import quantize_tensor
from .quant.bpw import tensor_bits
from .quant.gptq import HessianAccumulator
from .quant.methods import quantize_weight
from .quant.bitpack import pack
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


def _quantize_group(weights: dict[str, mx.array], modules: dict[str, nn.Module], ctx: ConvertContext,
                    features: list[Feature], stats: dict, keep: bool = False
                    ) -> tuple[dict[str, mx.array], dict[str, dict], dict[str, mx.array]]:
    """Quantize one group's weights as the recipe says.

    Returns (arrays to store, module entries, and when ``keep`` the dequantized weights under their
    weight keys, for advancing the calibration state through the quantized layer). A module a feature
    claims is quantized by that feature (:meth:`~mlx_dupq.features.protocol.Feature.quantize`);
    the others by the recipe's quantizer.
    """
    rec, storage = ctx.recipe, ctx.storage
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
        for f in features:
            spec = f.spec_for(path, spec)
        owner = next((f for f in features if f.claims(path, kind)), None)
        if owner is not None:
            q_arrays, entry, wq, fitted = owner.quantize(ctx, path, kind, w, spec, stats.get(path), keep)
            if keep:
                dequantized[key] = wq
        elif rec.quantizer.method == "rtn" and not keep:
            fitted = spec.fit(w.shape[-1])
            q_arrays, entry = quantize_chunked(w, fitted, storage)
        else:
            fitted = spec.fit(w.shape[-1])
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


def _passes(features: list[Feature], keys: list[str]) -> list[tuple[list[Feature], Callable[[str], str]]]:
    """The quantization passes of one group: ``[(features of the pass, rename of its keys)]``; one pass
    unless a feature splits the group (serial copies)."""
    split = [(i, f.passes(keys)) for i, f in enumerate(features)]
    split = [(i, p) for i, p in split if len(p) != 1 or p[0][0] is not features[i]]
    if not split:
        return [(features, lambda key: key)]
    if len(split) > 1:
        raise DupqError("two features of this recipe both split decoder layers into passes; use one of them")
    i, passes = split[0]
    return [([*features[:i], *([f] if f is not None else []), *features[i + 1:]], rename) for f, rename in passes]


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


def _start_calibration(calib: Calibration, groups: list, src: Source, plan) -> None:
    """Begin ``calib``'s hidden states from the (folded) float embedding; the embedding is not kept
    (a local of convert's held Qwen2.5-Coder-0.5B's 545 MB float32 embedding to the end)."""
    for gname, keys in groups:
        if any(EMBED_KEY_RE.search(k) for k in keys):
            w = {k: src.get(k).astype(mx.float32) for k in keys}
            calib.start(plan.fold_group(gname, w) if plan is not None else w)


def _head_stats(calib: Calibration, modules: dict[str, nn.Module], weights: dict[str, mx.array], src: Source):
    """LinearStats of the head's input: the final norm applied to the calibration hidden states."""
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
        raise UsageError(f"output {out} already exists; pass --force to overwrite it or choose another -o")
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
    head = _head_group(groups, modules, rec)
    if head is not None:  # the calibrated head goes last: it needs the final hidden states
        groups = groups[: head[0]] + groups[head[0] + 1 :] + [groups[head[0]]]
    say = progress or (lambda *a: None)
    ctx = ConvertContext(rec, src, skeleton, plan, getattr(mx, rec.dtype), len(groups), say)
    features = plan_features(ctx)

    state = packio.PartialState.open(partial, src.fingerprint(), rec.to_dict(), len(groups), resume)
    resumed = len(state.done)
    calib = None
    if rec.quantizer.calibrated or any(f.calibrates for f in features):
        say(f"calibration: {rec.quantizer.calib_samples} x {rec.quantizer.calib_seq_len} tokens of "
            f"{rec.quantizer.calib_data}", 0, len(groups))
        calib = Calibration(rec.quantizer, src.tokenizer_dir(), partial)
        index = {name: i for i, (name, _) in enumerate(groups)}
        calib.resume([index[n] for n in state.done], {i for i, (n, _) in enumerate(groups) if n.startswith("layer.")})
        if calib.h is None:  # no layer done yet: h starts from the (folded) float embedding
            _start_calibration(calib, groups, src, plan)
    # per-expert statistics of switch layers: a [moe] feature asks for them; a calibrated quantizer
    # (gptq, awq) uses them for the experts of any recipe (quant.methods.quantize_weight, per expert)
    switch_stats = any(f.switch_stats for f in features) or rec.quantizer.method in ("gptq", "awq")
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
            for pass_features, rename in _passes(features, list(weights)):
                stats, layer, wrapped = {}, None, set()
                prefix = layer_prefix(list(weights)) if gname.startswith("layer.") else None
                if calib is not None:
                    if prefix is not None:
                        layer = modules[prefix]
                        stats, wrapped = calib.capture(layer, prefix, weights, ctx.online, switch=switch_stats)
                    elif head is not None and gi == len(groups) - 1:
                        stats = {head[1]: _head_stats(calib, modules, weights, src)}
                a, e, dequantized = _quantize_group(weights, modules, ctx, pass_features, stats, keep=layer is not None)
                if prefix is not None:
                    step = LayerStep(gi, prefix, weights, a, e, dequantized, layer, calib)
                    for f in pass_features:
                        f.on_layer(ctx, step)
                    a, e, dequantized = step.arrays, step.entries, step.dequantized
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
        release_memory()  # a layer's float weights and work buffers: freed, and given back (not only to the heap)
    if calib is not None:
        calib.cleanup()
    # the features' finish (the e2e stage streams the float model) starts without the loop's last layer,
    # its statistics and the calibration states
    step = stats = layer = a = e = calib = None
    release_memory()
    say("writing config and tokenizer", len(groups), len(groups))

    try:
        extra: dict = {}
        for f in features:
            extra.update(f.config_entries())
        info = state.finish(src, rec, config_update=config_update, online_rotations=plan.online if plan else None,
                            extra=extra)
        for f in features:
            f.finish(ctx, partial)
        write_manifest(partial, rec.to_dict())  # last: a pack without its manifest was never finished
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
