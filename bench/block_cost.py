"""Per-layer cost of the convert stages on one random decoder layer of a given shape, and a projection.

    python bench/block_cost.py --shape qwen2-32b --tokens 64 --steps 2
    python bench/block_cost.py --shape smollm2-135m --tokens 256 --steps 4

One Qwen2-style decoder layer with random weights (the real model's shapes), random calibration
states ``x`` (n, L, d): the layer's GPTQ (2-bit g64, act_order, the Hessian of ``x``; ``--init rtn``
for round to nearest instead), the float
targets, and the block stage (:func:`mlx_dupq.refine.block.refine_layer`) for ``--steps`` steps of
``--batch`` x ``--tokens`` tokens; wall time of each, peak memory (``mx.get_peak_memory``). The
projection for a whole model at a recipe's training budget (``--proj-steps`` steps of
``--proj-tokens`` tokens per layer) scales the measured seconds per trained token linearly, and the
FLOP count (6 x the linears' parameters x tokens per step; attention's L^2 part left out, small at
these widths and 512 tokens) gives the time on a GPU of
``--gpu-tflops`` sustained fp32 throughput. CPU time is recorded too: on a shared machine wall time
is inflated by other jobs, CPU time / cores is what idle cores would take. Writes bench/results/block_cost_<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models.qwen2 import ModelArgs, TransformerBlock  # noqa: E402

from mlx_dupq.input_stats import layer_input_hessians, run_layer  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.config import QuantizerSpec, QuantSpec  # noqa: E402
from mlx_dupq.quant.methods import quantize_weight  # noqa: E402
from mlx_dupq.quant.bitpack import pack  # noqa: E402
from mlx_dupq.refine.block import refine_layer  # noqa: E402
from mlx_dupq.refine.spec import BlockSpec  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads, layers, total params (for bpw-free projections)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, layers=30),
    "qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                               layers=24),
    "qwen2-32b": dict(hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_key_value_heads=8, layers=64),
}


def build_layer(shape: dict) -> TransformerBlock:
    args = ModelArgs(model_type="qwen2", hidden_size=shape["hidden_size"], num_hidden_layers=1,
                     intermediate_size=shape["intermediate_size"], num_attention_heads=shape["num_attention_heads"],
                     num_key_value_heads=shape["num_key_value_heads"], rms_norm_eps=1e-6, vocab_size=32,
                     rope_theta=1e6)
    layer = TransformerBlock(args)
    for p, w in tree_flatten(layer.parameters()):
        if w.ndim == 2:  # a realistic weight scale: 1/sqrt(in)
            layer.load_weights([(p, mx.random.normal(w.shape) / w.shape[-1] ** 0.5)], strict=False)
    mx.eval(layer.parameters())
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=256, help="tokens per calibration sequence here")
    ap.add_argument("--samples", type=int, default=3, help="calibration sequences here (1 held out)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--proj-steps", type=int, default=28, help="steps per layer of the projected run")
    ap.add_argument("--proj-tokens", type=int, default=512, help="batch x tokens per step of the projected run")
    ap.add_argument("--gptq-tokens", type=int, default=8192, help="calibration tokens of the projected GPTQ")
    ap.add_argument("--gpu-tflops", type=float, default=10.0,
                    help="sustained fp32 TFLOP/s assumed for an M-series GPU (M2 Ultra peak ~27)")
    ap.add_argument("--init", default="gptq", choices=("gptq", "rtn"),
                    help="the layer's initialisation (rtn for shapes whose GPTQ this CPU cannot afford)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    mx.random.seed(0)
    mx.reset_peak_memory()
    layer = build_layer(shape)
    n_layer = sum(v.size for _, v in tree_flatten(layer.parameters()))
    x = mx.random.normal((args.samples, args.tokens, shape["hidden_size"]))
    mx.eval(x)
    res = {"command": "python bench/block_cost.py " + " ".join(sys.argv[1:]), "shape": args.shape, **shape,
           "layer_params": n_layer, "tokens": args.tokens, "samples": args.samples, "batch": args.batch}

    t, c = time.time(), time.process_time()
    floats = dict(tree_flatten(layer.parameters()))
    stats = layer_input_hessians(layer, x) if args.init == "gptq" else {
        k[: -len(".weight")]: None for k in floats if k.endswith("proj.weight")}
    arrays, entries = {}, {}
    spec = QuantSpec(2, 64)
    for rel, st in stats.items():
        qt = quantize_weight(floats[f"{rel}.weight"], spec, mx.float16, QuantizerSpec(method=args.init), st)
        a, e = pack(qt)
        mx.eval(a)
        entries[f"L.{rel}"] = dict(e, kind="linear")
        arrays.update({f"L.{rel}.{k}": v for k, v in a.items()})
    arrays.update({f"L.{k}": v for k, v in floats.items() if not k.endswith("proj.weight")})
    res["init"] = args.init
    res["init_seconds"], res["init_cpu_seconds"] = time.time() - t, time.process_time() - c
    t, c = time.time(), time.process_time()
    y = run_layer(layer, x)
    res["targets_seconds"], res["targets_cpu_seconds"] = time.time() - t, time.process_time() - c
    t, c = time.time(), time.process_time()
    bs = BlockSpec(steps=args.steps, batch=args.batch, holdout=1)
    _, _, rep = refine_layer(layer, "L", arrays, entries, x, y, bs, mx.float16, say=print)
    res["block_seconds"], res["block_cpu_seconds"] = time.time() - t, time.process_time() - c
    res["block_report"] = rep.to_dict()
    res["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    step_tokens = args.batch * args.tokens
    sec_per_token = res["block_seconds"] / (args.steps * step_tokens)  # includes the two held-out evaluations
    res["block_seconds_per_trained_token"] = sec_per_token
    cpu_per_token = res["block_cpu_seconds"] / (args.steps * step_tokens)
    L = shape["layers"]
    proj_tokens = args.proj_steps * args.proj_tokens
    flops = 6 * n_layer * proj_tokens  # forward + backward of the layer's matmuls, per layer
    res["projection"] = {
        "steps_per_layer": args.proj_steps, "tokens_per_step": args.proj_tokens, "layers": L,
        "block_hours_this_cpu": sec_per_token * proj_tokens * L / 3600,
        "init_hours_this_cpu": res["init_seconds"] * L / 3600,
        # CPU time / 2: what 2 idle cores would take (the wall times above are on a shared machine)
        "block_hours_2_idle_cores": cpu_per_token * proj_tokens * L / 2 / 3600,
        "init_hours_2_idle_cores": res["init_cpu_seconds"] * L / 2 / 3600,
        "block_flops_per_layer": flops,
        "gpu_tflops_assumed": args.gpu_tflops,
        "block_hours_gpu": flops * L / (args.gpu_tflops * 1e12) / 3600,
        "peak_memory_gb_per_layer_stage": res["peak_memory_gb"],
        "note": "peak memory: one layer in fp32 + its trainable copies + the calibration states here; "
                "the projected run's states add n x L x hidden x 4 bytes x 3 (x, float stream, targets)",
    }
    out = args.out or Path(__file__).parent / "results" / f"block_cost_{args.shape}.json"
    write_result(out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
