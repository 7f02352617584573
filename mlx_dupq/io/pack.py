"""The mlx-dupq pack: a self-describing MLX model directory.

Layout (a superset of an mlx-lm model directory)::

    config.json                  the source model's config, plus
                                   "quantization": mlx-lm's per-layer map (so mlx_lm.load works
                                                   when every quantized layer uses mlx's format)
                                   "mlx_dupq":     format version, recipe, every module's entry
                                                   (kind, format, bits, group size, ...), source,
                                                   parameter count, stored bytes, all-in bpw,
                                                   and "online_rotations" {module path: rotation}
                                                   when a rotation runs at load time (then only
                                                   mlx_dupq.load gives the right outputs);
                                                   "act_ranges" {module path: clip} when the
                                                   recipe's activations are static
    model-NNNNN-of-MMMMM.safetensors   one file per streamed group (decoder layer / tensor)
    model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, ...

A module whose entry has ``format: "mlx"`` is an ``nn.QuantizedLinear`` / ``QuantizedEmbedding``
/ ``QuantizedSwitchLinear``; ``format: "dupq"`` is one of our layers (ternary, groups of
256/512, per-channel, per-tensor); ``format: "dup"`` is a duplicated linear
(:mod:`mlx_dupq.dup.feature`: copies stored as ``<path>.copies.<k>.*``, rebuilt as a
``DupLinear``; ``mlx_lm.load`` refuses such a pack, it has no tensor ``<path>.weight``).
``load_pack`` rebuilds exactly what the entries say.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..adapter import build_skeleton
from ..dup.runtime import FORMAT_DUP, expand_serial, load_dup_linear
from ..dup.specs import DupPlan
from ..errors import DupqError
from ..layers.act_quant import apply_act_quant
from ..layers.online_rotation import apply_online_rotations
from ..layers.quant_linear import build_module
from ..quant.bitpack import FORMAT_DUPQ, FORMAT_MLX
from ..specs import ActSpec
from .atomic import write_json_atomic  # noqa: F401 (re-exported: callers import it from here)

PACK_FORMAT_VERSION = 1
PROGRESS_FILE = "progress.json"


def online_key(key: str, online: dict | None) -> str:
    """Storage name of a tensor: ``<path>.linear.<param>`` when module ``<path>`` has an online rotation.

    A module behind a run-time rotation is only correct through mlx-dupq's ``RotatedInput``
    wrapper, whose inner linear lives at ``<path>.linear``. Storing its tensors there makes
    ``mlx_lm.load`` (which knows no such wrapper) fail loudly instead of running a wrong model.
    """
    if not online:
        return key
    mod, _, param = key.rpartition(".")
    return f"{mod}.linear.{param}" if mod in online else key


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def mlx_quantization_map(entries: dict[str, dict]) -> dict:
    """mlx-lm's ``quantization`` config: per-path {group_size, bits} for mlx-format modules.

    Modules in our own format are mapped to False so mlx-lm never re-quantizes them.
    """
    native = [e for e in entries.values() if e["format"] == "mlx"]
    first = native[0] if native else {"group_size": 64, "bits": 4}
    q: dict = {"group_size": first["group_size"], "bits": int(first["bits"]), "mode": "affine"}
    for path, e in sorted(entries.items()):
        q[path] = {"group_size": e["group_size"], "bits": int(e["bits"])} if e["format"] == "mlx" else False
    return q


class PartialState:
    """An in-progress conversion directory (``OUT.partial``) and its progress record."""

    def __init__(self, root: Path, data: dict):
        self.root = root
        self.data = data

    @property
    def done(self) -> dict[str, dict]:
        return self.data["done"]

    @classmethod
    def open(cls, root: Path, fingerprint: str, recipe: dict, n_groups: int, resume: bool) -> "PartialState":
        progress = root / PROGRESS_FILE
        if resume and progress.exists():
            try:
                data = json.loads(progress.read_text())
            except ValueError:
                raise DupqError(f"{progress} is damaged; pass --force to start the conversion over") from None
            if data.get("fingerprint") != fingerprint or data.get("recipe") != recipe or data.get("n_groups") != n_groups:
                raise DupqError(
                    f"{root} was started with another model or recipe; pass --force to start over"
                )
            for rec in data["done"].values():  # a group whose file vanished is redone
                if rec.get("file") and not (root / rec["file"]).exists():
                    data["done"] = {k: v for k, v in data["done"].items() if v is not rec}
            return cls(root, data)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        data = {"fingerprint": fingerprint, "recipe": recipe, "n_groups": n_groups, "done": {}}
        state = cls(root, data)
        write_json_atomic(progress, data)
        return state

    def write_group(
        self, index: int, name: str, arrays: dict[str, mx.array], entries: dict[str, dict], n_params: int, bits: int
    ) -> None:
        """Write one group's tensors to its shard and record it as done."""
        fname = None
        if arrays:
            fname = shard_name(index, self.data["n_groups"])
            tmp = self.root / f"tmp-{fname}"
            mx.save_safetensors(str(tmp), arrays, metadata={"format": "mlx"})
            os.replace(tmp, self.root / fname)
        self.done[name] = {
            "file": fname,
            "keys": sorted(arrays),
            "entries": entries,
            "n_params": n_params,
            "bits": bits,
        }
        write_json_atomic(self.root / PROGRESS_FILE, self.data)

    def finish(self, src, recipe, config_update: dict | None = None, online_rotations: dict | None = None,
               duplication: dict | None = None, extra: dict | None = None) -> dict:
        """Write config.json, the index and the tokenizer; return the pack summary.

        config_update:    changes to the source config (e.g. ``tie_word_embeddings`` after rotation)
        online_rotations: ``{module_path: rotation_dict}`` applied at run time (``load_pack``)
        duplication:      the recipe's duplication plan resolved for this model (explicit layers)
        extra:            more keys of the ``mlx_dupq`` section (the convert features' config entries)
        """
        entries: dict[str, dict] = {}
        weight_map: dict[str, str] = {}
        n_params = 0
        bits = 0
        for rec in self.done.values():
            entries.update(rec["entries"])
            n_params += rec["n_params"]
            bits += rec["bits"]
            for k in rec["keys"]:
                weight_map[k] = rec["file"]
        stored_bytes = bits // 8
        bpw = bits / n_params if n_params else 0.0
        config = {**src.config, **(config_update or {})}
        config["quantization"] = mlx_quantization_map(entries)
        config["quantization_config"] = config["quantization"]
        config["mlx_dupq"] = {
            "format_version": PACK_FORMAT_VERSION,
            "source": {"name": src.name, "fingerprint": src.fingerprint()},
            "recipe": recipe.to_dict(),
            "n_params": n_params,
            "stored_bytes": stored_bytes,
            "bits_per_weight": bpw,
            "modules": dict(sorted(entries.items())),
        }
        if online_rotations:
            config["mlx_dupq"]["online_rotations"] = dict(sorted(online_rotations.items()))
        if duplication:
            config["mlx_dupq"]["duplication"] = duplication
        config["mlx_dupq"].update(extra or {})
        write_json_atomic(self.root / "config.json", config)
        index = {"metadata": {"total_size": stored_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json_atomic(self.root / "model.safetensors.index.json", index)
        src.save_tokenizer(self.root)
        (self.root / PROGRESS_FILE).unlink()
        return config["mlx_dupq"]


# ---------------------------------------------------------------------------------------
# reading


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise DupqError(f"config.json not found in {path} (expected a Hugging Face model directory or a .gguf file)")
    try:
        return json.loads(cfg.read_text())
    except ValueError as e:
        raise DupqError(f"{cfg} is not valid JSON ({e})") from None


def is_pack(path: str | Path) -> bool:
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        return "mlx_dupq" in json.loads((p / "config.json").read_text())
    except ValueError:
        return False


def is_quantized_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory of quantized weights: a pack, or an mlx-lm quantized model."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file() and (is_pack(p) or "quantization" in read_config(p))


def weight_files(path: Path, only: Callable[[str], bool] | None = None) -> list[Path]:
    """The pack's safetensors files; with ``only``, those the index says hold a selected tensor."""
    index = path / "model.safetensors.index.json"
    if only is not None and index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise DupqError(f"{index} is damaged; convert the pack again") from None
        return [path / f for f in sorted({f for k, f in wmap.items() if only(k)})]
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise DupqError(f"no model*.safetensors in {path}; the pack is incomplete, convert it again")
    return files


def load_weights(path: Path, only: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
    """Every tensor of the pack (lazy: ``mx.load`` reads a tensor's bytes when it is evaluated);
    with ``only``, the selected tensors of the files that hold them (never another file)."""
    weights: dict[str, mx.array] = {}
    for f in weight_files(path, only):
        try:
            arrays = mx.load(str(f))
        except Exception as e:
            raise DupqError(f"{f} could not be read ({e}); the pack is damaged, convert it again") from None
        weights.update(arrays if only is None else {k: v for k, v in arrays.items() if only(k)})
    return weights


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating parameter (weights, scales, biases, norms) to ``dtype`` in place."""
    model.update(
        tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    )


def _packed_module(path: str, entry: dict, weights: dict[str, mx.array]) -> nn.Module:
    """A ``dupq`` / ``moe_mixed`` module (:func:`~mlx_dupq.layers.quant_linear.build_module`), empty."""
    # (a moe_mixed switch layer keeps its (E, out) bias as its own parameter <path>.bias)
    has_bias = f"{path}.bias" in weights or f"{path}.linear.bias" in weights
    return build_module(entry["kind"], tuple(entry["shape"]), entry, has_bias)


#: the module formats :func:`load_pack` rebuilds: ``format -> load(path, entry, weights) -> nn.Module``
#: (``weights`` may be rewritten in place: a ``dup`` entry renames its copies' tensors). ``mlx``
#: entries are mlx's own quantized layers, built by ``nn.quantize`` exactly as ``mlx_lm.load`` does.
MODULE_LOADERS: dict[str, Callable[[str, dict, dict[str, mx.array]], nn.Module]] = {
    FORMAT_DUPQ: _packed_module,
    "moe_mixed": _packed_module,
    FORMAT_DUP: load_dup_linear,
}


def load_pack(path: str | Path, compute_dtype: str = "float32", lazy: bool = False,
              activations: bool = True, only: Callable[[str], bool] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a pack's model exactly as its config.json records it.

    ``only(name)`` selects the modules and tensors (dotted names) to load, e.g. one pipeline
    stage's decoder layers (:mod:`mlx_dupq.distributed`): other tensors are never read, other
    modules keep the skeleton's lazy, never evaluated weights, and the model is evaluated only
    where selected.

    When the recorded recipe has ``activations`` (docs/quality.md, F3), every linear's input is fake-quantized
    (:mod:`mlx_dupq.layers.act_quant`); static mode uses ``mlx_dupq.act_ranges`` from config.json.
    ``activations=False`` loads the weights only (e.g. to calibrate those ranges).
    """
    path = Path(path)
    config = read_config(path)
    meta = config.get("mlx_dupq")
    if meta is None:
        raise DupqError(f"{path} is not an mlx-dupq pack (no 'mlx_dupq' section in config.json)")
    if meta.get("format_version", 0) > PACK_FORMAT_VERSION:
        raise DupqError(f"{path} was written by a newer mlx-dupq (pack format {meta['format_version']}); upgrade")
    model = build_skeleton(config)
    if (meta.get("duplication") or {}).get("mode") == "serial":  # copies are extra layer entries

        expand_serial(model, DupPlan.from_dict(meta["duplication"]))
    weights = load_weights(path, only)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    entries: dict[str, dict] = meta["modules"]
    if only is not None:
        entries = {p: e for p, e in entries.items() if only(p)}
    mods = dict(model.named_modules())

    native = {p: e for p, e in entries.items() if e["format"] == FORMAT_MLX}
    if native:
        nn.quantize(
            model,
            class_predicate=lambda p, m: (
                {"group_size": native[p]["group_size"], "bits": int(native[p]["bits"])} if p in native else False
            ),
        )
    custom = []
    for p, e in entries.items():
        if e["format"] == FORMAT_MLX:
            continue
        load_module = MODULE_LOADERS.get(e["format"])
        if load_module is None:
            raise DupqError(f"pack module {p} has format {e['format']!r}, which this mlx-dupq does not know; upgrade mlx-dupq")
        if p not in mods:
            raise DupqError(f"pack module {p} does not exist in a {config.get('model_type')} model; the pack is damaged")
        custom.append((p, load_module(p, e, weights)))
    if custom:
        model.update_modules(tree_unflatten(custom))
    rotations = meta.get("online_rotations")
    if rotations and only is not None:
        rotations = {p: r for p, r in rotations.items() if only(p)}
    if rotations:
        # the pack stores a rotated module's tensors as <path>.linear.* (see online_key), which is
        # where the wrapper puts them; mlx-lm, which cannot apply the rotation, refuses such a pack

        apply_online_rotations(model, rotations)
    model.eval()
    try:
        if only is None:
            model.load_weights(list(weights.items()), strict=True)
        else:
            _load_selected(model, weights, only)
    except ValueError as e:
        raise DupqError(f"the weights in {path} do not match its config.json ({e}); convert it again") from None
    cast_floats(model, getattr(mx, compute_dtype))
    act = (meta.get("recipe") or {}).get("activations")
    if act and activations:
        install_act_quant(model, act, meta.get("act_ranges"), path)
    if not lazy:
        mx.eval([v for k, v in tree_flatten(model.parameters()) if only is None or only(k)])
    return model, config


def _load_selected(model: nn.Module, weights: dict[str, mx.array], only: Callable[[str], bool]) -> None:
    """``load_weights`` of the selected parameters, as strict about them as a full load."""
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(k for k in params if only(k) and k not in weights)
    extra = sorted(k for k in weights if k not in params)
    if missing or extra:
        raise ValueError(f"missing {missing[:3]}, unexpected {extra[:3]}")
    shapes = sorted(k for k, v in weights.items() if v.shape != params[k].shape)
    if shapes:
        raise ValueError(f"shape of {shapes[0]} is {weights[shapes[0]].shape}, the model expects {params[shapes[0]].shape}")
    model.load_weights(list(weights.items()), strict=False)


def install_act_quant(model: nn.Module, act: dict, ranges: dict | None, path: Path) -> None:
    """Install the recipe's activation fake-quant on a loaded pack model (after its weights)."""
    spec = ActSpec.from_dict(act)
    if spec.passthrough:
        return
    if spec.mode == "static" and not ranges:
        raise DupqError(
            f"{path} asks for static activation ranges but config.json has no 'act_ranges'; convert it "
            "again, or load it with activations=False and use mlx_dupq.layers.act_quant.calibrate_static_ranges"
        )
    apply_act_quant(model, spec, ranges)


def record_act_ranges(root: Path, ranges: dict[str, float]) -> None:
    """Add the static activation ranges ``{module path: clip value}`` to a pack's config.json."""
    config = read_config(root)
    config["mlx_dupq"]["act_ranges"] = dict(sorted(ranges.items()))
    write_json_atomic(Path(root) / "config.json", config)


def pack_summary(path: str | Path) -> dict:
    """The per-module choices and all-in numbers of a pack (for ``inspect``)."""
    config = read_config(Path(path))
    meta = config.get("mlx_dupq")
    if meta is None:
        raise DupqError(f"{path} is not an mlx-dupq pack")
    return meta


def count_parameters(model: nn.Module) -> int:
    return sum(int(v.size) for _, v in tree_flatten(model.parameters()))
