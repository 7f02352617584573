"""Tables in an 80-column terminal and through a pipe: every name whole, `--json` still there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import mlx_dupq
from mlx_dupq.cli_common import progress_bar
from mlx_dupq.report.terminal import print_rows

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, columns: int = 80) -> str:
    """``mlx-dupq ARGS`` with stdout piped (not a terminal) and COLUMNS set; returns stdout."""
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "mlx_dupq.cli", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def assert_whole(out: str, names) -> None:
    assert "…" not in out and "..." not in out, out
    for n in names:
        assert n in out, f"{n!r} cut or missing in:\n{out}"


@pytest.fixture(scope="module")
def pack(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("terminal") / "a-pack-with-a-rather-long-directory-name-for-the-table"
    mlx_dupq.convert(str(tiny_dirs["qwen2"]), out, bits=4, group_size=32)
    return out


def test_models_list():
    rows = json.loads(cli("models", "list", "--json"))
    assert_whole(cli("models", "list"), [r["name"] for r in rows] + [r["licence"] for r in rows])


def test_inspect(pack):
    names = [t["name"] for t in json.loads(cli("inspect", str(pack), "--json"))["tensors"]]
    out = cli("inspect", str(pack))
    assert_whole(out, names + ["model.layers.1.self_attn.q_proj.weight"])
    assert max(len(l) for l in out.splitlines() if not any(n in l for n in names + [str(pack)])) <= 80


def test_bench(pack, tmp_path):
    res = tmp_path / "bench.json"
    out = cli("bench", str(pack), "--no-tokens-per-sec", "--json", str(res))
    assert_whole(out, [str(pack)])
    assert json.loads(res.read_text())["results"][0]["model"] == str(pack)


def test_recipes_list():
    rows = json.loads(cli("recipes", "list", "--all", "--json"))
    out = cli("recipes", "list", "--all")
    assert_whole(out, [r["name"] for r in rows] + [m["model"] for r in rows for m in r["measured"]])
    assert max(len(l) for l in out.splitlines()) <= 80


@pytest.mark.parametrize("width", [40, 80, 200])
def test_print_rows_never_cuts(width):
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    rows = [["model.layers.12.self_attn.q_proj.weight", "576x576", "mlx:4b/g64", "1.0e-03"],
            ["m", "1", "float", "2.0e+00"]]
    print_rows(console, "weights", ["tensor", "shape", "quant", "mean"], rows, left=("quant",))
    text = console.export_text()
    assert_whole(text, [c for r in rows for c in r])


def test_piped_progress_reports_each_tenth(capsys, monkeypatch):
    """Through a pipe a fixed message (eval tasks' "cloze") still shows how far it got: a line when the
    message changes and one per tenth of the total, not one per step (logs stay short)."""
    monkeypatch.delenv("MLX_DUPQ_PROGRESS", raising=False)
    with progress_bar() as cb:
        for i in range(1, 51):
            cb("cloze", i, 50)
        for i in range(1, 4):
            cb("mc", i, 3)
        cb("quantizing [layer] 1/2", 0, 0)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["cloze (1/50)"] + [f"cloze ({k}/50)" for k in range(5, 51, 5)] + [
        "mc (1/3)", "mc (2/3)", "mc (3/3)", "quantizing [layer] 1/2 (0/0)"]
