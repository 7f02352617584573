"""`mlx-dupq report`: fixture result files -> REPORT.md tables and valid PNG plots; unknown files listed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_dupq.errors import DupqError
from mlx_dupq.report.collect import collect
from mlx_dupq.report.render import md_table, write_report
from tests.test_cli import assert_one_line_error, run

FIX = Path(__file__).parent / "fixtures" / "report"
PNG = b"\x89PNG\r\n\x1a\n"
REAL = sorted((Path(__file__).parent.parent / "bench" / "results").glob("*.json"))


def _rows(md: str, section: str) -> list[list[str]]:
    """The data rows of the first table under ``## section``."""
    part = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = part.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    lines = lines[start + 2 : end]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def test_collect_sorts_kinds():
    r = collect(sorted(FIX.glob("*.json")))
    assert len(r.ppl) == 5 and [p["label"] for p in r.ppl if p["reference"]] == ["reference (fp32)"]
    assert {(p["model"], p["task"], p["acc"]) for p in r.acc} == {
        ("tiny", "cloze", 0.4), ("tiny", "mc", 0.5), ("rtn4", "cloze", 0.3), ("rtn4", "mc", 0.4)}
    assert len(r.agree) == 1 and len(r.layers) == 1 and r.layers[0][1][1]["score"] == 0.3
    assert [Path(s).name for s, _ in r.unknown] == ["mystery.json"]


def test_report_files_and_tables(tmp_path):
    res = write_report(sorted(FIX.glob("*.json")), tmp_path / "rep")
    out = tmp_path / "rep"
    assert sorted(res["plots"]) == ["accuracy_vs_bpw.png", "batch_scaling_tiny.png", "layers_0.png",
                                    "ppl_vs_bpw_tiny_brown-eval_ctx64.png"]
    for p in res["plots"]:
        data = (out / p).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
        assert f"![{p}]({p})" in (out / "REPORT.md").read_text()
    assert not list(out.glob("*.tmp*"))
    md = (out / "REPORT.md").read_text()
    ppl = _rows(md, "Perplexity")
    # sorted by bits per weight, highest first; every row keeps its source file
    assert [(r[1], r[2], r[3]) for r in ppl] == [
        ("reference (fp32)", "32.000", "20.000"), ("rtn4", "5.000", "25.000"), ("rtn2", "3.500", "5000.000"),
        ("gptq2", "3.500", "80.000"), ("mlx-dupq rtn 3b g64", "3.500", "150.000")]
    assert ppl[-1][-1] == "rtn_tiny.json"
    acc = _rows(md, "Accuracy")
    assert ["rtn4", "5.000", "mc", "0.400", "0.500", "10"] == acc[3][:6]
    agree = _rows(md, "Agreement with the reference")
    assert agree[0][:8] == ["tiny", "rtn4", "5.000", "0.625", "3.500", "0.500", "0.700", "0.900"]
    assert re.search(r"mystery\.json: no known result fields \(keys: hello\)", md)
    mem = _rows(md, "Memory study: tiny")
    assert [r[:4] for r in mem] == [["1", "10.000", "10.000", "10.000"], ["2", "18.000", "9.000", "5.000"],
                                    ["4", "30.000", "7.500", "2.500"]]
    assert "peak bandwidth 2.00 GB/s (stated)" in md


def test_md_table_formats():
    assert md_table(["a", "b"], [[1.23456, None], [1e7, "x|y"], [0.000492, 0.0]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1.235 | - |", "| 1e+07 | x\\|y |", "| 0.000492 | 0.000 |"]


@pytest.mark.skipif(not REAL, reason="no bench/results")
def test_real_results_all_understood(tmp_path):
    res = write_report(REAL, tmp_path)
    known = ("rtn_", "ladder_", "bench_", "eval_", "stream_memory")
    assert not [u for u in res["unknown"] if Path(u).name.startswith(known)]
    assert any(p.startswith("ppl_vs_bpw_smollm2") for p in res["plots"])


def test_cli(tmp_path, monkeypatch, capsys):
    code, o, e = run(monkeypatch, capsys, "report", *sorted(FIX.glob("*.json")), "--out", tmp_path / "r")
    assert code == 0, e
    assert "4 plots" in o and "mystery.json" in e
    code, o, e = run(monkeypatch, capsys, "report", tmp_path / "nope.json", "--out", tmp_path / "r")
    assert_one_line_error(code, e, "nope.json is not a file")
    with pytest.raises(DupqError, match="no result files"):
        write_report([], tmp_path)
