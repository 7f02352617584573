"""Every result a bench script writes says what machine measured it: the scripts write their JSON through
:func:`mlx_dupq.io.atomic.write_result` (which adds ``"machine"``), never with a bare ``json.dump``."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_dupq.io.atomic import write_result

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
#: a JSON write that is not a result (a model's config, a run's inputs) says so on its line or the line above
NOT_A_RESULT = "# not a result:"
WRITES = ("write", "write_text", "write_bytes")


def _name(node: ast.AST) -> str:
    """``json.dump`` / ``write_json_atomic`` / ``path.write_text`` -> its dotted name ('' when not a name)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else f"?.{node.attr}"
    return ""


def _dumps(node: ast.AST, json_names: set[str]) -> bool:
    """Whether ``node`` holds a ``json.dumps(...)`` call or a name assigned from one."""
    for n in ast.walk(node):
        if isinstance(n, ast.Call) and _name(n.func) in ("json.dumps", "dumps"):
            return True
        if isinstance(n, ast.Name) and n.id in json_names:
            return True
    return False


def bare_json_writes(source: str) -> list[int]:
    """Lines of a script that write JSON without the result writer: ``json.dump(...)``,
    ``write_json_atomic(...)``, ``f.write(...)`` / ``p.write_text(...)`` / ``print(..., file=f)`` of a
    ``json.dumps(...)`` (or of a name assigned from one); a line marked :data:`NOT_A_RESULT` is left out."""
    tree = ast.parse(source)
    lines = source.splitlines()
    json_names = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and _dumps(n.value, set())
                  for t in n.targets if isinstance(t, ast.Name)}
    bad = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        name = _name(n.func)
        last = name.rsplit(".", 1)[-1]
        args = [*n.args, *(k.value for k in n.keywords)]
        if name in ("json.dump", "dump") or last == "write_json_atomic":
            hit = True
        elif last in WRITES:
            hit = any(_dumps(a, json_names) for a in args)
        elif name == "print" and any(k.arg == "file" for k in n.keywords):
            hit = any(_dumps(a, json_names) for a in n.args)
        else:
            hit = False
        marked = any(NOT_A_RESULT in lines[i] for i in (n.lineno - 2, n.lineno - 1) if i >= 0)
        if hit and not marked:
            bad.append(n.lineno)
    return sorted(bad)


def test_the_check_sees_bare_json_writes():
    flagged = {
        "import json\njson.dump({'a': 1}, open('bench/results/x.json', 'w'))\n",
        "import json\nfrom pathlib import Path\nPath('r.json').write_text(json.dumps({}, indent=2) + '\\n')\n",
        "from mlx_dupq.io.pack import write_json_atomic\nwrite_json_atomic('r.json', {})\n",
        "from mlx_dupq.io import pack as packio\npackio.write_json_atomic('r.json', {})\n",
        "import json\nwith open('r.json', 'w') as f:\n    f.write(json.dumps({}))\n",
        "import json\ntext = json.dumps({})\nopen('r.json', 'w').write(text)\n",
        "import json, sys\nprint(json.dumps({}), file=open('r.json', 'w'))\n",
        "from json import dump\ndump({}, open('r.json', 'w'))\n",
    }
    for src in flagged:
        assert bare_json_writes(src), src
    fine = [
        "from mlx_dupq.io.atomic import write_result\nwrite_result('bench/results/x.json', {'rows': []})\n",
        "import json\nprint(json.dumps({'row': 1}), flush=True)\n",  # progress on stdout
        "import json\nkey = json.dumps([1, 2])\nmemo = {key: 1}\n",
        "import json\nfrom pathlib import Path\nPath('m/config.json').write_text(json.dumps({}))  # not a result: a model\n",
        "import json\nfrom pathlib import Path\n# not a result: the build's marker\nPath('DONE').write_text(json.dumps({}))\n",
    ]
    for src in fine:
        assert not bare_json_writes(src), src


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_write_results_with_the_machine(script):
    bad = bare_json_writes(script.read_text(encoding="utf-8"))
    assert not bad, (f"{script.relative_to(ROOT)} writes JSON without the machine record at lines {bad}: write results "
                     f"with mlx_dupq.io.atomic.write_result (or mark a file that is not a result '{NOT_A_RESULT} why')")


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.sh")), ids=lambda p: p.name)
def test_bench_shell_scripts_write_results_through_the_cli(script):
    """A shell script's result comes from ``mlx-dupq ... --json`` (the CLI writes it with the machine)."""
    for i, line in enumerate(script.read_text(encoding="utf-8").splitlines(), 1):
        code = line.split("#", 1)[0]
        for m in re.finditer(r"\S*bench/results/\S*", code):
            assert re.search(r"--json\s+" + re.escape(m.group(0)), code), \
                f"{script.name}:{i} writes {m.group(0)} other than through `mlx-dupq ... --json`"


def test_write_result_adds_the_machine_and_leaves_no_temp(tmp_path):
    out = tmp_path / "results" / "r.json"
    write_result(out, {"rows": [1], "machine": {"stale": True}})
    got = json.loads(out.read_text())
    assert got["rows"] == [1] and "stale" not in got["machine"]
    assert got["machine"]["cpu"] and got["machine"]["mlx"] and got["machine"]["device"]
    with pytest.raises(TypeError):  # not JSON: the file before stays, no temp file is left
        write_result(out, {"rows": object()})
    assert json.loads(out.read_text())["rows"] == [1] and [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_the_writer_runs_without_mlx(tmp_path):
    """bench/kernel_cuda_device.py's `run` half runs on a GPU machine with CuPy and no mlx: the script
    imports and its writer records the machine there (mlx and device None)."""
    code = ("import runpy, sys; sys.modules['mlx'] = None; sys.path.insert(0, sys.argv[1]); "
            "runpy.run_path(sys.argv[1] + '/bench/kernel_cuda_device.py', run_name='imported'); "
            "from mlx_dupq.io.atomic import write_result; write_result(sys.argv[2], {'rows': []}); "
            "assert 'mlx.core' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "r.json")], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    machine = json.loads((tmp_path / "r.json").read_text())["machine"]
    assert machine["mlx"] is None and machine["device"] is None and machine["cpu"] and machine["python"]


def _bench_module(name: str, monkeypatch):
    """bench/NAME.py imported in this process (no BLAS restart; bench/ on the path for its siblings)."""
    import importlib.util

    monkeypatch.setenv("MLX_DUPQ_NO_PRELOAD", "1")
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dwq_e2e_windows_are_the_e2e_stages_tokens(tmp_path, monkeypatch):
    """``mlxlm:dwq`` with ``--dwq-windows e2e`` trains and validates on the very windows (and token budget)
    the e2e stage of ``convert --bpw`` uses: the same train/valid windows, batch and seq_len tokens per window."""
    import argparse

    import numpy as np
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.utils import load_tokenizer

    from mlx_dupq.auto import _e2e
    from mlx_dupq.eval.data import load_text, tokenize
    from mlx_dupq.refine.e2e import calibration_windows
    from mlx_dupq.refine.e2e_spec import E2ESpec
    from mlx_dupq.testing import make_tokenizer

    w2 = _bench_module("w2_compare", monkeypatch)
    make_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    words = ["alpha", "brown", "fox", "quick", "lazy", "dog", "hello", "world", "tiny", "corpus", "sea", "code"]
    rng = np.random.default_rng(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(rng.choice(words, size=20000)))
    args = argparse.Namespace(calib=str(text), dwq_windows="e2e", calib_samples=16, calib_len=512)
    train, valid, batch, max_len, rec = w2._dwq_windows(tok, args, 5)

    opts, _ = _e2e(5)
    spec = E2ESpec.from_dict(dict(opts, data=str(text), samples=5, chat_samples=0))  # text only (DWQ has no chat)
    want_t, want_v = calibration_windows(tokenize(tok, load_text(str(text))), spec)
    assert [t for t, _ in train] == want_t.tolist() and [t for t, _ in valid] == want_v.tolist()
    assert (len(train), len(valid), batch) == (5 * spec.batch, spec.valid_samples, spec.batch)
    assert rec["train_tokens"] == len(train) * spec.seq_len and rec["valid_tokens"] == len(valid) * spec.seq_len
    # what dwq_quantize does with them: batch[:, :-1] in, positions with arange(1, L + 1) < length scored
    for b, lengths in iterate_batches(train, batch, max_len, seed=0):
        x = b[:, :-1]
        scored = int((np.arange(1, 1 + x.shape[1])[None] < np.array(lengths)[:, 1:]).sum())
        assert x.shape == (spec.batch, spec.seq_len) and scored == spec.batch * spec.seq_len


def test_summary_keeps_mlx_lm_rows_of_a_learned_file(tmp_path, monkeypatch):
    """bench/learned.py's multi-text files hold mlx-lm rows (``mlxlm:dwq:...``) beside ours: the summary counts
    them as mlx-lm's, the others as mlx-dupq's."""
    rt = _bench_module("render_tables", monkeypatch)
    ev = lambda p: {"brown:eval": {"ppl": p, "tokens": 2044}, "code:eval": {"ppl": p / 10, "tokens": 2044}}  # noqa: E731
    rows = [{"row": "reference", "bits_per_weight": 32.0, "eval": ev(40.0)},
            {"row": "mlxlm:dwq:2:64:80", "method": "mlx-lm dwq:2:64:80", "bits_per_weight": 2.5015, "eval": ev(900.0)},
            {"row": "refine:auto:2.5", "method": "mlx-dupq e2e stage", "bits_per_weight": 2.4998, "eval": ev(70.0)}]
    (tmp_path / "learned_m.json").write_text(json.dumps({"model": "m", "data": "brown:eval,code:eval", "ctx": 512,
                                                         "windows": 4, "rows": rows}))
    monkeypatch.setattr(rt, "RESULTS", tmp_path)
    refs, points = rt.summary_points()
    got = {(p["family"], p["label"], p["ppl"]) for p in points}
    assert refs == {"m": (40.0, "learned_m.json")}
    assert got == {("mlx-lm", "dwq:2:64:80", 900.0), ("mlx-dupq", "--bpw 2.5 + e2e", 70.0)}
