"""MoE studies (SPEC F6.1-F6.7) on a trained MoE model; writes bench/results/moe_*.json and MOE_REPORT.md.

    python bench/moe_study.py                       # tiny-deepseek-moe, every part (~15-30 min on 2 cores)
    python bench/moe_study.py --parts stats,router  # some parts
    python bench/moe_study.py --report-only         # re-render MOE_REPORT.md + plots from the JSONs
    python bench/moe_study.py --model smollm2-135m-moe  # the MoE cut from SmolLM2-135M: moe_smollm2_*.json,
                                                        # MOE_REPORT_smollm2.md (see --prefix)

Parts (one JSON each, ``bench/results/moe_<part>.json``):
  stats        routing frequency per expert and layer, hot/cold share, massive activations per expert,
               expert types from per-genre routing on Brown (F6.1)
  sensitivity  the seed's score (0.5 err + 0.3 grad + 0.2 freq) vs measured ablation importance,
               and PPL when one expert class alone is quantized to 2 bits (F6.2)
  router       router quantization at 8/4/2 bits per layer and end to end, router bias
               recalibration from expert degradation, router temperature (F6.3)
  ladder       real packs (rtn8/4/3/2, moe-w2; all-in bpw) and simulated expert treatments:
               INT2 experts plain / Hadamard / DFRot / duplication (30 %) / Hadamard + duplication (F6.4-F6.5)
  layers       per-layer effect of treating one layer's experts (F6.6 seed table "per-layer")
  topk         top-k reduction vs quantization at matched weight bytes per token, dynamic k from
               router entropy, fallback expert (F6.6)
  agreement    routing agreement of each pack with the float model (F6.7)
  contribution how much the float model leans on its MoE blocks: PPL without the routed experts, with
               k experts drawn at random (router scores kept), without the shared experts, without both

Simulated treatments replace float weights by their dequantized values (:mod:`mlx_dupq.moe.experts`):
same numbers the packed layers compute with, without a conversion per variant. Perplexity: brown:eval,
non-overlapping windows of --ctx tokens (--windows of them), float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import mlx.core as mx  # noqa: E402

from mlx_dupq.config import QuantSpec, load_recipe  # noqa: E402
from mlx_dupq.eval.data import calibration_batches, documents, load_text, tokenize  # noqa: E402
from mlx_dupq.eval.ppl import perplexity  # noqa: E402
from mlx_dupq.moe import experts as X  # noqa: E402
from mlx_dupq.moe import routing as R  # noqa: E402
from mlx_dupq.moe import stats as S  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "moe"  # result files are <PREFIX>_<part>.json (--prefix)
PREFIXES = {"smollm2-135m-moe": "moe_smollm2"}  # default prefix per model; others: "moe"
PARTS = ("stats", "router", "topk", "agreement", "sensitivity", "ladder", "layers", "contribution")  # priority order
PACK_RECIPES = ("rtn8", "rtn4", "experts-w4", "moe-w2", "moe-w2-sensitivity", "experts-w2", "moe-w2-dup", "moe-w2-rot",
                "moe-w2-quarot", "moe-awq2", "moe-gptq2", "moe-gptq2-quarot")


def pack_recipe(name: str):
    """Shipped recipes, and moe-w2 variants at the same non-expert widths (matched baselines)."""
    import dataclasses

    if name in ("rtn8", "rtn4", "moe-w2", "moe-w2-dup", "moe-gptq2", "moe-gptq2-quarot"):
        return load_recipe(name)
    rec = load_recipe("moe-w2")
    if name == "moe-w2-quarot":  # the residual stream rotated as in moe-gptq2-quarot, RTN
        return dataclasses.replace(rec, name=name, rotation=load_recipe("moe-gptq2-quarot").rotation)
    if name == "moe-awq2":  # moe-gptq2's calibration with the activation-weighted scale search instead
        q = load_recipe("moe-gptq2").quantizer
        return dataclasses.replace(rec, name=name, quantizer=dataclasses.replace(q, method="awq"))
    moe = {"experts-w4": dict(low_bits=4, high_bits=4, budget=16.0),  # every routed expert 4-bit
           "experts-w2": dict(high_bits=2),  # every routed expert 2-bit (the plan's floor)
           "moe-w2-sensitivity": dict(score="sensitivity"),
           "moe-w2-rot": dict(rotation="hadamard")}[name]  # experts stored as Q(W H), inputs rotated at run time
    return dataclasses.replace(rec, name=name, moe=dataclasses.replace(rec.moe, **moe))
INT2 = QuantSpec(2, 64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def resolve_model(name: str) -> Path:
    p = Path(name).expanduser()
    if p.exists():
        return p
    from mlx_dupq.io.models import cached_path

    path = cached_path(name)
    if path is None:
        sys.exit(f"error: model {name} is not built yet; run `mlx-dupq models fetch {name}` first")
    return Path(path)


class Study:
    def __init__(self, args):
        from mlx_dupq.io.loader import load

        self.args = args
        self.model_name = args.model
        self.path = resolve_model(args.model)
        self.model, self.tok = load(self.path)
        self.blocks = R.install(self.model)
        self.K = self.blocks[0].k
        self.E = self.blocks[0].num_experts
        self.eval_text = load_text("brown:eval")
        self.calib = calibration_batches(self.tok, load_text("brown:calib"), args.calib_samples, args.seq_len, 0)
        self.base_snap = X.snapshot(self.model)
        self._ppl_cache: dict = {}
        self._routes = None
        self._dfrot = None

    # -- helpers
    def ppl(self, model=None, **knobs) -> float:
        m = model if model is not None else self.model
        R.install(m, R.Routing(**knobs))
        try:
            return perplexity(m, self.tok, self.eval_text, ctx=self.args.ctx, windows=self.args.windows)["ppl"]
        finally:
            R.install(m, R.Routing())

    def fp_ppl(self) -> float:
        if "fp" not in self._ppl_cache:
            self._ppl_cache["fp"] = self.ppl()
        return self._ppl_cache["fp"]

    def routes(self):
        if self._routes is None:
            self._routes = S.record_routing(self.model, self.calib, inputs=True)
        return self._routes

    def restore(self):
        X.restore(self.model, self.base_snap)

    def meta(self) -> dict:
        return {"model": self.model_name, "path": str(self.path), "ctx": self.args.ctx, "windows": self.args.windows,
                "eval": "brown:eval", "calib": f"brown:calib {self.args.calib_samples} x {self.args.seq_len} tokens",
                "experts": self.E, "k": self.K, "moe_layers": [b.layer for b in self.blocks],
                "command": "python bench/moe_study.py " + " ".join(sys.argv[1:])}

    def freqs(self) -> dict[int, np.ndarray]:
        return {l: S.frequency(r["inds"], self.E) for l, r in self.routes().items()}

    def genre_types(self) -> dict[int, dict]:
        docs = documents("brown:calib")
        by: dict[str, list[str]] = {}
        for _, g, t in docs:
            by.setdefault(g, []).append(t)
        per_genre: dict[int, dict[str, np.ndarray]] = {}
        tokens = {}
        for g, texts in sorted(by.items()):
            ids = tokenize(self.tok, "\n\n".join(texts))[: self.args.genre_tokens]
            n = len(ids) // self.args.seq_len
            if n < 1:
                continue
            batch = mx.array(ids[: n * self.args.seq_len].reshape(n, self.args.seq_len))
            tokens[g] = int(n * self.args.seq_len)
            for l, r in S.record_routing(self.model, batch).items():
                per_genre.setdefault(l, {})[g] = S.frequency(r["inds"], self.E)
        return {l: {**S.expert_types(fg, tokens), "per_genre": {g: v.tolist() for g, v in fg.items()}}
                for l, fg in per_genre.items()}

    def classes(self) -> dict[int, list[str]]:
        return {l: S.frequency_class(f) for l, f in self.freqs().items()}

    # -- simulated treatments of every MoE layer's experts
    def treat(self, spec=INT2, rotation=None, dup: dict | None = None, layers=None, shared_spec="same",
              expert_specs: dict | None = None, dfrot_rots: dict | None = None) -> None:
        for b in self.blocks:
            if layers is not None and b.layer not in layers:
                continue
            specs = expert_specs[b.layer] if expert_specs else [spec] * b.num_experts
            rot = dfrot_rots[b.layer] if dfrot_rots else rotation
            X.fake_quantize_experts(b, specs, rotation=rot, copies=(dup or {}).get(b.layer))
            sh = spec if shared_spec == "same" else shared_spec
            X.fake_quantize_shared(b, sh, copies=3 if dup is not None else 1,
                                   rotation=rotation if isinstance(rotation, str) else None)

    # ------------------------------------------------------------------ parts
    def part_contribution(self) -> dict:
        """PPL of the float model with parts of every MoE block removed (what the experts carry)."""
        fp = self.fp_ppl()
        rows = [{"name": "float (full MoE blocks)", "ppl": fp}]
        for name, knobs in (("routed experts dropped (shared only)", dict(drop_routed=True)),
                            ("routed experts drawn at random (router scores kept)", dict(random_experts=0)),
                            ("shared experts dropped (routed only)", dict(drop_shared=True)),
                            ("whole MoE FFN dropped", dict(drop_routed=True, drop_shared=True)),
                            (f"top-1 instead of top-{self.K}", dict(k=1))):
            rows.append({"name": name, "ppl": self.ppl(**knobs)})
        for r in rows:
            r["increase"] = r["ppl"] / fp - 1.0
        return {"fp_ppl": fp, "rows": rows}

    def part_stats(self) -> dict:
        routes = self.routes()
        freqs = self.freqs()
        types = self.genre_types()
        layers = {}
        for b in self.blocks:
            f = freqs[b.layer]
            cls = S.frequency_class(f)
            mass = S.massive_ratios(b, routes[b.layer]["x"], routes[b.layer]["inds"])
            layers[b.layer] = {
                "frequency": f.tolist(),
                **S.hot_cold(f),
                "classes": cls,
                "massive": mass,
                "massive_by_class": S.massive_by_class(mass["per_expert"], cls),
                "types": types.get(b.layer, {}),
                "mean_top1_prob": float(routes[b.layer]["probs"].max(-1).mean()),
            }
        allf = np.concatenate([freqs[l] for l in freqs])
        return {"layers": layers, "mean_top10_share": float(np.mean([v["top10_share"] for v in layers.values()])),
                "mean_bottom50_share": float(np.mean([v["bottom50_share"] for v in layers.values()])),
                "type_fractions": {t: float(np.mean([v["types"]["fractions"][t] for v in layers.values() if v["types"]]))
                                   for t in ("general", "domain", "rare")},
                "pooled_top10_share": S.hot_cold(allf / allf.sum())["top10_share"]}

    def part_sensitivity(self) -> dict:
        from mlx_dupq.moe.expert_sensitivity import ablation_importance, expert_sensitivity, spearman

        sb = self.calib[: self.args.sens_samples]
        sens = expert_sensitivity(self.model, sb, INT2)
        self.restore()
        abl = ablation_importance(self.model, sb)
        layers = {}
        for l, d in sens.items():
            layers[l] = {**d, "ablation": abl[l],
                         "spearman_score_ablation": spearman(d["score"], abl[l]),
                         "spearman_freq_ablation": spearman(d["freq"], abl[l]),
                         "spearman_err_ablation": spearman(d["out_err"], abl[l]),
                         "spearman_grad_ablation": spearman(d["grad_norm"], abl[l])}
        # PPL increase when one class of experts alone is at 2 bits (the rest float)
        fp = self.fp_ppl()
        cls = self.classes()
        by_class = {}
        for c in ("shared", "hot", "mid", "cold"):
            for b in self.blocks:
                if c == "shared":
                    X.fake_quantize_shared(b, INT2)
                else:
                    X.fake_quantize_experts(b, [INT2 if k == c else None for k in cls[b.layer]])
            p = self.ppl()
            self.restore()
            by_class[c] = {"ppl": p, "increase": p / fp - 1.0}
        mean = lambda k: float(np.nanmean([v[k] for v in layers.values()]))  # noqa: E731
        return {"layers": layers, "fp_ppl": fp, "class_int2": by_class,
                "mean_spearman": {k: mean(k) for k in ("spearman_score_ablation", "spearman_freq_ablation",
                                                       "spearman_err_ablation", "spearman_grad_ablation")}}

    def part_router(self) -> dict:
        from mlx_dupq.moe.router import degradation_bias, router_quant_layer
        from mlx_dupq.moe.expert_sensitivity import output_errors

        routes = self.routes()
        per_layer = {b.layer: router_quant_layer(self.model, b, routes[b.layer]["x"], (8, 4, 2)) for b in self.blocks}
        fp = self.fp_ppl()
        e2e = {}
        for bits in (8, 4, 2):
            for b in self.blocks:
                X.fake_quantize_router(b, bits)
            e2e[bits] = {"ppl": self.ppl(), "experts": "float"}
            self.restore()
        # experts at 2 bits: routers float vs 8-bit
        self.treat()
        q_ppl = self.ppl()
        for b in self.blocks:
            X.fake_quantize_router(b, 8)
        q_r8 = self.ppl()
        self.restore()
        # bias recalibration from expert degradation (2-bit experts)
        deg = {b.layer: output_errors(b, routes[b.layer]["x"], routes[b.layer]["inds"], INT2) for b in self.blocks}
        self.treat()
        recal = []
        for lam in (0.0, 1.0, 3.0):
            recal.append({"lambda": lam, "ppl": self.ppl(bias=degradation_bias(deg, lam))})
        temps = []
        for t in (0.8, 1.0, 1.25):
            temps.append({"temperature": t, "ppl_int2_experts": self.ppl(temperature=t)})
        self.restore()
        for row in temps:
            row["ppl_fp"] = self.ppl(temperature=row["temperature"])
        mean = {bits: {k: float(np.mean([r[i][k] for r in per_layer.values()]))
                       for k in ("selection_change", "top1_change", "output_rel_err")}
                for i, bits in enumerate((8, 4, 2))}
        return {"fp_ppl": fp, "per_layer": per_layer, "mean_per_layer": mean, "end_to_end": e2e,
                "int2_experts_ppl": q_ppl, "int2_experts_router8_ppl": q_r8,
                "degradation": {l: d.tolist() for l, d in deg.items()}, "bias_recalibration": recal,
                "temperature": temps}

    def _dfrot_rotations(self) -> dict:
        from mlx_dupq.rotation.dfrot import dfrot

        routes = self.routes()
        out = {}
        for b in self.blocks:
            x = routes[b.layer]["x"][: self.args.dfrot_tokens]
            h = S.expert_hidden(b, mx.array(x), mx.array(routes[b.layer]["inds"][: self.args.dfrot_tokens]))
            h = h.reshape(-1, h.shape[-1])
            rx = dfrot(mx.array(x), steps=self.args.dfrot_steps, gamma=100)
            rh = dfrot(h, steps=self.args.dfrot_steps, gamma=100)
            out[b.layer] = {"gate_proj": rx, "up_proj": rx, "down_proj": rh}
        return out

    def _dup_plan(self) -> tuple[dict, dict]:
        from mlx_dupq.moe.duplication import expert_group, plan_copies

        freqs, cls = self.freqs(), self.classes()
        types = _load("stats")
        groups = {}
        for b in self.blocks:
            t = (types or {}).get("layers", {}).get(str(b.layer), {}).get("types", {}).get("types") or ["general"] * self.E
            groups[b.layer] = [expert_group(float(freqs[b.layer][e]), self.K, cls[b.layer][e], t[e]) for e in range(self.E)]
        return plan_copies(freqs, groups, self.args.dup_budget), groups

    def part_ladder(self) -> dict:
        from mlx_dupq.moe.duplication import copies_bits

        fp = self.fp_ppl()
        rows = [{"name": "float", "ppl": fp, "kind": "float"}]
        # simulated: experts (routed + shared) only, the rest float
        for bits in (8, 4, 3, 2):  # INT3 ~ the bits of INT2 + 30 % duplication: a matched comparison
            self.treat(QuantSpec(bits, 64))
            rows.append({"name": f"experts INT{bits}", "kind": "simulated", "ppl": self.ppl(), "expert_bits": bits})
            self.restore()
        dup, groups = self._dup_plan()
        nE = {b.layer: b.num_experts for b in self.blocks}
        cb = copies_bits(dup, nE, 1.0)
        for name, kw in self.expert_variants()[1:]:
            self.treat(**kw)
            rows.append({"name": name, "kind": "simulated", "ppl": self.ppl(), "expert_bits": 2,
                         "routed_copy_ratio": cb["routed_ratio"] if "dup" in kw else 1.0,
                         "shared_copies": 3 if "dup" in kw else 1})
            self.restore()
        # honest expert bits: stored bits per expert weight (codes + fp16 scales/offsets), every copy counted
        from mlx_dupq.moe.precision import stored_bits

        sw = self.blocks[0].switch.up_proj.weight
        n_r = sum(3 * b.switch.up_proj.weight.size for b in self.blocks)
        n_s = sum(3 * b.block[b.shared].up_proj.weight.size for b in self.blocks if b.shared)
        for r in rows:
            r["increase"] = r["ppl"] / fp - 1.0
            if "expert_bits" in r:
                c = stored_bits(tuple(sw.shape), QuantSpec(r["expert_bits"], 64)) / sw.size
                r["expert_bpw"] = c * (n_r * r.get("routed_copy_ratio", 1.0) + n_s * r.get("shared_copies", 1)) / (n_r + n_s)
        packs = self.packs()
        prow = [{"name": "float", "ppl": fp, "bpw": 16.0, "increase": 0.0}]  # float16 checkpoint
        for name, info in packs.items():
            prow.append({"name": name, **info, "increase": info["ppl"] / fp - 1.0})
        return {"fp_ppl": fp, "simulated": rows, "packs": prow,
                "duplication": {"plan": {l: {str(e): c for e, c in d.items()} for l, d in dup.items()},
                                "groups": groups, "bits": cb}}

    def packs(self) -> dict:
        """Convert (once) and evaluate every pack recipe; cached in moe_packs.json."""
        from mlx_dupq.io.loader import load
        from mlx_dupq.pipeline import convert

        cache = _load("packs") or {}
        out = {}
        for name in [p for p in self.args.packs.split(",") if p]:
            path = Path(self.args.pack_dir) / name
            if name in cache.get("packs", {}) and path.exists():
                out[name] = cache["packs"][name]
                continue
            log(f"convert {name}")
            res = convert(self.path, path, pack_recipe(name), force=True)
            m, _ = load(path)
            out[name] = {"bpw": res.bits_per_weight, "ppl": self.ppl(m), "path": str(path), "seconds": res.seconds}
            del m
        _save("packs", {"meta": self.meta(), "packs": out})
        return out

    def part_layers(self) -> dict:
        fp = self.fp_ppl()
        dup, _ = self._dup_plan()
        out = {}
        for b in self.blocks:
            row = {}
            for name, kw in (("int2", {}), ("hadamard", dict(rotation="hadamard")), ("dup", dict(dup=dup)),
                             ("hadamard+dup", dict(rotation="hadamard", dup=dup))):
                self.treat(layers=[b.layer], **kw)
                row[name] = self.ppl()
                self.restore()
            base = row["int2"] - fp
            row["increase_int2"] = row["int2"] / fp - 1.0
            for k in ("hadamard", "dup", "hadamard+dup"):
                row[f"recovered_{k}"] = (row["int2"] - row[k]) / base if base > 0 else None
            out[b.layer] = row
        return {"fp_ppl": fp, "layers": out}

    def part_topk(self) -> dict:
        from mlx_dupq.io.loader import load
        from mlx_dupq.moe.topk import active_weights, entropy_thresholds, mean_dynamic_k

        fp = self.fp_ppl()
        aw = {k: active_weights(self.model, k) for k in range(1, self.K + 1)}
        rows = []
        for k in range(self.K, 0, -1):
            rows.append({"config": f"float k={k}", "k": k, "bits": 16, "ppl": self.ppl(k=k) if k != self.K else fp,
                         "active_weights": aw[k]["active"], "bytes_per_token": aw[k]["active"] * 2})
        packs = self.packs()
        for name, info in packs.items():
            m, _ = load(info["path"])
            ks = (self.K, self.K - 1, max(1, self.K - 2)) if name in ("rtn4", "moe-w2") else (self.K,)
            for k in ks:
                rows.append({"config": f"{name} k={k}", "k": k, "bits": info["bpw"],
                             "ppl": info["ppl"] if k == self.K else self.ppl(m, k=k),
                             "active_weights": aw[k]["active"], "bytes_per_token": aw[k]["active"] * info["bpw"] / 8})
            del m
        for r in rows:
            r["increase"] = r["ppl"] / fp - 1.0
        # dynamic k from router entropy (thresholds: quantiles of the calibration entropies)
        probs = np.concatenate([r["probs"] for r in self.routes().values()])
        dyn = []
        for q in ((0.15, 0.4), (0.35, 0.7)):
            lo, hi = entropy_thresholds(probs, q)
            mk = mean_dynamic_k(probs, self.K, lo, hi)
            dyn.append({"quantiles": list(q), "lo": lo, "hi": hi, "mean_k": mk, "ppl": self.ppl(dynamic=(lo, hi)),
                        "ppl_static_k_rounded": self.ppl(k=max(1, round(mk)))})
        # fallback expert: the most frequent expert of each layer, when the top probability < alpha
        freqs = self.freqs()
        fb = {l: int(np.argmax(f)) for l, f in freqs.items()}
        top1 = float(probs.max(-1).mean())
        fall = []
        for alpha in (0.5 * top1, top1):
            for k in (self.K, self.K - 1):
                fall.append({"alpha": alpha, "k": k, "ppl": self.ppl(k=k, fallback=(alpha, fb)),
                             "ppl_no_fallback": fp if k == self.K else self.ppl(k=k)})
        return {"fp_ppl": fp, "rows": rows, "dynamic_k": dyn, "fallback": fall, "fallback_experts": fb,
                "mean_top1_prob": top1}

    def part_agreement(self) -> dict:
        from mlx_dupq.io.loader import load
        from mlx_dupq.moe.router import agreement

        batches = self.calib[: self.args.sens_samples]
        ref = S.record_routing(self.model, batches)
        out = {}
        for name, info in self.packs().items():
            m, _ = load(info["path"])
            out[name] = {"bpw": info["bpw"], **agreement(ref, S.record_routing(m, batches))}
            del m
        for name, kw in self.expert_variants():
            self.treat(**kw)
            out[name + " (simulated)"] = agreement(ref, S.record_routing(self.model, batches))
            self.restore()
        return out

    def expert_variants(self) -> list[tuple[str, dict]]:
        """The seed's INT2 expert treatments (simulated; experts only, the rest float)."""
        dup, _ = self._dup_plan()
        out = [("experts INT2", {}), ("experts INT2 + Hadamard", dict(rotation="hadamard")),
               (f"experts INT2 + duplication ({self.args.dup_budget:.0%})", dict(dup=dup)),
               ("experts INT2 + Hadamard + duplication", dict(rotation="hadamard", dup=dup))]
        if self.args.dfrot_steps > 0:
            if self._dfrot is None:
                self._dfrot = self._dfrot_rotations()
            out += [("experts INT2 + DFRot", dict(dfrot_rots=self._dfrot)),
                    ("experts INT2 + DFRot + duplication", dict(dfrot_rots=self._dfrot, dup=dup))]
        return out


def _load(part: str) -> dict | None:
    p = RESULTS / f"{PREFIX}_{part}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _save(part: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{PREFIX}_{part}.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, p)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def main() -> None:
    global RESULTS, PREFIX
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-deepseek-moe")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--sens-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--genre-tokens", type=int, default=2048)
    ap.add_argument("--dup-budget", type=float, default=0.3)
    ap.add_argument("--dfrot-steps", type=int, default=30)
    ap.add_argument("--dfrot-tokens", type=int, default=2048)
    ap.add_argument("--pack-dir", default=None, help="where packs are converted (default /tmp/<prefix>_packs)")
    ap.add_argument("--packs", default=",".join(PACK_RECIPES), help="pack recipes of the ladder / top-k / agreement parts")
    ap.add_argument("--prefix", default=None, help="result files <prefix>_<part>.json (default: moe, moe_smollm2 for "
                    "smollm2-135m-moe)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSONs and the report go")
    args = ap.parse_args()
    RESULTS = Path(args.results)
    PREFIX = args.prefix or PREFIXES.get(args.model, "moe")
    args.pack_dir = args.pack_dir or f"/tmp/{PREFIX}_packs"
    unknown = sorted(set(args.packs.split(",")) - set(PACK_RECIPES) - {""})
    if unknown:
        sys.exit(f"error: unknown pack recipe(s) {', '.join(unknown)}; use {', '.join(PACK_RECIPES)}")
    if not args.report_only:
        st = Study(args)
        for part in args.parts.split(","):
            part = part.strip()
            if part not in PARTS:
                sys.exit(f"error: unknown part {part!r}; use {', '.join(PARTS)}")
            t0 = time.time()
            log(f"part {part}")
            data = getattr(st, f"part_{part}")()
            data["meta"] = {**st.meta(), "seconds": time.time() - t0}
            _save(part, data)
            st.restore()
            log(f"part {part} done in {time.time() - t0:.0f}s")
            from mlx_dupq.report.moe import write_report

            write_report(RESULTS, PREFIX)  # after every part: a partial run still leaves a report
    from mlx_dupq.report.moe import write_report

    log(f"wrote {write_report(RESULTS, PREFIX)}")


if __name__ == "__main__":
    main()
