"""GPTQ + coordinate-descent sweeps (``cd_sweeps``) on real linears: held-out output error and seconds per sweep.

    OPENBLAS_NUM_THREADS=1 nice -n 5 python bench/cd_sweeps.py --model qwen2.5-coder-0.5b

The float model runs ``--fit`` windows of ``--calib`` text and ``--held`` windows of ``--held-data``
(disjoint text) up to decoder layer ``--layer`` (default: the middle one); the inputs of that layer's
``--linears`` give two Hessians per linear: ``H`` (fit windows, what GPTQ and the sweeps see) and
``H_held`` (held-out windows). For every linear and spec the file records the relative held-out
output error ``tr(D H_held D^T) / tr(W H_held W^T)`` (``D = W - Q``) of RTN, GPTQ and GPTQ followed
by 1..``--sweeps`` sweeps (run one at a time with :func:`coordinate_descent` on GPTQ's damped ``H``,
which is what ``gptq_quantize(..., cd_sweeps=s)`` computes), the layer objective ``tr(D H_d D^T)``
on the fit windows, and the wall / CPU seconds of GPTQ and of each sweep (with /proc/loadavg: the
machine is shared). Writes bench/results/cd_sweeps_<model>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_dupq.eval.data import calibration_batches, load_text  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load, load_model, tokenizer_of  # noqa: E402
from mlx_dupq.layers.online_rotation import RotatedInput  # noqa: E402
from mlx_dupq.quant.gptq import HessianAccumulator, coordinate_descent, damped_hessian, gptq_quantize, layer_objective  # noqa: E402
from mlx_dupq.quant.qtensor import dequantize  # noqa: E402
from mlx_dupq.quant.rtn import rtn_quantize  # noqa: E402
from mlx_dupq.search.sensitivity import rotate_float_model  # noqa: E402
from mlx_dupq.specs import RotationSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from head_sensitivity import parse_spec  # noqa: E402


class _Stop(Exception):
    pass


class _Tap(nn.Module):
    """Wraps a linear: adds its input to the accumulator of the current phase, then runs it."""

    def __init__(self, inner, accs: dict, last: bool):
        super().__init__()
        self.inner, self.accs, self.last, self.phase = inner, accs, last, "fit"

    def __call__(self, x):
        self.accs[self.phase].add(x)
        if self.last:
            raise _Stop  # nothing after this layer is needed
        return self.inner(x)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--layer", type=int, default=None, help="decoder layer index (default: the middle one)")
    ap.add_argument("--linears", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    ap.add_argument("--calib", default="mix:calib")
    ap.add_argument("--fit", type=int, default=16, help="calibration windows for H")
    ap.add_argument("--held-data", default="mix:eval")
    ap.add_argument("--held", type=int, default=8, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--specs", default="2:64,3:128")
    ap.add_argument("--sweeps", type=int, default=4)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--rotate", action="store_true", help="the model rotated as convert --bpw rotates it (block "
                    "Hadamard folded, online Hadamard before down_proj): the linears' rotated weights and inputs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"cd_sweeps_{args.model}.json"
    specs = [parse_spec(s) for s in args.specs.split(",")]
    t0, c0 = time.time(), cpu_seconds()
    if args.rotate:
        model, config, tok_dir = load_model(args.model)
        model, tok = rotate_float_model(model, config, RotationSpec(kind="block_hadamard", online_down=True)), tokenizer_of(tok_dir, config)
    else:
        model, tok = load(args.model)
    layers = model.model.layers
    li = len(layers) // 2 if args.layer is None else args.layer
    names = args.linears.split(",")
    taps, weights = {}, {}
    for name in names:
        parent, attr = layers[li], name
        for part in name.split(".")[:-1]:
            parent = getattr(parent, part)
        attr = name.split(".")[-1]
        lin = getattr(parent, attr)
        if isinstance(lin, RotatedInput):  # tap the rotated input of the linear inside
            parent, attr, lin = lin, "linear", lin.linear
        weights[name] = lin.weight.astype(mx.float32)
        accs = {"fit": HessianAccumulator(lin.weight.shape[1]), "held": HessianAccumulator(lin.weight.shape[1])}
        taps[name] = _Tap(lin, accs, last=(name == "mlp.down_proj"))  # the layer's last linear
        setattr(parent, attr, taps[name])
    for phase, data, n, seed in (("fit", args.calib, args.fit, 0), ("held", args.held_data, args.held, 1)):
        for t in taps.values():
            t.phase = phase
        batches = calibration_batches(tok, load_text(data), n, args.seq_len, seed=seed)
        for b in range(n):
            try:
                model(batches[b : b + 1])
            except _Stop:
                pass
    capture = {"wall_seconds": time.time() - t0, "cpu_seconds": cpu_seconds() - c0}
    print(f"captured layer {li} inputs: {capture}", flush=True)

    result = {
        "command": f"OPENBLAS_NUM_THREADS=1 nice -n {os.nice(0)} python bench/cd_sweeps.py " + " ".join(sys.argv[1:]),
        "model": args.model, "rotated": args.rotate, "layer": li, "calib": args.calib, "fit_windows": args.fit, "held_data": args.held_data,
        "held_windows": args.held, "seq_len": args.seq_len, "fit_tokens": args.fit * args.seq_len,
        "held_tokens": args.held * args.seq_len, "damp": args.damp, "act_order": True, "static_groups": True,
        "error": "relative held-out output error tr(D H_held D^T) / tr(W H_held W^T), D = W - dequant(Q)",
        "objective": "tr(D H_d D^T), H_d = GPTQ's damped Hessian of the fit windows",
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "capture": capture, "rows": [],
    }
    for name in names:
        w = weights[name]
        H = taps[name].accs["fit"].finalize()
        Hh = np.array(taps[name].accs["held"].finalize(), dtype=np.float64)
        Hd = damped_hessian(H, args.damp)
        W64 = np.array(w, dtype=np.float64)
        ref = float(np.einsum("ij,ij->", W64 @ Hh, W64))

        def held(qt) -> float:
            D = W64 - np.array(dequantize(qt), dtype=np.float64)
            return float(np.einsum("ij,ij->", D @ Hh, D)) / ref

        for spec in specs:
            row = {"linear": name, "shape": list(w.shape), "spec": spec.label(), "bits": float(spec.bits),
                   "group_size": spec.group_size, "symmetric": spec.symmetric}
            rtn = rtn_quantize(w, spec, mx.float16)
            row["rtn"] = {"held_error": held(rtn), "objective": layer_objective(w, Hd, rtn)}
            load0, t, c = open("/proc/loadavg").read().strip(), time.time(), cpu_seconds()
            qt = gptq_quantize(w, H, spec, mx.float16, damp=args.damp, act_order=True)
            mx.eval(qt.codes)
            row["gptq"] = {"held_error": held(qt), "objective": layer_objective(w, Hd, qt),
                           "wall_seconds": time.time() - t, "cpu_seconds": cpu_seconds() - c, "loadavg": load0}
            row["cd"] = []
            for s in range(1, args.sweeps + 1):
                load0, t, c = open("/proc/loadavg").read().strip(), time.time(), cpu_seconds()
                prev = qt
                qt = coordinate_descent(w, Hd, qt, sweeps=1, block_size=128)
                mx.eval(qt.codes)
                wall, cpu = time.time() - t, cpu_seconds() - c
                row["cd"].append({"sweeps": s, "held_error": held(qt), "objective": layer_objective(w, Hd, qt),
                                  "codes_changed": float(mx.mean(qt.codes != prev.codes).item()),
                                  "wall_seconds": wall, "cpu_seconds": cpu, "loadavg": load0})
            g = row["gptq"]["held_error"]
            row["held_error_vs_gptq"] = {str(c["sweeps"]): c["held_error"] / g for c in row["cd"]}
            result["rows"].append(row)
            write_result(out, result)
            print(f"{name} {spec.label()}: rtn {row['rtn']['held_error']:.5f} gptq {g:.5f} "
                  + " ".join(f"cd{c['sweeps']} {c['held_error']:.5f} ({c['cpu_seconds']:.2f} cpu-s)" for c in row["cd"]),
                  flush=True)
    result["total"] = {"wall_seconds": time.time() - t0, "cpu_seconds": cpu_seconds() - c0,
                       "loadavg_end": open("/proc/loadavg").read().strip()}
    write_result(out, result)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
