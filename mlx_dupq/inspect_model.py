"""``mlx-dupq inspect``: per-tensor weight statistics; for a pack also its choices and all-in bpw.

Statistics stream one tensor at a time (a pack's quantized tensors are dequantized first,
so the numbers describe the weights the model actually runs).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx


def _pack_tensors(path: Path, meta: dict):
    """(name, float weight, quant label) for every weight tensor of a pack, one at a time."""
    from .quant.packing import unpack
    from .quant.qtensor import dequantize

    entries = meta["modules"]
    for f in sorted(path.glob("model*.safetensors")):
        arrays = mx.load(str(f))
        for key in sorted(arrays):
            mod, _, param = key.rpartition(".")
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
    from .io import pack as packio
    from .io.source import open_source
    from .stats import weight_stats

    p = Path(str(model)).expanduser()
    report: dict = {"model": str(model)}
    if p.is_dir() and packio.is_pack(p):
        meta = packio.pack_summary(p)
        report["pack"] = meta
        report["bits_per_weight"] = meta["bits_per_weight"]
        items = _pack_tensors(p, meta)
    else:
        src = open_source(model)
        items = ((k, src.get(k).astype(mx.float32), "float") for k in src.keys() if k.endswith("weight"))
    rows = []
    for name, w, label in items:
        st = weight_stats(w)
        rows.append({"name": name, "shape": list(w.shape), "quant": label, **st})
        del w
    report["tensors"] = rows
    if "pack" not in report:
        # a source's bits per weight as stored on disk (a GGUF's own quantization, or the checkpoint dtype)
        path = Path(getattr(src, "path", ""))
        files = [path] if path.is_file() else list(path.glob("*.safetensors"))
        n = sum(r["numel"] for r in rows) + sum(int(src.get(k).size) for k in src.keys() if not k.endswith("weight"))
        size = sum(f.stat().st_size for f in files)
        report["bits_per_weight"] = size * 8 / n if n and size else None
    return report
