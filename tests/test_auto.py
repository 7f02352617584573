"""``convert --bpw B``: the automatic pipeline (mlx_dupq.auto) on tiny random models."""

from __future__ import annotations

import json

import pytest

from mlx_dupq.auto import plan_auto
from mlx_dupq.errors import DupqError
from tests.test_cli import assert_one_line_error, run


def test_bpw_convert_stays_within_budget(monkeypatch, capsys, tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", out, "--bpw", "3.5", "--e2e-steps", "0")
    assert code == 0, e
    assert "what was chosen and why" in o and "allocation" in o and "--e2e-steps 0" in o
    cfg = json.loads((out / "config.json").read_text())["mlx_dupq"]
    assert cfg["bits_per_weight"] <= 3.5
    assert cfg["recipe"]["description"].startswith("convert --bpw 3.5")
    assert cfg["recipe"]["refine"]["block"]["epochs"] >= 1
    assert len(cfg["refine"]["block"]["layers"]) == 2
    code, o, e = run(monkeypatch, capsys, "inspect", out, "--json")
    assert code == 0 and json.loads(o)["bits_per_weight"] <= 3.5


def test_bpw_runs_the_e2e_stage(monkeypatch, capsys, tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", out, "--bpw", "3.5", "--e2e-steps", "3")
    assert code == 0, e
    assert "3 steps x 1 x 256 tokens" in o
    cfg = json.loads((out / "config.json").read_text())["mlx_dupq"]
    assert cfg["bits_per_weight"] <= 3.5 and cfg["recipe"]["refine"]["e2e"]["steps"] == 3
    rec = cfg["refine"]["e2e"]
    assert rec["steps_run"] == 3 and rec["valid_kl_after"] <= rec["valid_kl_before"]
    assert "e2e distillation" in e and sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


@pytest.mark.parametrize("args, words", [
    (["--bpw", "3.5", "--e2e-steps", "-1"], "--e2e-steps"),
    (["--e2e-steps", "3", "--bits", "2"], "--e2e-steps needs --bpw"),
])
def test_bad_e2e_steps_fail_in_one_line(monkeypatch, capsys, tiny_dirs, tmp_path, args, words):
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", tmp_path / "p", *args)
    assert_one_line_error(code, e, words)
    assert list(tmp_path.iterdir()) == []


def test_bpw_below_reachable_fails_in_one_line(monkeypatch, capsys, tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", out, "--bpw", "1.0")
    assert_one_line_error(code, e, "below the smallest")
    assert not out.exists() and not (tmp_path / "pack.partial").exists()


def test_bpw_with_recipe_is_refused(monkeypatch, capsys, tiny_dirs, tmp_path):
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", tmp_path / "p", "--bpw", "3",
                     "--recipe", "gptq2")
    assert_one_line_error(code, e, "--bpw chooses")


def test_rotation_is_skipped_when_it_would_untie_the_head(tiny_dirs):
    """The tiny qwen2 ties its embedding and its final norm is random: no rotation."""
    rec, choices = plan_auto(str(tiny_dirs["qwen2"]), 4.0)
    assert rec.rotation is None and choices[0].choice == "none"
    with pytest.raises(DupqError):
        plan_auto(str(tiny_dirs["qwen2"]), 0.0)
