"""``mlx-dupq bench``: size, all-in bits per weight, speed and memory of one or more models, one run."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
from .eval.speed import bench_speed, dir_size_bytes
from .io import pack as packio
from .io.loader import load
from .io.source import open_source


def storage_of(model_arg: str, model) -> tuple[int | None, float | None]:
    """(bytes on disk, bits per weight as stored) of MODEL; ``model`` is the loaded float/quant model.

    A pack reports its recorded all-in figure; anything else its weight files' bytes over the
    model's parameter count (for a GGUF: the GGUF's own bits per weight).
    """
    from mlx_lm.utils import get_total_parameters

    p = Path(str(model_arg)).expanduser()
    if p.is_dir() and packio.is_pack(p):
        return dir_size_bytes(p), packio.pack_summary(p)["bits_per_weight"]
    if p.is_dir() and (p / "config.json").exists():
        files = list(p.glob("*.safetensors"))
    else:
        src = open_source(model_arg)
        path = Path(getattr(src, "path", ""))
        files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    n = get_total_parameters(model)
    return size, (size * 8 / n if n and size else None)


def bench_models(names: list[str], prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 1,
                 speed: bool = True, compute_dtype: str = "float32") -> list[dict]:
    """One result dict per model, measured one after the other in this process."""
    results = []
    for name in names:
        t0 = time.time()
        model, tok = load(name, compute_dtype=compute_dtype)
        load_s = time.time() - t0
        size, bpw = storage_of(name, model)
        row = {"model": name, "size_bytes": size, "size_mib": None if size is None else size / 2**20,
               "bits_per_weight": bpw, "load_s": load_s, "compute_dtype": compute_dtype}
        if speed:
            row.update(bench_speed(model, tok, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats))
        results.append(row)
        del model
        mx.clear_cache()
    return results
