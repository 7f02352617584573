"""Every bad command-line value is one `error:` line with exit code 2: never a traceback, never
"internal error", never click's multi-line usage box."""

from __future__ import annotations

import pytest

import mlx_dupq
from mlx_dupq.extras import MissingExtra, require
from tests.test_cli import assert_one_line_error, run

BAD = [  # (arguments after the model or pack, words the one line must contain)
    (["eval", "ppl", "{pack}", "--ctx", "0"], "--ctx"),
    (["eval", "ppl", "{pack}", "--ctx", "abc"], "--ctx"),
    (["eval", "ppl", "{pack}", "--windows", "0"], "--windows"),
    (["eval", "ppl", "{pack}", "--chunk", "-1"], "--chunk"),
    (["eval", "ppl", "{pack}", "--data", "no-such-set"], "no-such-set"),
    (["eval", "ppl", "{pack}", "--data", "brown:nope"], "brown:nope"),
    (["eval", "ppl", "{pack}", "--data", "{text}", "--compute-dtype", "int8"], "compute dtype"),
    (["eval", "ppl", "{pack}", "--data", "{text}", "--ctx", "100000"], "--ctx 100000"),
    (["eval", "agree", "{pack}", "{pack}", "--windows", "0"], "--windows"),
    (["eval", "tasks", "{pack}", "--tasks", "nope"], "unknown task"),
    (["eval", "tasks", "{pack}", "--n", "0"], "--n"),
    (["eval", "tasks", "{pack}", "--data", "brown:calib"], "held-out"),
    (["generate", "{pack}", "-p", "hi", "--max-tokens", "-3"], "--max-tokens"),
    (["generate", "{pack}", "-p", "hi", "--temp", "-1"], "--temp"),
    (["generate", "{pack}"], "--prompt"),
    (["bench", "{pack}", "--gen-tokens", "0"], "--gen-tokens"),
    (["bench", "{pack}", "--prompt-tokens", "-5"], "--prompt-tokens"),
    (["bench", "{pack}", "--dup-base", "other"], "--dup-base"),
    (["convert", "{model}"], "--output"),
    (["convert", "{model}", "-o", "{out}", "--bits", "7"], "bit width 7"),
    (["convert", "{model}", "-o", "{out}", "--bits", "two"], "bit width"),
    (["convert", "{model}", "-o", "{out}", "--group-size", "48"], "group size"),
    (["convert", "{model}", "-o", "{out}", "--no-such-option"], "--no-such-option"),
    (["convert", "{model}", "-o", "{out}", "--dtype", "float64"], "storage dtype"),
    (["convert", "{model}", "-o", "{out}", "-r", "no-such-recipe"], "not found"),
    (["convert", "{model}", "-o", "{out}", "--e2e-steps", "3"], "--e2e-steps needs --bpw"),
    (["convert", "{model}", "-o", "{pack}", "--bits", "4"], "pass --force"),  # an existing output
    (["export", "{pack}", "--gguf", "{text}"], "pass --force"),
    # a bad value in a recipe file is a bad command-line value too (RECIPES below)
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/bits7.toml"], "bit width 7"),
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/group-neg.toml"], "group size -64"),
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/dtype.toml"], "storage dtype"),
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/rotation.toml"], "rotation kind"),
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/quantizer.toml"], "calib_samples"),
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/field.toml"], "unknown recipe field"),
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/e2e.toml"], "e2e steps"),
    (["convert", "{model}", "-o", "{out}", "-r", "{rec}/syntax.toml"], "fix its syntax"),
    (["allocate", "{model}", "--budget", "0", "-o", "{out}"], "--budget"),
    (["allocate", "{model}", "--budget", "3", "-o", "{out}", "--samples", "0"], "--samples"),
    (["search-dup", "{model}", "-o", "{out}", "--trials", "0"], "--trials"),
    (["no-such-command"], "no-such-command"),
    (["models", "fetch"], "Missing argument"),
]


RECIPES = {  # recipe files with one bad value each
    "bits7": "[default]\nbits = 7\n",
    "group-neg": "[default]\nbits = 2\ngroup_size = -64\n",
    "dtype": 'dtype = "float64"\n',
    "rotation": '[rotation]\nkind = "nope"\n',
    "quantizer": '[quantizer]\nmethod = "gptq"\ncalib_samples = -1\n',
    "field": "bits = 2\n",
    "e2e": "[refine.e2e]\nsteps = -1\n",
    "syntax": "[default\nbits = 2\n",
}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_recipes")
    for name, text in RECIPES.items():
        (d / f"{name}.toml").write_text(text)
    return d


@pytest.fixture(scope="module")
def pack(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_errors") / "pack"
    mlx_dupq.convert(str(tiny_dirs["qwen2"]), out, bits=4, group_size=32)
    return out


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_is_one_line_exit_2(args, needle, pack, recipes, tiny_dirs, tmp_path, monkeypatch, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    fill = {"pack": str(pack), "model": str(tiny_dirs["qwen2"]), "out": str(tmp_path / "out"), "text": str(text),
            "rec": str(recipes)}
    code, o, e = run(monkeypatch, capsys, *[a.format(**fill) for a in args])
    assert_one_line_error(code, e, needle, exit_code=2)
    assert "internal error" not in e and "Usage:" not in e
    assert not (tmp_path / "out").exists()


def test_a_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'mlx-dupq\[search\]'"):
        require("optuna", "search", "the TPE search")
    assert require("json", "eval", "x").dumps([]) == "[]"
