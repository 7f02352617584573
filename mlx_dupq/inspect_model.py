"""``mlx-dupq inspect``: per-tensor weight statistics; for a pack also its choices and all-in bpw.

Statistics stream one tensor at a time (a pack's quantized tensors are dequantized first,
so the numbers describe the weights the model actually runs). A per-expert-width switch layer
(``moe_mixed``) is one row: its effective (E, out, in) weight (copies summed, rotation undone),
labelled with its expert widths, copies and rotation; ``moe_layers`` lists them per layer.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import DupqError
from .io import pack as packio
from .io.source import open_source
from .layers.moe_linear import MixedSwitchLinear
from .quant.bitpack import unpack
from .quant.qtensor import dequantize
from .weight_stats import weight_stats


MOE_GROUP_RE = re.compile(r"^(.*)\.groups\.\d+(?:\.copies\.\d+)?$")


def moe_layer_summary(path: str, entry: dict) -> dict:
    """A moe_mixed entry -> {path, shape, expert_bits {width: count}, expert_copies {n: count}, rotation}."""
    E = entry["shape"][0]
    count = lambda xs: {str(k): int(v) for k, v in sorted(Counter(xs).items())}  # noqa: E731
    rot = entry.get("rotation")
    return {
        "path": path,
        "shape": list(entry["shape"]),
        "expert_bits": count(f"{float(b):g}" for b in entry["expert_bits"]),
        "expert_copies": count(entry.get("expert_copies") or [1] * E),
        "rotation": rot["kind"] if rot else "none",
    }


def moe_label(s: dict) -> str:
    """``moe_mixed 2b:12 4b:4 | copies x1:13 x2:3 | rotation hadamard``."""
    bits = " ".join(f"{b}b:{n}" for b, n in s["expert_bits"].items())
    copies = " ".join(f"x{c}:{n}" for c, n in s["expert_copies"].items())
    return f"moe_mixed {bits} | copies {copies} | rotation {s['rotation']}"


def _moe_weight(base: str, entry: dict, arrays: dict, files: list[Path]) -> mx.array:
    """The effective float32 (E, out, in) weight of a moe_mixed layer, built by its own module."""
    pre = base + ".groups."
    found = {k[len(base) + 1:]: v for k, v in arrays.items() if k.startswith(pre)}
    E, out, n = entry["shape"]
    m = MixedSwitchLinear(n, out, E, entry)
    want = {k for k, _ in tree_flatten(m.parameters())}
    for f in files:  # a layer split across shards
        if want <= set(found):
            break
        found.update({k[len(base) + 1:]: v for k, v in mx.load(str(f)).items() if k.startswith(pre)})
    try:
        m.load_weights(list(found.items()), strict=True)
    except ValueError as e:
        raise DupqError(f"{base}: its expert groups do not match config.json ({e}); the pack is damaged") from None
    return m.dequantized()


def _pack_tensors(path: Path, meta: dict, moe_rows: list[dict] | None = None):
    """(name, float weight, quant label) for every weight tensor of a pack, one at a time;
    ``moe_rows`` collects :func:`moe_layer_summary` of each moe_mixed layer."""
    entries = meta["modules"]
    files = sorted(path.glob("model*.safetensors"))
    done: set[str] = set()
    for f in files:
        arrays = mx.load(str(f))
        for key in sorted(arrays):
            mod, _, param = key.rpartition(".")
            moe = MOE_GROUP_RE.match(mod)
            if moe and entries.get(moe.group(1), {}).get("format") == "moe_mixed":
                base = moe.group(1)
                if base not in done:
                    done.add(base)
                    summary = moe_layer_summary(base, entries[base])
                    if moe_rows is not None:
                        moe_rows.append(summary)
                    yield f"{base}.weight", _moe_weight(base, entries[base], arrays, files), moe_label(summary)
                continue
            copy = re.match(r"^(.*)\.copies\.(\d+)$", mod)
            if copy and entries.get(copy.group(1), {}).get("format") == "dup":
                if param != "weight":
                    continue
                base, k = copy.group(1), int(copy.group(2))
                e = entries[base]["copies"][k]
                parts = {s: arrays[f"{mod}.{s}"] for s in ("weight", "scales", "biases") if f"{mod}.{s}" in arrays}
                w = dequantize(unpack(parts, e))
                yield key, w, f"copy {k} ({entries[base]['mode']}) {e['format']}:{e['bits']}b/g{e['group_size']}"
                continue
            if mod.endswith(".linear") and mod.removesuffix(".linear") in meta.get("online_rotations", {}):
                prefix, mod = mod, mod.removesuffix(".linear")
            else:
                prefix = mod
            if mod in entries:
                if param != "weight":
                    continue
                e = entries[mod]
                parts = {s: arrays[f"{prefix}.{s}"] for s in ("weight", "scales", "biases") if f"{prefix}.{s}" in arrays}
                w = dequantize(unpack(parts, e))
                label = f"{e['format']}:{e['bits']}b/g{e['group_size']}{'s' if e.get('symmetric') else ''}"
                yield key, w, label
            elif param == "weight":
                yield key, arrays[key].astype(mx.float32), "float"


def inspect_model(model: str) -> dict:
    """A JSON-able report: ``tensors`` (stats per weight) and, for a pack, ``pack`` + ``bits_per_weight``."""
    p = Path(str(model)).expanduser()
    report: dict = {"model": str(model)}
    if p.is_dir() and packio.is_pack(p):
        meta = packio.pack_summary(p)
        report["pack"] = meta
        report["bits_per_weight"] = meta["bits_per_weight"]
        report["moe_layers"] = []
        items = _pack_tensors(p, meta, report["moe_layers"])
    else:
        src = open_source(model)
        items = ((k, src.get(k).astype(mx.float32), "float") for k in src.keys() if k.endswith("weight"))
    rows = []
    for name, w, label in items:
        st = weight_stats(w)
        rows.append({"name": name, "shape": list(w.shape), "quant": label, **st})
        del w
    report["tensors"] = rows
    if not report.get("moe_layers"):
        report.pop("moe_layers", None)
    if "pack" not in report:
        # a source's bits per weight as stored on disk (a GGUF's own quantization, or the checkpoint dtype)
        path = Path(getattr(src, "path", ""))
        files = [path] if path.is_file() else list(path.glob("*.safetensors"))
        n = sum(r["numel"] for r in rows) + sum(int(src.get(k).size) for k in src.keys() if not k.endswith("weight"))
        size = sum(f.stat().st_size for f in files)
        report["bits_per_weight"] = size * 8 / n if n and size else None
    return report
