"""Pipeline parallelism (mlx_dupq.distributed): the byte-balanced split, stages that load only their
tensors and chain to the one-process model, and real multi-process runs on localhost (ring backend)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import convert as mlx_lm_convert

import mlx_dupq
from mlx_dupq.config import QuantSpec, Recipe, RotationSpec, load_recipe
from mlx_dupq.distributed.split import TensorSize, balanced_cuts, plan_stages, tensor_sizes, weight_map
from mlx_dupq.distributed.stage import load_stage
from mlx_dupq.dup.specs import CopySpec, DupPlan
from mlx_dupq.errors import DupqError
from mlx_dupq.eval.data import load_text
from mlx_dupq.eval.ppl import perplexity
from mlx_dupq.testing import free_base_port, mlx_launch
from tests.tiny import TOKENS, make_hf_dir


@pytest.fixture(scope="session")
def packs(tmp_path_factory, calib_text):
    """Tiny packs of every kind a pipeline must run: {name: path}."""
    root = tmp_path_factory.mktemp("dist")
    src = {t: make_hf_dir(root / f"hf-{t}", t, num_hidden_layers=4) for t in ("qwen2", "llama", "deepseek")}
    out = {}
    # plain mlx 4-bit, tied embeddings (the last rank needs the embedding matrix as its head)
    out["qwen2-rtn4"] = mlx_dupq.convert(src["qwen2"], root / "qwen2-rtn4", "rtn4").path
    # run-time rotations (partial rotation of layers 0-1) and parallel copies (layers 2-3), 2-bit
    rec = Recipe(name="rot-dup", default=QuantSpec(bits=2, group_size=32),
                 rotation=RotationSpec(online_down=True, head=True, layers=(0, 1)),
                 duplication=DupPlan(mode="parallel", copies={2: 2, 3: 2}))
    out["llama-rotdup"] = mlx_dupq.convert(src["llama"], root / "llama-rotdup", rec).path
    # serial copies: layer 1 runs twice, the pack has 5 layer entries
    rec = Recipe(name="serial", default=QuantSpec(bits=4, group_size=32),
                 duplication=DupPlan(mode="serial", copies={1: [CopySpec(), CopySpec(scale_mult=1.05)]}))
    out["qwen2-serial"] = mlx_dupq.convert(src["qwen2"], root / "qwen2-serial", rec).path
    # DeepSeek-MoE: per-expert widths, expert copies, expert rotation, duplicated shared experts
    base = load_recipe("moe-w2")
    moe = dataclasses.replace(base.moe, calib_data=str(calib_text), calib_samples=2, calib_seq_len=64, budget=5.0,
                              max_high_fraction=0.5, dup_budget=0.5, shared_copies=2, rotation="hadamard")
    out["deepseek-moe"] = mlx_dupq.convert(src["deepseek"], root / "deepseek-moe", dataclasses.replace(base, moe=moe)).path
    # an mlx-lm model directory (mlx_lm.convert), no mlx_dupq section
    mlx_lm_convert(str(src["llama"]), str(root / "mlxlm-llama"), quantize=True, q_group_size=32)
    out["mlxlm-llama"] = root / "mlxlm-llama"
    return out


# ----------------------------------------------------------------------------------- the split


def test_balanced_cuts_are_the_best_contiguous_split():
    rng = random.Random(0)
    for _ in range(200):
        n, r = rng.randint(1, 9), rng.randint(1, 4)
        if n < r:
            continue
        layers = [rng.randint(1, 100) for _ in range(n)]
        extra = [rng.randint(0, 150) for _ in range(r)]
        cuts = balanced_cuts(layers, extra)
        assert [a for a, _ in cuts] == [0] + [b for _, b in cuts[:-1]] and cuts[-1][1] == n
        assert all(b > a for a, b in cuts)
        load = max(sum(layers[a:b]) + e for (a, b), e in zip(cuts, extra))
        best = min(  # brute force over every way to cut
            max(sum(layers[a:b]) + e for (a, b), e in zip(zip((0, *c), (*c, n)), extra))
            for c in itertools.combinations(range(1, n), r - 1)
        )
        assert load == best


def test_plan_puts_embedding_first_head_last_and_a_tied_embedding_on_both():
    s = TensorSize
    sizes = {"model.embed_tokens.weight": s(40, 80), "model.norm.weight": s(2, 4),
             **{f"model.layers.{i}.mlp.w": s(10, 20) for i in range(6)}}
    plans = plan_stages(sizes, 3)
    assert [(p.start, p.end) for p in plans][0][0] == 0 and plans[-1].end == 6
    assert plans[0].owns("model.embed_tokens.weight") and plans[-1].owns("model.embed_tokens.scales")  # tied
    assert not plans[1].owns("model.embed_tokens.weight") and not plans[1].owns("model.norm.weight")
    assert plans[-1].owns("model.norm.weight") and plans[-1].owns("lm_head.weight")
    # rank 0 and the last rank hold the embedding, so they get fewer layers than the middle rank
    assert plans[1].end - plans[1].start > plans[0].end - plans[0].start
    assert sum(p.resident_bytes for p in plans) == 6 * 20 + 2 * 80 + 4
    one = plan_stages(sizes, 1)[0]
    assert one.resident_bytes == 6 * 20 + 80 + 4  # one rank holds the tied embedding once
    untied = plan_stages({**sizes, "lm_head.weight": s(40, 80)}, 2)
    assert not untied[-1].owns("model.embed_tokens.weight") and not untied[0].tied
    with pytest.raises(DupqError, match="at most 6 ranks"):
        plan_stages(sizes, 7)


def test_sizes_come_from_the_headers_at_the_compute_dtype(packs):
    p = packs["qwen2-rtn4"]
    f32, f16 = tensor_sizes(p, "float32"), tensor_sizes(p, "float16")
    arrays = {k: v for f in p.glob("model*.safetensors") for k, v in mx.load(str(f)).items()}
    assert set(f32) == set(arrays) == set(weight_map(p))
    for k, a in arrays.items():
        assert f32[k].stored == f16[k].stored == a.nbytes
        floating = mx.issubdtype(a.dtype, mx.floating)
        assert f32[k].resident == (a.size * 4 if floating else a.nbytes)
        assert f16[k].resident == (a.size * 2 if floating else a.nbytes)


# ----------------------------------------------------------------------------------- stages in one process


@pytest.mark.parametrize("name", ["qwen2-rtn4", "llama-rotdup", "qwen2-serial", "deepseek-moe", "mlxlm-llama"])
def test_stages_chain_to_exactly_the_one_process_model(packs, name, monkeypatch):
    path = packs[name]
    ref, _ = mlx_dupq.load(path)
    expected = ref(TOKENS)
    mx.eval(expected)
    wmap = weight_map(path)
    layers = 5 if name == "qwen2-serial" else 4
    for n in (2, 3):
        opened: list[str] = []
        real_load = mx.load
        monkeypatch.setattr(mx, "load", lambda f, *a, **k: opened.append(f) or real_load(f, *a, **k))
        stages = []
        for r in range(n):
            opened.clear()
            st, _, plans = load_stage(path, r, n)
            stages.append(st)
            # only the files holding this rank's tensors were opened, and only its tensors are held
            assert sorted(opened) == sorted({str(path / f) for k, f in wmap.items() if plans[r].owns(k)})
            held = sum(v.nbytes for _, v in tree_flatten(st.parameters()))
            assert held == plans[r].resident_bytes
        monkeypatch.setattr(mx, "load", real_load)
        assert [(s.plan.start, s.plan.end) for s in stages][-1][1] == layers
        h = stages[0].embed(TOKENS)
        for st in stages:
            h = st(h)
        out = stages[-1].head(h)
        assert mx.array_equal(out, expected).item(), name


def test_not_a_pack_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DupqError, match="is not a pack"):
        load_stage(tmp_path, 0, 2)


# ----------------------------------------------------------------------------------- real processes (localhost, ring)

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 300  # seconds for one mlx.launch of tiny packs (process start-up dominates)




def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLX_DUPQ_NO_PRELOAD": os.environ.get("MLX_DUPQ_NO_PRELOAD", "0")}


def _launch(n: int, cmd: list[str]) -> subprocess.CompletedProcess:
    return mlx_launch(n, cmd, timeout=LAUNCH_TIMEOUT, env=_env(), cwd=REPO)


HANG = """
import os, sys, time
from pathlib import Path
import mlx.core as mx
g = mx.distributed.init()
Path(sys.argv[1], f"pid{g.rank()}").write_text(str(os.getpid()))
if g.rank() == 1:
    time.sleep(600)
mx.eval(mx.distributed.all_sum(mx.array(1.0)))
"""


def test_a_timed_out_launch_leaves_no_rank_running(tmp_path):
    """Rank 0 waits in a collective for rank 1, which sleeps: past the timeout both ranks are gone,
    not only the launcher (a hung test must not leave ranks spinning on the CPU for the rest of the run)."""
    with pytest.raises(subprocess.TimeoutExpired):
        mlx_launch(2, [sys.executable, "-c", HANG, str(tmp_path)], timeout=20, env=_env(), cwd=REPO)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(alive, pids)):
        time.sleep(0.2)
    assert not any(map(alive, pids)), pids


def _reference(path) -> dict:
    from mlx_lm.generate import generate_step

    from mlx_dupq.eval.ppl import window_nll_sum
    from tests.dist_driver import CTX, GEN_TOKENS, IDS, PROMPT

    model, _ = mlx_dupq.load(path)
    tokens = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=GEN_TOKENS)]
    wins = IDS.reshape(-1, CTX)
    nll = sum(window_nll_sum(model, mx.array(w[None]), CTX) for w in wins)
    chunked = sum(window_nll_sum(model, mx.array(w[None]), 8) for w in wins)
    return {"tokens": tokens, "nll": nll, "nll_chunked": chunked}


@pytest.mark.parametrize("n,names", [(2, ["qwen2-rtn4", "llama-rotdup", "deepseek-moe"]),
                                     (3, ["llama-rotdup", "qwen2-serial", "deepseek-moe"])])
def test_ranks_on_localhost_match_one_process(packs, tmp_path, n, names):
    """Greedy tokens identical, NLL within 1e-4 relative, each rank's memory its share of the pack."""
    out = tmp_path / "res.json"
    r = _launch(n, [sys.executable, str(REPO / "tests" / "dist_driver.py"), str(out), *(str(packs[k]) for k in names)])
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    for name in names:
        res, ref = got[str(packs[name])], _reference(packs[name])
        assert res["tokens"] == ref["tokens"], name
        assert res["nll"] == pytest.approx(ref["nll"], rel=1e-4)
        assert res["nll_chunked"] == pytest.approx(ref["nll_chunked"], rel=1e-4)
        ranks = res["per_rank"]
        total = sum(s.resident for s in tensor_sizes(packs[name]).values())
        assert [x["rank"] for x in ranks] == list(range(n)) and ranks[-1]["layers"][1] == (5 if "serial" in name else 4)
        for x in ranks:
            # loading peaks at the rank's own bytes (plus a few KiB of buffers), far from the whole pack
            assert x["resident_bytes"] <= x["load_peak_bytes"] <= 1.1 * x["resident_bytes"] + 16384, (name, x)
            assert x["resident_bytes"] < 0.8 * total
        print(name, [(x["layers"], x["resident_bytes"], x["load_peak_bytes"], x["peak_memory_bytes"]) for x in ranks])


def test_cli_generate_and_ppl_with_pipeline_print_what_one_process_prints(packs):
    path = str(packs["qwen2-serial"])
    base = [sys.executable, "-m", "mlx_dupq.cli"]
    gen = ["generate", path, "--prompt", "the quick brown fox", "-m", "12", "--no-chat"]
    ppl = ["eval", "ppl", path, "--data", "lee:eval", "--ctx", "64", "-n", "2"]
    r = _launch(3, base + gen + ["--pipeline"])
    assert r.returncode == 0, r.stderr[-2000:]
    one = subprocess.run(base + gen, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(), cwd=REPO)
    assert r.stdout == one.stdout and one.stdout.strip()
    assert sorted(ln.split(":")[0] for ln in r.stderr.splitlines() if ln.startswith("rank ")) == \
        ["rank 0/3", "rank 1/3", "rank 2/3"]
    r = _launch(2, base + ppl + ["--pipeline"])
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok = mlx_dupq.load(path)
    ref = perplexity(model, tok, load_text("lee:eval"), ctx=64, windows=2)
    assert r.stdout.splitlines()[0].startswith(f"PPL {ref['ppl']:.4f}  (lee:eval, ctx 64, 2 windows, 126 tokens")
    assert [ln.split(":")[0].strip() for ln in r.stdout.splitlines()[1:]] == ["rank 0", "rank 1"]


def _spawn(n: int, cmd: list[str]) -> list[subprocess.Popen]:
    """``n`` ranks started the way mlx.launch starts them (MLX_RANK, MLX_HOSTFILE), without its
    supervision, so the test decides which one dies and the others must notice on their own."""
    base = free_base_port(n)
    hostfile = Path(tempfile.mkdtemp()) / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + i}"] for i in range(n)]))
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**_env(), "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}) for r in range(n)]


def _wait_ready(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> list[list[str]]:
    """Read each rank's stderr until it printed its stage line (every rank has loaded)."""
    lines: list[list[str]] = [[] for _ in procs]
    deadline = time.monotonic() + timeout
    for p, out in zip(procs, lines):
        while not any(ln.startswith("rank ") for ln in out):
            assert time.monotonic() < deadline and p.poll() is None, (out, p.stderr.read() if p.poll() is not None else "")
            out.append(p.stderr.readline())
    return lines


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_or_frozen_rank_makes_the_others_exit_with_one_line(packs, how):
    """kill: rank 1 of 3 is SIGKILLed, its sockets close, ranks 0 and 2 stop at once.
    stop: rank 1 of 2 is frozen (SIGSTOP, sockets stay open), rank 0's watchdog ends it after --peer-timeout."""
    n = 3 if how == "kill" else 2
    cmd = [sys.executable, "-m", "mlx_dupq.cli", "bench", str(packs["llama-rotdup"]), "--pipeline",
           "--prompt-tokens", "8", "--gen-tokens", "1000000", "--peer-timeout", "4"]
    procs = _spawn(n, cmd)
    try:
        _wait_ready(procs)
        time.sleep(1.0)
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        for r, p in enumerate(procs):
            if r == 1:
                continue
            _, err = p.communicate(timeout=60)
            waited = time.monotonic() - t0
            assert p.returncode == 1, err
            errors = [ln for ln in err.splitlines() if ln.strip()]
            assert len(errors) == 1 and errors[0].startswith(f"error: rank {r}: "), err
            assert ("a peer is gone" if how == "kill" else "no progress for 4s") in errors[0]
            assert waited < (20 if how == "kill" else 30), waited  # bounded, with room for a loaded 2-core CI box
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
