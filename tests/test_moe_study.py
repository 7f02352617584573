"""The MoE study class (mlx_dupq/moe/study.py, the logic of bench/moe_study.py) on a tiny random
DeepSeek-MoE: parts run through the package and write the JSON the report reads."""

from __future__ import annotations

import json

import pytest

from mlx_dupq.auto import E2E_DEFAULTS
from mlx_dupq.errors import DupqError, UsageError
from mlx_dupq.moe.study import PARTS, Study, StudySettings, check_packs, check_parts, default_prefix, pack_recipe
from mlx_dupq.testing import make_hf_dir

WORDS = ("the quick brown fox jumps over the lazy dog while a farmer walks to the field and "
         "the river runs past the old mill where children play near the bridge ").split()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    src = make_hf_dir(tmp / "ds", "deepseek")
    text = tmp / "text.txt"
    text.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(3000)))
    settings = StudySettings(model=str(src), ctx=32, windows=2, calib_samples=2, sens_samples=2, seq_len=32,
                             packs="", eval_data=str(text), calib_data=str(text))
    return Study(settings, tmp / "results", prefix="t", command="python bench/moe_study.py --prefix t")


def test_contribution_part_writes_its_json(study):
    data = study.run_part("contribution")
    written = json.loads((study.results / "t_contribution.json").read_text())
    assert set(written) == {"fp_ppl", "rows", "meta"}
    assert written["fp_ppl"] == pytest.approx(data["fp_ppl"])
    names = [r["name"] for r in written["rows"]]
    assert names[0] == "float (full MoE blocks)" and names[-1] == "top-1 instead of top-2"
    assert all(set(r) == {"name", "ppl", "increase"} for r in written["rows"])
    assert written["rows"][0]["increase"] == 0.0
    assert any(r["increase"] != 0.0 for r in written["rows"][1:])  # dropping experts changes the model
    meta = written["meta"]
    assert {"model", "path", "ctx", "windows", "eval", "calib", "experts", "k", "moe_layers", "command",
            "seconds"} <= set(meta)
    assert (meta["experts"], meta["k"], meta["moe_layers"]) == (8, 2, [1, 2])
    assert meta["command"] == "python bench/moe_study.py --prefix t"
    assert study.load_part("contribution") == written


def test_topk_part_without_packs_restores_the_float_model(study):
    fp = study.fp_ppl()
    data = study.run_part("topk")
    assert {"fp_ppl", "rows", "dynamic_k", "fallback", "fallback_experts", "mean_top1_prob", "meta"} <= set(data)
    assert [r["config"] for r in data["rows"]] == ["float k=2", "float k=1"]
    assert study.ppl() == pytest.approx(fp)  # the routing hooks are back to plain top-k


def test_names_are_checked_in_one_line():
    check_parts(list(PARTS))
    check_packs("")
    with pytest.raises(UsageError, match="unknown part 'nope'"):
        check_parts(["stats", "nope"])
    with pytest.raises(UsageError, match="unknown pack recipe"):
        check_packs("rtn4,bogus")
    with pytest.raises(DupqError, match="not a named model"):
        Study(StudySettings(model="smollm2-135m-moe-not-a-model"), "/tmp")
    assert default_prefix("smollm2-135m-moe") == "moe_smollm2" and default_prefix("x") == "moe"
    assert pack_recipe("moe-w2-rot").moe.rotation == "hadamard"


def test_the_2_5_bpw_variant_and_block_hadamard_for_widths_without_a_hadamard():
    from mlx_dupq.moe.experts import simulated_rotation

    r = pack_recipe("moe-w2-2.5")
    assert r.moe.budget == 2.5 and r.default.bits == 2 and r.lm_head.bits == 2 and r.rules[0].spec.bits == 2
    r = pack_recipe("moe-w2-3.0")
    assert r.moe.budget == 3.0 and r.moe.shared_bits == 3 and r.lm_head.bits == 2 and r.rules[0].spec.bits == 3
    assert simulated_rotation("hadamard", 576).kind == "block_hadamard" and simulated_rotation("hadamard", 576).block == 192
    assert simulated_rotation("hadamard", 64).kind == "hadamard"


def test_packs_and_pack_parts_parts(study, tmp_path):
    """``packs`` converts and evaluates packs (an auto-<bpw> one is the plan of convert --bpw);
    ``pack_parts`` swaps one part of a pack at a time into the float model; the report renders both."""
    import dataclasses

    from mlx_dupq.report.moe import write_report

    check_packs("auto-3.0,auto-2.75")
    with pytest.raises(UsageError, match="unknown pack recipe"):
        check_packs("auto-x")
    with pytest.raises(UsageError, match="give the model"):
        pack_recipe("auto-3.0")
    # auto-<bpw>-e2e: convert --bpw with its default end-to-end stage; auto-<bpw> skips it
    check_packs("auto-3.0-e2e,auto-2.5-e2e20")
    for bad in ("auto-e2e", "auto-3-e2e0", "auto-3-e2ex", "auto-3-e2e-5"):
        with pytest.raises(UsageError, match="unknown pack recipe"):
            check_packs(bad)
    assert pack_recipe("auto-8-e2e7", study.path).refine.e2e["steps"] == 7
    assert pack_recipe("auto-8-e2e", study.path).refine.e2e["steps"] == E2E_DEFAULTS["steps"]
    assert pack_recipe("auto-8", study.path).refine.e2e is None
    old = study.settings
    study.settings = dataclasses.replace(old, packs="rtn4,auto-0.5", pack_dir=str(tmp_path / "packs"), parts_pack="rtn4")
    try:
        data = study.run_part("packs")
        p = data["packs"]["rtn4"]
        assert list(data["packs"]) == ["rtn4"] and "below the smallest" in data["refused"]["auto-0.5"]
        assert p["bpw"] < 16 and p["vs_float"] == pytest.approx(p["ppl"] / data["fp_ppl"])
        parts = study.run_part("pack_parts")
    finally:
        study.settings = old
    rows = {r["part"]: r for r in parts["rows"]}
    assert rows["float"]["ppl"] == pytest.approx(data["fp_ppl"]) and rows["whole pack"]["ppl"] == pytest.approx(p["ppl"])
    assert rows["embedding"]["modules"] == 1 and rows["lm_head"]["modules"] == 1
    assert rows["routed experts"]["modules"] == 2 * 3 and rows["shared experts"]["modules"] == 2 * 3
    assert rows["attention"]["modules"] == 3 * 4 and rows["dense MLP (layer 0)"]["modules"] == 3
    assert all(r["ppl"] != rows["float"]["ppl"] for r in parts["rows"][1:])
    report = write_report(study.results, "t").read_text()
    assert "| auto-0.5 | n/a | refused |" in report
    assert "## Packs at an all-in budget" in report and "What each part of the rtn4 pack costs" in report


def test_auto_e2e_pack_runs_only_the_e2e_stage_on_the_auto_pack(study, tmp_path, monkeypatch):
    """``auto-<bpw>-e2e`` after ``auto-<bpw>`` (the same plan): the e2e stage on a copy of that pack."""
    import dataclasses
    import shutil

    from mlx_dupq import auto

    monkeypatch.setitem(auto.E2E_DEFAULTS, "steps", 2)  # plan_auto reads the defaults when it plans
    monkeypatch.setitem(auto.E2E_DEFAULTS, "seq_len", 32)
    monkeypatch.setitem(auto.E2E_DEFAULTS, "valid_samples", 1)
    monkeypatch.setitem(auto.E2E_DEFAULTS, "data", study.settings.calib_data)
    old = study.settings
    study.settings = dataclasses.replace(old, packs="auto-8,auto-8-e2e", pack_dir=str(tmp_path / "packs"))
    try:
        assert study.e2e_base("auto-8-e2e", pack_recipe("auto-8-e2e", study.path)) is None  # nothing converted yet
        data = study.run_part("packs")
        # a pack made by another plan is not a base
        shutil.copytree(tmp_path / "packs" / "auto-8", tmp_path / "packs" / "auto-6")
        assert study.e2e_base("auto-6-e2e", pack_recipe("auto-6-e2e", study.path)) is None
        # a base recorded before an option existed (cd_sweeps: its default implied) is the same plan
        cfg_path = tmp_path / "packs" / "auto-8" / "config.json"
        original = cfg_path.read_text()
        cfg = json.loads(original)
        rec = cfg["mlx_dupq"]["recipe"]
        rec = json.loads(rec) if isinstance(rec, str) else rec
        del rec["quantizer"]["cd_sweeps"]
        cfg["mlx_dupq"]["recipe"] = rec
        cfg_path.write_text(json.dumps(cfg))
        assert study.e2e_base("auto-8-e2e", pack_recipe("auto-8-e2e", study.path)) == tmp_path / "packs" / "auto-8"
        cfg_path.write_text(original)  # the manifest's bytes again
        # an interrupted e2e stage continues from its work directory: the same pack as in one go
        from mlx_dupq.moe import study as study_mod

        first = json.loads((tmp_path / "packs" / "auto-8-e2e" / "config.json").read_text())["mlx_dupq"]["refine"]
        shutil.rmtree(tmp_path / "packs" / "auto-8-e2e")

        def stop_after_one_step(name):
            def progress(phase, done, total, info):
                if phase == "train" and done == 1:
                    raise RuntimeError("interrupted")
            return progress

        log_of = study_mod._e2e_log
        monkeypatch.setattr(study_mod, "_e2e_log", stop_after_one_step)
        with pytest.raises(RuntimeError, match="interrupted"):
            study.run_part("packs")
        monkeypatch.setattr(study_mod, "_e2e_log", log_of)
        calls, distill = [], study_mod.distill_pack
        monkeypatch.setattr(study_mod, "distill_pack", lambda *a, **k: calls.append(k.get("resume")) or distill(*a, **k))
        again = study.run_part("packs")
        assert calls == [True]
        assert again["packs"]["auto-8-e2e"]["ppl"] == pytest.approx(data["packs"]["auto-8-e2e"]["ppl"])
        refine = json.loads((tmp_path / "packs" / "auto-8-e2e" / "config.json").read_text())["mlx_dupq"]["refine"]
        assert refine["e2e"]["steps_run"] == first["e2e"]["steps_run"] == 2
    finally:
        study.settings = old
    base, e2e = data["packs"]["auto-8"], data["packs"]["auto-8-e2e"]
    assert "base" not in base and e2e["base"] == "auto-8" and e2e["e2e"]["steps_run"] == 2
    assert e2e["bpw"] == pytest.approx(base["bpw"]) and "e2e distillation: 2 steps" in e2e["recipe"]
    cfg = json.loads((tmp_path / "packs" / "auto-8-e2e" / "config.json").read_text())["mlx_dupq"]
    assert cfg["refine"]["e2e"]["steps_run"] == 2
    # the report judges both against the target (within 1.5x of the float MoE)
    from mlx_dupq.report.moe import write_report

    report = write_report(study.results, "t").read_text()
    for name in ("auto-8", "auto-8-e2e"):
        ratio = data["packs"][name]["ppl"] / data["fp_ppl"]
        assert f"| `convert --bpw 8` ({name}) stays within 1.5x of the float MoE (issue 18 target) |" in report
        assert f"= {ratio:.2f}x float" in report
