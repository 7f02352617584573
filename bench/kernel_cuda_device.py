"""Run the CUDA gqmv kernel on an NVIDIA GPU without mlx's CUDA build: correctness and bandwidth.

Two halves, so that the GPU machine needs only numpy and CuPy (no mlx, nothing to install):

  prepare (here, on the CPU, with mlx):
      python bench/kernel_cuda_device.py prepare --out .device_cases
    For every case: the exact source mlx's ``mx.fast.cuda_kernel`` would compile
    (:func:`mlx_dupq.kernels.nvrtc.cuda_source`), its launch grid, and, for correctness cases, the
    packed inputs (fp16 activations and group parameters) and the plain-mx reference output.

  run (on the GPU machine):
      python bench/kernel_cuda_device.py run --cases .device_cases --json $OUT/kernel_cuda.json
    Compiles each source with CuPy's NVRTC (mlx's options and headers), launches it, and
    (check cases) compares with the reference: max |error| / max |reference| <= 3e-2 (fp16
    output). Timing cases fill ``--buffers`` copies of random packed weights on the GPU (together
    more than 4x the L2 cache, so each launch reads DRAM), replay ``--iters`` launches as one CUDA
    graph and time them with CUDA events; bytes moved (codes + scales + offsets + x + y) / time is
    reported against the card's peak (2 x memory clock x bus width), next to a dense fp16 GEMV of
    the same shape (cuBLAS through CuPy), and k copies in one launch against k single launches.
    ``--backend harness`` runs the check cases on the CPU harness instead (tests this script here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# mlx_dupq.io.atomic needs only the standard library (the GPU machine of `run` has no mlx)
from mlx_dupq.io.atomic import write_result  # noqa: E402

TOL = 3e-2
PEAKS_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "L4": 300.0}
# check cases: (name, out, in, [spec per copy/expert], M, J, summed, Hadamard block)
CHECKS = [
    ("2-bit g64", 256, 1536, [(2, 64, False)], 1, 1, True, 0),
    ("3-bit g64", 256, 1536, [(3, 64, False)], 1, 1, True, 0),
    ("4-bit g128", 256, 1536, [(4, 128, False)], 1, 1, True, 0),
    ("1-bit g64", 256, 1536, [(1, 64, False)], 1, 1, True, 0),
    ("ternary g128", 256, 1536, [("ternary", 128, True)], 1, 1, True, 0),
    ("2-bit per-channel sym", 256, 1536, [(2, 0, True)], 1, 1, True, 0),
    ("2-bit g64 batch 4", 256, 1536, [(2, 64, False)], 4, 1, True, 0),
    ("2-bit g64 x unstaged", 64, 8960, [(2, 64, False)], 1, 1, True, 0),
    ("hadamard b512 2-bit", 256, 1536, [(2, 64, False)], 1, 1, True, 512),
    ("3 residual copies 2/2/3-bit", 256, 1536, [(2, 64, False), (2, 64, False), (3, 64, False)], 1, 3, True, 0),
    ("gather top-4 of 6 mixed widths", 128, 512, [(2, 64, False), (3, 64, False), (4, 64, False),
                                                   ("ternary", 128, True), (1, 64, False), (2, 128, False)],
     1, 4, False, 0),
]
# timing cases: (name, out, in, bits, group, copies J, M); Qwen2.5-32B's MLP is 27648 x 5120
TIMES = [("32b gate/up 2-bit g64", 27648, 5120, 2, 64, 1, 1), ("32b gate/up 3-bit g64", 27648, 5120, 3, 64, 1, 1),
         ("32b gate/up 4-bit g64", 27648, 5120, 4, 64, 1, 1), ("32b down 2-bit g64", 5120, 27648, 2, 64, 1, 1),
         ("1.5b gate/up 2-bit g64", 8960, 1536, 2, 64, 1, 1), ("32b gate/up 2-bit x2 copies", 27648, 5120, 2, 64, 2, 1),
         ("32b gate/up 2-bit x3 copies", 27648, 5120, 2, 64, 3, 1)]


def launch_info(template, n_out):
    from mlx_dupq.kernels import gpu, nvrtc

    kname, src = nvrtc.cuda_source(template)
    t = dict(template)
    return {"kernel": kname, "source": src, "blocks": -(-n_out // t["ROWS"]), "threads": gpu.TG,
            "template": {k: (str(v).split(".")[-1] if k == "T" else v) for k, v in template}}


def prepare(out: Path) -> None:
    import mlx.core as mx
    import numpy as np

    from mlx_dupq.config import QuantSpec
    from mlx_dupq.kernels import gpu
    from mlx_dupq.kernels.layout import kernel_pack
    from mlx_dupq.kernels.reference import gqmv_reference
    from mlx_dupq.layers.quant_linear import quantize_tensor

    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    cases = []
    for i, (name, o, n, specs, m, j, summed, had) in enumerate(CHECKS):
        layers = [quantize_tensor(mx.random.normal((o, n)) * 0.05, QuantSpec(*s).fit(n)) for s in specs]
        kp = kernel_pack(layers, mx.float16)
        x = mx.random.normal((m, n)).astype(mx.float16)
        if summed:
            idx = mx.array([list(range(j))] * m, dtype=mx.int32)
        else:
            idx = mx.array([[(r + 2 * s) % len(specs) for s in range(j)] for r in range(m)], dtype=mx.int32)
        coef = mx.ones((m, j))
        signs = mx.where(mx.random.uniform(shape=(n,)) < 0.5, -1.0, 1.0) if had else mx.ones((n,))
        p = gpu.plan(m, n, j, summed, had)
        if p.rows < m or p.had != had:
            raise SystemExit(f"prepare: case {name!r} would need several launches or a pre-rotation")
        want = gqmv_reference(x, kp, idx, coef, summed, signs, had)
        arrays = {"x": x, "w": kp.w, "scales": kp.scales.astype(mx.float16), "biases": kp.biases.astype(mx.float16),
                  "meta": kp.meta, "idx": idx, "coef": coef.astype(mx.float32), "signs": signs.astype(mx.float32),
                  "want": want.astype(mx.float32)}
        fname = f"check{i:02d}.npz"
        np.savez(out / fname, **{k: np.array(v) for k, v in arrays.items()})
        template = gpu.launch_template(mx.float16, n, o, m, j, summed, p.had, p.stage)
        cases.append({"name": name, "kind": "check", "data": fname, "out": o, "in": n, "M": m, "J": j,
                      "summed": summed, "had": had, **launch_info(template, o)})
    for name, o, n, bits, group, j, m in TIMES:
        p = gpu.plan(m, n, j, True, 0)
        template = gpu.launch_template(mx.float16, n, o, m, j, True, 0, p.stage)
        words = o * n * bits // 32
        groups = o * n // group
        cases.append({"name": name, "kind": "time", "out": o, "in": n, "bits": bits, "group": group, "M": m, "J": j,
                      "words": words, "groups": groups, **launch_info(template, o)})
    (out / "cases.json").write_text(json.dumps({"cases": cases}, indent=1))  # not a result: the run's inputs
    print(f"prepare: {len(cases)} cases in {out}")


# ----------------------------------------------------------------------------- run (GPU machine)

def _cupy_module(case, include_dirs):
    import cupy as cp

    opts = ("--device-as-default-execution-space", *[f"--include-path={d}" for d in include_dirs])
    full = "mlx::core::cu::" + case["kernel"]
    mod = cp.RawModule(code=case["source"], options=opts, name_expressions=[full])
    return mod.get_function(full)


def _include_dirs():
    """mlx's vendored device headers, CCCL and the CUDA runtime headers found on this machine."""
    dirs = [str(ROOT / "mlx_dupq" / "kernels" / "src" / "mlx_cuda")]
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "include" / "cuda_fp16.h").exists():
            dirs.append(str(Path(cand) / "include"))
            cccl = Path(cand) / "include" / "cccl"
            if cccl.is_dir():
                dirs.append(str(cccl))
            break
    try:  # pip-installed headers (nvidia-cuda-runtime / nvidia-cuda-cccl, cu12 or cu13 layouts)
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cuda_runtime/include", "cuda_cccl/include", "cu13/include", "cu13/include/cccl"):
                if (Path(base) / sub).is_dir():
                    dirs.append(str(Path(base) / sub))
    except ImportError:
        pass
    return dirs


def _check_cupy(case, data, fn):
    import cupy as cp
    import numpy as np

    names = ("x", "w", "scales", "biases", "meta", "idx", "coef", "signs")
    args = [cp.asarray(data[k]) for k in names]
    shape = (case["M"], 1 if case["summed"] else case["J"], case["out"])
    y = cp.zeros(shape, dtype=cp.float16)
    fn((case["blocks"],), (case["threads"],), (*args, y))
    cp.cuda.runtime.deviceSynchronize()
    return np.asarray(cp.asnumpy(y), dtype=np.float32)


def _check_harness(case, data):
    import mlx.core as mx
    import numpy as np

    from mlx_dupq.kernels.cpu_harness import gqmv_cpu
    from mlx_dupq.kernels.layout import KernelPack

    kp = KernelPack(w=mx.array(data["w"]), scales=mx.array(data["scales"]), biases=mx.array(data["biases"]),
                    meta=mx.array(data["meta"]), specs=(), n_out=case["out"], n_in=case["in"])
    t = case["template"]
    y = gqmv_cpu(mx.array(data["x"].astype(np.float32)), kp, mx.array(data["idx"]), mx.array(data["coef"]),
                 case["summed"], mx.array(data["signs"]), case["had"], rows=t["ROWS"], tg=t["TG"],
                 stage_x=bool(t["XS"]))
    return np.array(y)


def _time_cupy(case, fn, iters, l2_bytes):
    """Median of 5 graph replays of `iters` launches over rotating weight buffers, per launch (s)."""
    import cupy as cp
    import numpy as np

    o, n, j, m = case["out"], case["in"], case["J"], case["M"]
    per_copy = case["words"] * 4 + case["groups"] * 4  # codes + fp16 scales and offsets
    pack_bytes = per_copy * j
    nbuf = max(2, -(-4 * l2_bytes // pack_bytes))
    cp.random.seed(0)
    bufs = []
    for _ in range(nbuf):
        w = cp.random.randint(0, 2**31 - 1, size=case["words"] * j, dtype=cp.int32).view(cp.uint32)
        s = (cp.random.random_sample(case["groups"] * j, dtype=cp.float32) * 0.01).astype(cp.float16)
        b = (-cp.random.random_sample(case["groups"] * j, dtype=cp.float32) * 0.01).astype(cp.float16)
        meta = cp.asarray(np.array([[case["bits"], case["group"], c * case["words"], c * case["groups"]]
                                    for c in range(j)], np.int32))
        bufs.append((w, s, b, meta))
    x = cp.random.standard_normal((m, n), dtype=cp.float32).astype(cp.float16)
    idx = cp.asarray(np.tile(np.arange(j, dtype=np.int32), (m, 1)))
    coef = cp.ones((m, j), cp.float32)
    signs = cp.ones((n,), cp.float32)
    y = cp.zeros((m, 1, o), cp.float16)
    stream = cp.cuda.Stream(non_blocking=True)

    def launch(k):
        w, s, b, meta = bufs[k % nbuf]
        fn((case["blocks"],), (case["threads"],), (x, w, s, b, meta, idx, coef, signs, y), stream=stream)

    with stream:
        for k in range(nbuf):
            launch(k)  # warm-up (and JIT)
        stream.begin_capture()
        for k in range(iters):
            launch(k)
        graph = stream.end_capture()
        times = []
        for _ in range(5):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / iters)
    bytes_moved = pack_bytes + 2 * (m * n + m * o)
    return statistics.median(times), bytes_moved, nbuf


def _time_dense(o, n, m, iters, l2_bytes):
    import cupy as cp

    nbuf = max(2, -(-4 * l2_bytes // (o * n * 2)))
    cp.random.seed(1)
    ws = [cp.random.standard_normal((o, n), dtype=cp.float32).astype(cp.float16) for _ in range(nbuf)]
    x = cp.random.standard_normal((n, m), dtype=cp.float32).astype(cp.float16)
    for w in ws:
        w @ x
    cp.cuda.runtime.deviceSynchronize()
    times = []
    for _ in range(5):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for k in range(iters):
            ws[k % nbuf] @ x
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / iters)
    return statistics.median(times), o * n * 2 + 2 * (m * n + m * o)


def run(cases_dir: Path, out_json: Path, backend: str, iters: int) -> int:
    import numpy as np

    cases = json.loads((cases_dir / "cases.json").read_text())["cases"]
    res = {"command": "python bench/kernel_cuda_device.py " + " ".join(sys.argv[1:]), "backend": backend,
           "checks": [], "timings": []}
    if backend == "cupy":
        import cupy as cp

        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        attrs = dev.attributes
        name = props["name"].decode()
        if attrs.get("MemoryClockRate") and attrs.get("GlobalMemoryBusWidth"):
            peak, how = 2 * attrs["MemoryClockRate"] * 1e3 * attrs["GlobalMemoryBusWidth"] / 8, "clock x bus width"
        else:  # the attribute is gone from newer CUDA: the datasheet figure by name
            peak = next((v * 1e9 for k, v in PEAKS_GBPS.items() if k in name), None)
            how = "datasheet by name"
            if peak is None:
                sys.exit(f"error: unknown peak bandwidth of {name!r}")
        l2 = attrs.get("L2CacheSize", 50 << 20)
        res["device"] = {"name": name, "peak_GBps": peak / 1e9, "peak_from": how, "l2_bytes": l2,
                         "cupy": cp.__version__, "nvrtc": ".".join(map(str, cp.cuda.nvrtc.getVersion()))}
        incs = _include_dirs()
        res["include_dirs"] = incs
    failed = 0
    for case in cases:
        if case["kind"] == "check":
            data = np.load(cases_dir / case["data"])
            try:
                got = _check_cupy(case, data, _cupy_module(case, incs)) if backend == "cupy" \
                    else _check_harness(case, data)
                want = data["want"]
                err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))
                ok = err <= TOL
            except Exception as e:  # noqa: BLE001 -- report every failing case, then exit non-zero
                err, ok = None, False
                res["checks"].append({"name": case["name"], "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
                print(f"check {case['name']}: FAILED {type(e).__name__}: {e}"[:500])
                failed += 1
                continue
            failed += not ok
            res["checks"].append({"name": case["name"], "ok": ok, "rel_err": err})
            print(f"check {case['name']}: rel err {err:.2e} {'ok' if ok else 'FAILED'}")
        elif backend == "cupy":
            fn = _cupy_module(case, incs)
            t, nbytes, nbuf = _time_cupy(case, fn, iters, res["device"]["l2_bytes"])
            row = {"name": case["name"], "out": case["out"], "in": case["in"], "bits": case["bits"],
                   "copies": case["J"], "us": t * 1e6, "bytes": nbytes, "GBps": nbytes / t / 1e9,
                   "pct_peak": 100 * nbytes / t / (res["device"]["peak_GBps"] * 1e9), "buffers": nbuf}
            if case["J"] == 1:
                td, nbd = _time_dense(case["out"], case["in"], case["M"], iters, res["device"]["l2_bytes"])
                row.update(dense_fp16_us=td * 1e6, dense_fp16_pct_peak=100 * nbd / td / (res["device"]["peak_GBps"] * 1e9),
                           speedup_vs_dense=td / t)
            res["timings"].append(row)
            print(json.dumps(row))
    singles = {(r["out"], r["in"], r["bits"]): r["us"] for r in res["timings"] if r["copies"] == 1}
    for r in res["timings"]:
        if r["copies"] > 1 and (r["out"], r["in"], r["bits"]) in singles:
            r["vs_k_single_passes"] = r["us"] / (r["copies"] * singles[(r["out"], r["in"], r["bits"])])
    write_result(out_json, res)
    print(f"wrote {out_json}: {len(res['checks'])} checks ({failed} failed), {len(res['timings'])} timings")
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the cases (CPU, needs mlx)")
    p.add_argument("--out", type=Path, default=ROOT / ".device_cases")
    r = sub.add_parser("run", help="run the cases (GPU with CuPy, or --backend harness on the CPU)")
    r.add_argument("--cases", type=Path, default=ROOT / ".device_cases")
    r.add_argument("--json", type=Path, default=ROOT / "bench/results/kernel_cuda.json")
    r.add_argument("--backend", choices=("cupy", "harness"), default="cupy")
    r.add_argument("--iters", type=int, default=200, help="launches per timed graph replay")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
        return
    if not (args.cases / "cases.json").exists():
        sys.exit(f"error: no cases at {args.cases}; run `python bench/kernel_cuda_device.py prepare` first")
    if args.backend == "cupy":
        try:
            import cupy  # noqa: F401
        except ImportError:
            sys.exit("error: CuPy is not installed (it needs an NVIDIA GPU); use --backend harness on the CPU")
    sys.exit(run(args.cases, args.json, args.backend, args.iters))


if __name__ == "__main__":
    main()
