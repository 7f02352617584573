"""`pip install` of the built wheel (not editable) into a fresh virtualenv gives a working `mlx-dupq`:
recipes and kernel sources come with it, and it converts, verifies and runs a tiny model from a
directory with no source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def sh(*args, cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, args))}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_wheel_installs_and_runs_without_the_source_tree(tiny_dirs, tmp_path):
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", dist, cwd=tmp_path)
    wheel = next(dist.glob("mlx_dupq-*.whl"))
    venv = tmp_path / "venv"
    # the system site-packages provide mlx, mlx-lm, ... (no download); the package itself comes from the wheel
    sh(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    py, exe = venv / "bin" / "python", venv / "bin" / "mlx-dupq"
    sh(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"  # no source tree here, none on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    info = json.loads(sh(py, "-c", "import json, mlx_dupq; from mlx_dupq.config import list_recipes; "
                         "from mlx_dupq.kernels.cpu_harness import KERNELS_DIR; "
                         "print(json.dumps([mlx_dupq.__file__, list_recipes(), str(KERNELS_DIR), "
                         "sorted(p.name for p in KERNELS_DIR.iterdir())]))", cwd=work, env=env))
    file, recipes, kernels, kernel_files = info
    assert Path(file).resolve().is_relative_to(venv.resolve()), file
    assert not Path(file).resolve().is_relative_to(ROOT)
    assert {"rtn4", "gptq4", "w2", "gptq2", "smollm2-gptq-mixed-3.0"} <= set(recipes)
    assert Path(kernels).resolve().is_relative_to(venv.resolve())
    assert {"gqmv.body.h", "dq_portable.h", "cpu_harness.cpp", "build_cpu.sh", "mlx_cuda"} <= set(kernel_files)

    listed = sh(exe, "recipes", "list", cwd=work, env=env)
    assert "rtn4" in listed and "PPL" in listed  # measured numbers ship with the wheel
    sh(exe, "convert", tiny_dirs["qwen2"], "-o", work / "pack", "--recipe", "rtn4", cwd=work, env=env)
    assert "ok" in sh(exe, "verify", work / "pack", cwd=work, env=env)
    sh(exe, "generate", work / "pack", "-p", "hello", "-m", "4", cwd=work, env=env)
    text = work / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    sh(exe, "eval", "ppl", work / "pack", "--data", text, "--ctx", "32", "--windows", "2", "--json", work / "ppl.json",
       cwd=work, env=env)
    assert json.loads((work / "ppl.json").read_text())["ppl"] > 1
