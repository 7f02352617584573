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
