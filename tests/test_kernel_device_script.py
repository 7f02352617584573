"""bench/kernel_cuda_device.py: the cases it prepares for a GPU run check out on the CPU harness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernel_cuda_device.py"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from mlx_dupq.kernels.cpu_harness import HarnessUnavailable, load_harness

    try:
        load_harness()
    except HarnessUnavailable as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("cases")
    subprocess.run([sys.executable, str(SCRIPT), "prepare", "--out", str(out)], check=True, capture_output=True)
    return out


def run(cases, out):
    return subprocess.run([sys.executable, str(SCRIPT), "run", "--backend", "harness", "--cases", str(cases),
                           "--json", str(out)], capture_output=True, text=True)


def test_prepared_cases_pass_on_the_harness(cases, tmp_path):
    meta = json.loads((cases / "cases.json").read_text())["cases"]
    assert {c["kind"] for c in meta} == {"check", "time"}
    assert all("__global__ void " + c["kernel"] in c["source"] for c in meta)
    res = run(cases, tmp_path / "r.json")
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert len(got["checks"]) == sum(c["kind"] == "check" for c in meta) and all(c["ok"] for c in got["checks"])


def test_a_wrong_reference_fails_the_run(cases, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in cases.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    first = json.loads((cases / "cases.json").read_text())["cases"][0]["data"]
    data = dict(np.load(bad / first))
    data["want"] = data["want"] + 1.0
    np.savez(bad / first, **data)
    res = run(bad, tmp_path / "r.json")
    assert res.returncode == 1 and "FAILED" in res.stdout


def test_missing_cases_is_one_line(tmp_path):
    res = run(tmp_path / "none", tmp_path / "r.json")
    assert res.returncode != 0 and "prepare" in res.stderr and "Traceback" not in res.stderr
