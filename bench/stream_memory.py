"""Streaming-conversion memory check on Qwen2-32B-shaped layers (issue: peak ~ one layer).

Writes random bf16 models with Qwen2-32B's layer shapes (hidden 5120, intermediate 27648,
40 heads / 8 KV heads, vocab 152064, untied lm_head) with 2 and with 6 decoder layers,
sharded like Hugging Face checkpoints (~5 GB files), converts each with ``mlx-dupq convert``
in a subprocess and records that subprocess's peak RSS. Streaming means the 6-layer peak is
within 25 % of the 2-layer peak.

    python bench/stream_memory.py --work /tmp/dupq-stream --bits 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_dupq.io.atomic import write_result
from mlx_dupq.testing import make_tokenizer

QWEN2_32B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=5120, intermediate_size=27648,
    num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-6, vocab_size=152064,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
)
SHARD_BYTES = 5 * 2**30


def layer_shapes(i: int, c: dict) -> dict[str, tuple[int, ...]]:
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
        p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
    }


def write_model(path: Path, n_layers: int, seed: int = 0) -> None:
    """Random bf16 Qwen2-32B-shaped model with ``n_layers`` layers, HF-style shards + a tokenizer."""
    c = dict(QWEN2_32B, num_hidden_layers=n_layers)
    path.mkdir(parents=True, exist_ok=True)
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"])}
    for i in range(n_layers):
        shapes.update(layer_shapes(i, c))
    shapes["model.norm.weight"] = (c["hidden_size"],)
    shapes["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
    mx.random.seed(seed)
    shard: dict[str, mx.array] = {}
    size, n = 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            mx.save_safetensors(str(path / f"model-{n:05d}.safetensors"), shard, metadata={"format": "pt"})
            shard, size = {}, 0

    for k, s in shapes.items():
        a = (1.0 + 0.0 * mx.zeros(s)) if "norm" in k else mx.random.normal(s) * 0.02
        shard[k] = a.astype(mx.bfloat16)
        mx.eval(shard[k])
        size += shard[k].nbytes
        if size >= SHARD_BYTES:
            flush()
    flush()
    (path / "config.json").write_text(json.dumps(c, indent=2))  # not a result: the made-up model's config
    make_tokenizer(path)


def convert_peak(src: Path, out: Path, bits: str) -> dict:
    """Run ``mlx-dupq convert`` in a child process; return its own peak RSS (os.wait4) and time."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "mlx_dupq.cli", "convert", str(src), "-o", str(out), "--bits", bits, "--force"]
    log = out.with_name(out.name + ".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert failed: {log.read_text()[-2000:]}")
    cfg = json.loads((out / "config.json").read_text())["mlx_dupq"]
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.time() - t0,
            "bits_per_weight": cfg["bits_per_weight"], "n_params": cfg["n_params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dupq-stream"))
    ap.add_argument("--bits", default="2")
    ap.add_argument("--layers", default="2,6")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stream_memory.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--write", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_model(Path(args.write[0]), int(args.write[1]))
        return
    rows = []
    for n in sorted(int(x) for x in args.layers.split(",")):
        src = args.work / f"qwen2-32b-shape-{n}L"
        if not (src / "config.json").exists():
            # in a child process: a parent grown by writing would hand its peak RSS to the
            # convert child (the RSS high-water mark survives fork + exec)
            print(f"writing {src}", flush=True)
            subprocess.run([sys.executable, __file__, "--write", str(src), str(n)], check=True)
        disk = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"converting {n} layers", flush=True)
        r = convert_peak(src, args.work / f"out-{n}L", args.bits)
        r.update(layers=n, source_gib=disk / 2**30, layer_gib_bf16=None)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(args.work / f"out-{n}L", ignore_errors=True)
    c = QWEN2_32B
    layer_params = sum(int(mx.prod(mx.array(s)).item()) for s in layer_shapes(0, dict(c, num_hidden_layers=1)).values())
    for r in rows:
        r["layer_gib_bf16"] = layer_params * 2 / 2**30
    growth = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"] - 1
    result = {
        "command": "python bench/stream_memory.py " + " ".join(sys.argv[1:]),
        "config": {k: v for k, v in c.items() if k != "architectures"},
        "rows": rows,
        "peak_growth": growth,
        "target": "peak RSS growth < 25 % from 2 to 6 layers",
        "passed": growth < 0.25,
    }
    write_result(args.out, result)
    print(f"peak growth {growth * 100:.1f} % -> {args.out}")


if __name__ == "__main__":
    main()
