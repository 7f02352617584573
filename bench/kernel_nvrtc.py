"""Compile the CUDA gqmv kernel for real launch configurations with NVRTC, as mlx would, no GPU needed.

For every layer shape and call kind below, the launch plan the CUDA backend would use
(``mlx_dupq.kernels.gpu.plan``) gives the template; ``mlx_dupq.kernels.nvrtc.compile_cuda`` builds
mlx's kernel source and compiles it for each architecture (mlx's NVRTC options, SASS). Recorded per
kernel: ptxas' registers / stack frame / spill bytes / static shared memory, and counts of memory
instructions in the PTX. These are static facts about the compiled code, not timings.

    python bench/kernel_nvrtc.py --json bench/results/kernel_nvrtc.json

The first kernel version (commit 09e345c: 4 rows per threadgroup one after another, codes read
per weight) was measured the same way from a git worktree of that commit with this script,
nvrtc.py and gpu.py's plan copied in (rows_per_group = 4, TG = 64): kernel_nvrtc_v1.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx  # noqa: E402

from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.kernels import gpu, nvrtc  # noqa: E402
from mlx_dupq.kernels.cpu_harness import KERNELS_DIR  # noqa: E402

# (name, out, in): Qwen2.5-Coder-0.5B / 1.5B and SmolLM2-135M projections, the tiny MoE's experts
SHAPES = [("qwen0.5b gate/up", 4864, 896), ("qwen0.5b down", 896, 4864), ("qwen0.5b k/v", 128, 896),
          ("qwen1.5b gate/up", 8960, 1536), ("qwen1.5b down", 1536, 8960), ("smollm2 gate/up", 1536, 576),
          ("moe expert gate/up", 256, 256)]
# (call, rows of x, slots J, summed, Hadamard block requested)
CALLS = [("qmv", 1, 1, True, 0), ("qmv batch 4", 4, 1, True, 0), ("hadamard_qmv b128", 1, 1, True, 128),
         ("multi_copy k=2", 1, 2, True, 0), ("multi_copy k=3", 1, 3, True, 0), ("gather top-4", 1, 4, False, 0)]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def source_digest() -> str:
    return hashlib.sha256(b"".join((KERNELS_DIR / f).read_bytes()
                                   for f in ("dq_portable.h", "gqmv.body.h"))).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(nvrtc.ARCHS), help="comma-separated NVRTC architectures")
    ap.add_argument("--dtypes", default="float16", help="activation dtypes (float16, bfloat16, float32)")
    ap.add_argument("--toolkit", default=None, help="CUDA major version of the NVRTC to use (12, 13); default: the first found")
    ap.add_argument("--label", default="", help="free text stored with the results (which kernel version)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/kernel_nvrtc.json"))
    args = ap.parse_args()
    try:
        tk = nvrtc.toolkit(args.toolkit)
        major, minor = nvrtc.version(tk)
    except nvrtc.NvrtcUnavailable as e:
        sys.exit(f"error: {e}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=KERNELS_DIR).stdout.strip()
    except OSError:
        commit = ""
    rows = []
    for dname in args.dtypes.split(","):
        for name, out, n in SHAPES:
            for call, m, j, summed, had in CALLS:
                if call.startswith("gather") != name.startswith("moe"):
                    continue  # gathers are for expert shapes, the other calls for dense layers
                p = gpu.plan(m, n, j, summed, had)
                template = gpu.launch_template(DTYPES[dname], n, out, p.rows, j, summed, p.had, p.stage)
                for arch in args.archs.split(","):
                    t0 = time.perf_counter()
                    try:
                        res = nvrtc.compile_cuda(template, arch, tk)
                    except nvrtc.CompileError as e:
                        sys.exit(f"error: {name} {call} {arch}: {e}")
                    row = {"layer": name, "out": out, "in": n, "call": call, "dtype": dname, "arch": arch,
                           "template": {k: (dname if k == "T" else v) for k, v in template},
                           "kernel": res.kernel, "compile_s": round(time.perf_counter() - t0, 3),
                           **res.resources, **{f"ptx_{k}": v for k, v in res.ptx_ops.items()}}
                    rows.append(row)
                    print(json.dumps({k: row[k] for k in ("layer", "call", "arch", "registers", "stack_frame_bytes",
                                                          "spill_store_bytes", "shared_bytes", "ptx_ld_global")}))
    write_result(args.json, {
        "command": "python bench/kernel_nvrtc.py " + " ".join(sys.argv[1:]),
        "nvrtc": f"{major}.{minor}", "mlx": mx.__version__, "mlx_headers": "mlx 0.32.2 (mlx_dupq/kernels/src/mlx_cuda)",
        "kernel_sources_sha256_16": source_digest(), "git_commit": commit,
        "label": args.label,
        "launch": {"TG": gpu.TG, "XS_MAX": gpu.XS_MAX, "SLOTS_MAX": gpu.SLOTS_MAX},
        "rows": rows})
    print(f"wrote {args.json} ({len(rows)} kernels)")


if __name__ == "__main__":
    main()
