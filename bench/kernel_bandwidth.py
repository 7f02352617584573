"""CUDA kernel correctness and bandwidth vs mx.quantized_matmul and a dense fp16 GEMV.

    python bench/kernel_bandwidth.py [--peak-gbps 3350] [--out bench/results/kernel_bandwidth.json]

Needs the CUDA build of mlx on an NVIDIA GPU; elsewhere it exits 1 with one line. For each
format (2/3/1-bit, ternary; g64/g128/per-channel) and shape it (1) checks the CUDA gqmv kernel
against the plain-mx reference, (2) times single-token GEMV, a fused Hadamard GEMV and a k-copy
pass, and reports bytes moved / time as a share of ``--peak-gbps`` (default: a table by device
name). Bytes moved = packed weights + scales + offsets + x + y, the minimum a GEMV must read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_dupq.io.atomic import write_result  # noqa: E402

PEAKS_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0,
              "L40S": 864.0, "L4": 300.0, "RTX 4090": 1008.0, "A10": 600.0}
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
FORMATS = ((2, 64, False), (2, 128, False), (3, 64, False), (1, 64, False), (1.58, 128, True), (2, 0, True))


def fail(msg: str) -> None:
    print(f"kernel_bandwidth: {msg}", file=sys.stderr)
    raise SystemExit(1)


def timeit(fn, reps: int = 50) -> float:
    import mlx.core as mx

    for _ in range(5):
        mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak-gbps", type=float, default=None, help="the card's peak memory bandwidth (GB/s)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/kernel_bandwidth.json"))
    ap.add_argument("--copies", type=int, default=2)
    args = ap.parse_args()
    try:
        import mlx.core as mx
    except ImportError:
        fail("mlx is not installed")
    cuda = getattr(mx, "cuda", None)
    if cuda is None or not cuda.is_available():
        fail("needs the CUDA build of mlx on an NVIDIA GPU (mx.cuda.is_available() is false here)")

    from mlx_dupq.config import QuantSpec
    from mlx_dupq.kernels.gpu import GpuBackend
    from mlx_dupq.kernels.layout import kernel_pack
    from mlx_dupq.kernels.reference import gqmv_reference
    from mlx_dupq.layers.quant_linear import quantize_tensor

    import subprocess

    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()[:1]
    name = name[0] if name else "unknown NVIDIA GPU"
    peak = args.peak_gbps or next((v for k, v in PEAKS_GBPS.items() if k in name), None)
    if peak is None:
        fail(f"unknown peak bandwidth for {name!r}; pass --peak-gbps")
    gpu = GpuBackend("cuda")
    rows = []
    mx.random.seed(0)
    for out, n in SHAPES:
        x = mx.random.normal((1, n)).astype(mx.float16)
        wf = mx.random.normal((out, n)) * 0.02
        xy_bytes = 2 * (n + out)
        # baselines: mlx's own 2-bit kernel and a dense fp16 GEMV
        wq, sq, bq = mx.quantize(wf.astype(mx.float16), group_size=64, bits=2)
        t = timeit(lambda: mx.quantized_matmul(x, wq, sq, bq, transpose=True, group_size=64, bits=2))
        moved = wq.nbytes + sq.nbytes + bq.nbytes + xy_bytes
        rows.append({"kernel": "mx.quantized_matmul", "format": "w2g64", "shape": [out, n], "us": t * 1e6,
                     "gbps": moved / t / 1e9, "pct_peak": 100 * moved / t / 1e9 / peak})
        w16 = wf.astype(mx.float16)
        t = timeit(lambda: x @ w16.T)
        moved = w16.nbytes + xy_bytes
        rows.append({"kernel": "dense fp16 GEMV", "format": "fp16", "shape": [out, n], "us": t * 1e6,
                     "gbps": moved / t / 1e9, "pct_peak": 100 * moved / t / 1e9 / peak})
        for bits, g, sym in FORMATS:
            spec = QuantSpec(bits, g, sym).fit(n)
            layers = [quantize_tensor(wf, spec) for _ in range(args.copies)]
            kp1 = kernel_pack(layers[:1], dtype=mx.float16)
            kpk = kernel_pack(layers, dtype=mx.float16)
            idx1, coef1 = mx.zeros((1, 1), mx.int32), mx.ones((1, 1))
            idxk = mx.arange(args.copies, dtype=mx.int32)[None]
            coefk = mx.full((1, args.copies), 1.0 / args.copies)
            signs = mx.where(mx.random.uniform(shape=(n,)) < 0.5, -1.0, 1.0)
            had = 128
            cases = {
                "gemv": (kp1, idx1, coef1, None, 0, kp1.nbytes()),
                "hadamard_gemv": (kp1, idx1, coef1, signs, had, kp1.nbytes() + 4 * n),
                f"multi_copy_x{args.copies}": (kpk, idxk, coefk, None, 0, kpk.nbytes()),
            }
            times = {}
            for label, (kp, idx, coef, sg, h, wbytes) in cases.items():
                got = gpu.gqmv(x, kp, idx, coef, True, sg, h)
                want = gqmv_reference(x, kp, idx, coef, True, sg, h)
                err = float(mx.max(mx.abs(got.astype(mx.float32) - want)))
                scale = float(mx.max(mx.abs(want)))
                t = timeit(lambda: gpu.gqmv(x, kp, idx, coef, True, sg, h))
                moved = wbytes + xy_bytes
                times[label] = t
                rows.append({"kernel": f"dupq {label}", "format": spec.label(), "shape": [out, n], "us": t * 1e6,
                             "gbps": moved / t / 1e9, "pct_peak": 100 * moved / t / 1e9 / peak,
                             "max_abs_err": err, "ref_scale": scale, "ok": err <= 3e-2 * max(1.0, scale)})
                if label.startswith("multi_copy"):  # goal: well under k single passes
                    rows[-1]["vs_k_single_passes"] = t / (args.copies * times["gemv"])
                print(f"{rows[-1]['kernel']:28s} {spec.label():10s} {out}x{n}: {t * 1e6:8.1f} us "
                      f"{rows[-1]['pct_peak']:5.1f}% peak  err {err:.2g}")
    result = {"command": "python bench/kernel_bandwidth.py" + (f" --peak-gbps {args.peak_gbps}" if args.peak_gbps else ""),
              "device": name, "peak_gbps": peak, "mlx": mx.__version__, "rows": rows,
              "all_correct": all(r.get("ok", True) for r in rows)}
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
