"""The core commands (convert, verify, generate, eval ppl, bench, inspect, recipes list) run with none
of the optional extras installed; a command that needs one says which to install, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PACKAGES = ("lm_eval", "datasets", "pyarrow", "optuna", "matplotlib", "pytest")

# run the CLI in a process where importing any extra's package fails as if it were not installed
BLOCKED = f"""
import sys
for name in {EXTRA_PACKAGES!r}:
    sys.modules[name] = None
from mlx_dupq.cli import main
sys.argv = ["mlx-dupq", *sys.argv[1:]]
main()
"""


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_DUPQ_NO_PRELOAD": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_core_commands_need_no_extra(tiny_dirs, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    pack = tmp_path / "pack"
    for args in (["convert", tiny_dirs["qwen2"], "-o", pack, "-r", "rtn4"], ["verify", pack],
                 ["generate", pack, "-p", "hi", "-m", "3"], ["eval", "ppl", pack, "--data", text, "--ctx", "32"],
                 ["bench", pack, "--no-tokens-per-sec"], ["inspect", pack], ["recipes", "list"]):
        res = cli(*args, cwd=tmp_path)
        assert res.returncode == 0, f"{args}: {res.stderr[-2000:]}"
    # eval ppl's default text (no --data) is held-out real text the core install fetches: brown:eval
    res = cli("eval", "ppl", pack, "--ctx", "32", "--windows", "2", cwd=tmp_path)
    assert res.returncode == 0 and "(brown:eval, ctx 32, 2 windows, 62 tokens" in res.stdout, res.stderr[-2000:]


def test_missing_extra_is_one_line_naming_it(tiny_dirs, tmp_path):
    cases = [(["eval", "tasks", tiny_dirs["qwen2"], "--tasks", "hellaswag", "--data-dir", tmp_path], "[eval]"),
             (["search-dup", tiny_dirs["qwen2"], "-o", tmp_path / "r.toml", "--method", "tpe", "--trials", "1"],
              "[search]"),
             (["report", ROOT / "bench" / "results" / "w2_smollm2-135m.json", "--out", tmp_path / "rep"], "[plots]")]
    for args, extra in cases:
        res = cli(*args, cwd=tmp_path)
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert res.returncode == 1 and lines[-1].startswith("error:"), res.stderr[-2000:]
        assert f"pip install 'mlx-dupq{extra}'" in lines[-1] and "Traceback" not in res.stderr
