"""The MoE report's section on a model cut from a dense one (``<prefix>_build.json`` of
``bench/moe_from_dense.py``): what the model is, its quality at each top-k, and which
conclusions should carry over to a pretrained DeepSeek-MoE."""

from __future__ import annotations

TOP_K_TARGET = 1.3  # top-k MoE PPL / dense PPL at most this (issue 18)
DROP_TARGET = 2.0  # routed experts dropped: PPL / dense PPL above this

CARRY_OVER = [
    "**Should carry over** (they depend on the expert *weights* and the quantizer, and these weights are "
    "real trained SwiGLU weights with their real outliers): how INT2/INT3 error grows per expert, what "
    "Hadamard / DFRot rotations and duplication do to that error, how router quantization turns into "
    "changed selections (a router is a small linear map either way), and the accounting of top-k against "
    "quantization at matched bytes per token.",
    "**May not carry over** (they depend on how experts and router came to be): routing concentration "
    "(hot-expert share), expert types by genre, the link between frequency and importance, router "
    "confidence, and the shared-vs-routed split. Here the experts are clusters of co-activated neurons of "
    "one dense MLP, the shared expert is the neurons we found most often active, and the router is a "
    "classifier trained afterwards to predict the experts with the largest outputs, without load balancing; "
    "DeepSeek-MoE's experts and router are trained together from the start. Lowering k likely hurts this "
    "model more than a pretrained MoE: the dense model was trained with every neuron active, so any "
    "routed expert left out removes something it relied on, while DeepSeek-MoE was trained at its k. "
    "And this model runs most of each MLP per token (see above) where DeepSeek-MoE runs a small share: "
    "routing statistics (hot-expert share, router confidence) are bounded by k / E here.",
]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def probe_section(probe: dict | None) -> list[str]:
    """Why top-k loses quality: the per-layer cut errors of ``bench/moe_split_probe.py``."""
    if not probe or not probe.get("layers"):
        return []
    md = [f"Why k is this high (`{probe.get('command', 'python bench/moe_split_probe.py')}`: each layer cut on "
          f"{probe.get('fit_tokens')} {probe.get('calib')} tokens, MLP output error "
          f"||block(x) - mlp(x)|| / ||mlp(x)|| on {probe.get('held_out_tokens')} further ones):", "",
          "| layer | experts (neurons x shared + top-k / routed) | router steps | active | trained router | "
          "oracle router | per-neuron oracle at that share |", "|---|---|---|---|---|---|---|"]
    for layer, v in sorted(probe["layers"].items(), key=lambda kv: int(kv[0])):
        for c in v["configs"]:
            floor = v["neuron_oracle"].get(str(c["active_share"]))
            md.append(f"| {layer} | {c['unit']} x {c['n_shared']} + top-{c['k']} / {c['experts']} | {c['router_steps']} | "
                      f"{c['active_share']:.1%} | {c['err_router']:.3f} | {c['err_oracle']:.3f} | "
                      f"{'n/a' if floor is None else f'{floor:.3f}'} |")
    md += ["", "Even an oracle router loses a large share of the MLP output at 3/4 active, while the same share of "
           "single neurons chosen per token loses little: a SwiGLU MLP's important neurons differ from token to token "
           "and do not form expert-sized groups; a longer router training, smaller experts or a larger shared part "
           "move the error little. Only a higher k (or a real continued pre-training, as LLaMA-MoE did) closes the gap.",
           ""]
    return md


def model_section(build: dict, probe: dict | None = None) -> list[str]:
    """Markdown lines: the model, its build, the PPL table and the targets, the carry-over list."""
    cfg = build.get("build", {}).get("config", {})
    mc = build.get("build", {}).get("model_config", {})
    st = build.get("settings", {})
    rows = build.get("rows", [])
    dense = next((r for r in rows if r["name"] == "dense"), None)
    E, K = mc.get("n_routed_experts", "?"), mc.get("num_experts_per_tok", "?")
    md = ["## What this model is", "",
          f"`{build.get('model', '?')}` is **a dense model re-cut into experts, not a pretrained MoE**: every MLP of "
          f"`{cfg.get('dense', build.get('dense', '?'))}` from layer {cfg.get('first_k_dense', '?')} on is split into "
          f"{mc.get('n_shared_experts', '?')} shared experts (the {cfg.get('unit', '?')}-neuron units most often "
          f"active on `{cfg.get('calib', '?')}`) and {E} routed experts of {cfg.get('unit', '?')} neurons "
          "(balanced clusters of co-activated neurons), behind mlx-lm's DeepSeek gate (softmax, top-k, "
          f"k = {K}) whose weights were trained on {build.get('build', {}).get('calib_tokens', '?')} calibration tokens "
          "(`mlx_dupq/moe/from_dense.py`; `mlx-dupq models fetch smollm2-135m-moe`). Attention, norms and "
          "embeddings are the dense model's. With every expert active and a uniform gate it computes the dense "
          "logits exactly (tested).", ""]
    if rows and dense:
        md += [f"Quality (`{build.get('command', 'python bench/moe_from_dense.py')}`; {st.get('data', 'brown:eval')}, "
               f"{dense['tokens']} predicted tokens in {st.get('windows', '?')} windows of {st.get('ctx', '?')}):", "",
               "| model | PPL | vs dense |", "|---|---|---|"]
        md += [f"| {r['name']} | {r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.2f}x |" for r in rows]
        md.append("")
        top = next((r for r in rows if r.get("k") == K), None)
        drop = next((r for r in rows if r.get("drop_routed")), None)
        if top and drop:
            a, b = top["ppl"] / dense["ppl"], drop["ppl"] / dense["ppl"]
            md += [f"Targets: top-{K} within {TOP_K_TARGET}x of dense: {a:.2f}x "
                   f"({'met' if a <= TOP_K_TARGET else 'missed'}); routed experts dropped costs over "
                   f"{DROP_TARGET:g}x: {b:.2f}x ({'met' if b > DROP_TARGET else 'missed'}). The routed experts "
                   "carry real knowledge here, unlike `tiny-deepseek-moe`'s.", ""]
    sh, unit = mc.get("n_shared_experts") or 0, cfg.get("unit")
    if isinstance(E, int) and isinstance(K, int):
        md += [f"Per token {sh + K} of {sh + E} expert units run: {(sh + K) / (sh + E):.1%} of each cut MLP's "
               "neurons (DeepSeek-MoE 16B runs about 2 shared + 6 of 64 routed). "
               + (f"The whole MoE was then fine-tuned for {cfg['finetune_steps']} steps ({cfg.get('finetune_loss')})."
                  if cfg.get("finetune_steps") else "No fine-tune after the cut (router training only)."), ""]
    md += probe_section(probe)
    md += ["Which conclusions should carry over to DeepSeek-MoE:", ""]
    md += [f"- {c}" for c in CARRY_OVER] + [""]
    return md
