"""MOE_REPORT_<name>.md for a MoE cut from a dense model (report/moe.py with a prefix, report/moe_dense.py)."""

from __future__ import annotations

import json

from mlx_dupq.report.moe import write_report


def test_prefixed_report_states_what_the_model_is_and_the_targets(tmp_path):
    build = {"model": "smollm2-135m-moe", "dense": "smollm2-135m", "command": "python bench/moe_from_dense.py",
             "settings": {"data": "brown:eval", "ctx": 512, "windows": 2},
             "build": {"config": {"dense": "smollm2-135m", "unit": 64, "first_k_dense": 1, "calib": "brown:calib"},
                       "model_config": {"n_routed_experts": 18, "n_shared_experts": 6, "num_experts_per_tok": 6},
                       "calib_tokens": 4096},
             "rows": [{"name": "dense", "ppl": 20.0, "tokens": 1022},
                      {"name": "moe top-6 of 18", "k": 6, "ppl": 24.0, "tokens": 1022},
                      {"name": "routed experts dropped (shared only)", "drop_routed": True, "ppl": 90.0, "tokens": 1022}]}
    contribution = {"fp_ppl": 24.0, "rows": [{"name": "float (full MoE blocks)", "ppl": 24.0, "increase": 0.0},
                                             {"name": "routed experts dropped (shared only)", "ppl": 90.0, "increase": 2.75}],
                    "meta": {"model": "smollm2-135m-moe", "ctx": 512, "windows": 2, "experts": 18, "k": 6}}
    (tmp_path / "moe_smollm2_build.json").write_text(json.dumps(build))
    (tmp_path / "moe_smollm2_contribution.json").write_text(json.dumps(contribution))
    (tmp_path / "moe_contribution.json").write_text(json.dumps({**contribution, "fp_ppl": 1.0}))  # another model's
    out = write_report(tmp_path, "moe_smollm2")
    assert out.name == "MOE_REPORT_smollm2.md" and not (tmp_path / "MOE_REPORT.md").exists()
    md = out.read_text()
    assert "not a pretrained MoE" in md and "1.20x (met)" in md and "4.50x (met)" in md
    assert "moe_smollm2_*.json" in md and "carry over" in md


def test_report_shows_the_split_probe_and_the_pack_targets(tmp_path):
    build = {"model": "smollm2-135m-moe", "settings": {"ctx": 512, "windows": 2},
             "build": {"config": {"unit": 96, "first_k_dense": 1, "finetune_steps": 0},
                       "model_config": {"n_routed_experts": 12, "n_shared_experts": 4, "num_experts_per_tok": 10}},
             "rows": [{"name": "dense", "ppl": 30.0, "tokens": 1022}]}
    probe = {"command": "python bench/moe_split_probe.py", "calib": "brown:calib", "fit_tokens": 4096,
             "held_out_tokens": 2048,
             "layers": {"4": {"neuron_oracle": {"0.75": 0.04},
                              "configs": [{"unit": 96, "n_shared": 4, "experts": 12, "k": 8, "router_steps": 150,
                                           "active_share": 0.75, "err_router": 0.42, "err_oracle": 0.35}]}}}
    meta = {"model": "smollm2-135m-moe", "ctx": 512, "windows": 2, "experts": 12, "k": 10}
    ladder = {"fp_ppl": 35.0, "simulated": [], "duplication": {"plan": {}, "groups": {}, "bits": {"extra_share": 0.0}},
              "packs": [{"name": "float", "ppl": 35.0, "bpw": 16.0, "increase": 0.0},
                        {"name": "moe-w2", "ppl": 49.0, "bpw": 2.98, "increase": 0.4},
                        {"name": "moe-w2-2.5", "ppl": 70.0, "bpw": 2.49, "increase": 1.0}], "meta": meta}
    (tmp_path / "moe_smollm2_build.json").write_text(json.dumps(build))
    (tmp_path / "moe_smollm2_split_probe.json").write_text(json.dumps(probe))
    (tmp_path / "moe_smollm2_ladder.json").write_text(json.dumps(ladder))
    md = write_report(tmp_path, "moe_smollm2").read_text()
    assert "14 of 16 expert units run: 87.5%" in md and "No fine-tune after the cut" in md
    assert "| 4 | 96 x 4 + top-8 / 12 | 150 | 75.0% | 0.420 | 0.350 | 0.040 |" in md
    assert "moe-w2 2.980 bpw: PPL 49.000 = 1.40x float 35.000 | confirmed (<= 1.5x)" in md
    assert "moe-w2-2.5 2.490 bpw: PPL 70.000 = 2.00x float 35.000 | refuted (<= 1.5x)" in md
