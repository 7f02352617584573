"""lm-eval adapter: loglikelihood against a direct computation, accuracy on fixture MMLU/ARC/HellaSwag
files in the hub formats, one-line errors for missing files and unknown tasks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pyarrow.parquet as pq
import pytest

from mlx_dupq.errors import DupqError
from mlx_dupq.eval.lmeval import _task_manager, local_config, model_class, run_harness, split_tasks
from mlx_dupq.io.loader import load
from tests.test_cli import assert_one_line_error, run

FIX = Path(__file__).parent / "fixtures" / "lmeval"


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def tm():
    return _task_manager()


def direct_loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from one full forward pass, tokenized as lm-eval's mlx adapter:
    the whole string is encoded and the context's own token count marks the split."""
    prefix = tok.encode(context)
    full = tok.encode(context + continuation)
    logits = model(mx.array(full)[None]).astype(mx.float32)[0]
    lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return float(sum(lp[i - 1, full[i]] for i in range(len(prefix), len(full))))


def test_loglikelihood_matches_direct(tiny):
    model, tok = tiny
    lm = model_class()(model, tok)
    pairs = [("Question: what is two plus three?\nAnswer:", " five"), ("Question: what is two plus three?\nAnswer:", " B"),
             ("the quick brown fox", " jumps over the lazy dog")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (ll, _greedy), (c, r) in zip(got, pairs):
        assert ll == pytest.approx(direct_loglik(model, tok, c, r), abs=1e-4)
    assert got[0][0] != pytest.approx(got[1][0])  # different continuations, different scores


def _argmax_acc(model, tok, items, norm=False) -> float:
    hits = 0
    for ctx, choices, gold in items:
        ll = [direct_loglik(model, tok, ctx, " " + c) for c in choices]
        if norm:
            ll = [v / len(c) for v, c in zip(ll, choices)]  # lm-eval: characters of the choice, no delimiter
        hits += int(np.argmax(ll)) == gold
    return hits / len(items)


@pytest.fixture(scope="module")
def zero_shot(tiny):
    model, tok = tiny
    return run_harness(model, tok, ["mmlu_elementary_mathematics", "arc_challenge", "hellaswag"], data_dir=FIX)


def test_accuracy_equals_hand_computation(tiny, zero_shot):
    model, tok = tiny
    mm = pq.read_table(FIX / "mmlu/elementary_mathematics/test-00000-of-00001.parquet").to_pylist()
    items = [(f"The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
              f"{r['question']}\nA. {r['choices'][0]}\nB. {r['choices'][1]}\nC. {r['choices'][2]}\nD. {r['choices'][3]}\nAnswer:",
              ["A", "B", "C", "D"], r["answer"]) for r in mm]
    assert zero_shot["mmlu_elementary_mathematics"]["n"] == 4
    assert zero_shot["mmlu_elementary_mathematics"]["acc"] == pytest.approx(_argmax_acc(model, tok, items))
    arc = pq.read_table(FIX / "ARC-Challenge/test-00000-of-00001.parquet").to_pylist()
    items = [(f"Question: {r['question']}\nAnswer:", r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
             for r in arc]
    assert zero_shot["arc_challenge"]["n"] == 3
    assert zero_shot["arc_challenge"]["acc"] == pytest.approx(_argmax_acc(model, tok, items))
    assert zero_shot["arc_challenge"]["acc_norm"] == pytest.approx(_argmax_acc(model, tok, items, norm=True))
    hs = zero_shot["hellaswag"]
    assert hs["n"] == 2 and {"acc", "acc_norm"} <= hs.keys()


def test_fewshot_and_limit(tiny):
    model, tok = tiny
    r = run_harness(model, tok, ["arc_challenge", "hellaswag"], num_fewshot=1, limit=2, data_dir=FIX)
    assert r["arc_challenge"]["n"] == 2 and r["hellaswag"]["n"] == 2
    assert r["arc_challenge"]["num_fewshot"] == 1


def test_missing_file_names_it(tmp_path, tm):
    with pytest.raises(DupqError, match=r"hellaswag_val\.jsonl not found.*rowanz/hellaswag"):
        local_config("hellaswag", tm, tmp_path, 0)
    (tmp_path / "mmlu" / "anatomy").mkdir(parents=True)
    pq.write_table(pq.read_table(FIX / "mmlu/elementary_mathematics/test-00000-of-00001.parquet"),
                   tmp_path / "mmlu/anatomy/test-00000-of-00001.parquet")
    assert local_config("mmlu_anatomy", tm, tmp_path, 0)["dataset_kwargs"]["data_files"]["test"].endswith(".parquet")
    with pytest.raises(DupqError, match=r"mmlu/anatomy/dev-00000-of-00001\.parquet not found.*cais/mmlu"):
        local_config("mmlu_anatomy", tm, tmp_path, 5)


def test_split_tasks():
    assert split_tasks("mc, MMLU,cloze,arc_challenge,mc") == (["mc", "cloze"], ["mmlu", "arc_challenge"])
    with pytest.raises(DupqError, match="unknown task gsm9k"):
        split_tasks("cloze,gsm9k")


def test_cli_local_files_and_errors(tiny_dirs, tmp_path, monkeypatch, capsys):
    js = tmp_path / "r.json"
    code, o, e = run(monkeypatch, capsys, "eval", "tasks", tiny_dirs["llama"], "--tasks", "arc_challenge",
                     "--data-dir", FIX, "--limit", "2", "--json", js)
    assert code == 0, e
    r = json.loads(js.read_text())
    assert r["arc_challenge"]["n"] == 2 and 0 <= r["arc_challenge"]["acc"] <= 1 and r["num_fewshot"] == 0
    code, o, e = run(monkeypatch, capsys, "eval", "tasks", tiny_dirs["llama"], "--tasks", "hellaswag", "--data-dir", tmp_path)
    assert_one_line_error(code, e, "hellaswag_val.jsonl not found")
