"""The MoE studies of docs/moe.md (F6.1-F6.7 there) on a model with DeepSeek-MoE blocks: one
:class:`Study` loads the float model once and runs *parts*, each a ``part_<name>`` method that
returns a JSON-ready dict; :meth:`Study.run_part` adds the settings (``meta``) and writes it to
``<results>/<prefix>_<part>.json`` (temp file, then rename). ``bench/moe_study.py`` is its command
line; ``mlx_dupq.report.moe`` renders the files.

    study = Study(StudySettings(model="tiny-deepseek-moe", windows=4), results=Path("bench/results"))
    study.run_part("contribution")   # -> bench/results/moe_contribution.json

Parts (:data:`PARTS`, priority order): ``stats`` (routing frequency, hot/cold share, massive
activations, expert types per genre; F6.1), ``router`` (router quantization, bias recalibration,
temperature; F6.3), ``topk`` (top-k reduction vs quantization, dynamic k, fallback expert; F6.6),
``agreement`` (routing agreement of packs and simulated treatments with the float model; F6.7),
``sensitivity`` (the seed's expert score vs ablation importance, one class at 2 bits; F6.2),
``ladder`` (real packs and simulated INT2 expert treatments; F6.4-F6.5), ``layers`` (one layer's
experts treated at a time; F6.6), ``contribution`` (PPL without parts of the MoE blocks), ``packs``
(only convert and evaluate the pack recipes), ``pack_parts`` (each part of one pack -- embedding, head,
attention, dense MLP, shared experts, routed experts -- swapped alone into the float model).

Pack recipes (:data:`PACK_RECIPES`): shipped and study recipes, ``auto-<bpw>``: the recipe
``mlx-dupq convert MODEL --bpw <bpw> --e2e-steps 0`` plans (:func:`mlx_dupq.auto.plan_auto`), and
``auto-<bpw>-e2e``: ``mlx-dupq convert MODEL --bpw <bpw>`` with its default end-to-end stage, and
``auto-<bpw>-e2e<N>``: the same with ``--e2e-steps N`` (both run on a copy of the ``auto-<bpw>`` pack
when that one is there, made by the same plan: :meth:`Study.e2e_base`).

Simulated treatments replace float weights by their dequantized values (:mod:`mlx_dupq.moe.experts`):
the numbers the packed layers compute with, without a conversion per variant. Perplexity: brown:eval
(``eval_data``), non-overlapping windows of ``ctx`` tokens (``windows`` of them), float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .._env import machine_record
from ..auto import plan_auto
from ..config import Recipe, load_recipe
from ..errors import DupqError, UsageError
from ..eval.data import calibration_batches, documents, load_text, tokenize
from ..eval.ppl import perplexity
from ..io.loader import load
from ..io.models import cached_path
from ..metrics import spearman
from ..pipeline import convert
from ..refine.e2e import distill_pack
from ..refine.e2e_spec import E2ESpec
from ..rotation.dfrot import dfrot
from ..specs import QuantSpec
from . import experts as X
from . import routing as R
from . import stats as S
from .duplication import copies_bits, expert_group, plan_copies
from .expert_sensitivity import ablation_importance, expert_sensitivity, output_errors
from .precision import stored_bits
from .router import agreement, degradation_bias, router_quant_layer
from .topk import active_weights, entropy_thresholds, mean_dynamic_k

PARTS = ("stats", "router", "topk", "agreement", "sensitivity", "ladder", "layers", "contribution", "packs",
         "pack_parts")  # priority order
PREFIX = "moe"  # result files are <prefix>_<part>.json
PREFIXES = {"smollm2-135m-moe": "moe_smollm2"}  # default prefix per model; others: PREFIX
PACK_RECIPES = ("rtn8", "rtn4", "experts-w4", "moe-w2", "moe-w2-3.0", "moe-w2-2.5", "moe-w2-sensitivity", "experts-w2", "moe-w2-dup", "moe-w2-rot",
                "moe-w2-quarot", "moe-awq2", "moe-gptq2", "moe-gptq2-quarot", "auto-3.0", "auto-2.5")
AUTO = "auto-"  # auto-<bpw>: the plan of `convert --bpw <bpw> --e2e-steps 0`, any positive bpw
AUTO_E2E = "-e2e"  # auto-<bpw>-e2e[N]: the plan of `convert --bpw <bpw> [--e2e-steps N]` (default: its e2e stage)
INT2 = QuantSpec(2, 64)


@dataclass(frozen=True)
class StudySettings:
    """What a study measures on (the options of ``bench/moe_study.py``, same defaults)."""

    model: str = "tiny-deepseek-moe"  # named built model or a directory
    ctx: int = 256  # perplexity window (tokens)
    windows: int = 16  # perplexity windows of eval_data
    calib_samples: int = 16  # calib_data sequences for routing statistics
    sens_samples: int = 8  # of those, used by sensitivity and agreement
    seq_len: int = 256  # calibration sequence length
    genre_tokens: int = 2048  # tokens per Brown genre for expert types
    dup_budget: float = 0.3  # extra routed-expert copies (share) for duplication
    dfrot_steps: int = 30  # 0: no DFRot variants
    dfrot_tokens: int = 2048
    pack_dir: str = "/tmp/moe_packs"  # where packs are converted
    parts_pack: str = "moe-w2-3.0"  # the pack whose parts pack_parts swaps into the float model
    packs: str = ",".join(PACK_RECIPES)  # comma-separated pack recipes of ladder / topk / agreement
    eval_data: str = "brown:eval"  # perplexity text (a name or a file, as mlx_dupq.eval.data.load_text)
    calib_data: str = "brown:calib"  # routing statistics; expert types per genre always read brown:calib


def default_prefix(model: str) -> str:
    """Result file prefix of a model: ``moe_smollm2`` for ``smollm2-135m-moe``, else ``moe``."""
    return PREFIXES.get(model, PREFIX)


def check_parts(parts: list[str]) -> None:
    """UsageError on the first name that is not a part."""
    for part in parts:
        if part not in PARTS:
            raise UsageError(f"unknown part {part!r}; use {', '.join(PARTS)}")


def check_packs(packs: str) -> None:
    """UsageError when a comma-separated pack list names a recipe not in :data:`PACK_RECIPES`."""
    unknown = sorted(n for n in set(packs.split(",")) - set(PACK_RECIPES) - {""} if _auto_bpw(n) is None)
    if unknown:
        raise UsageError(f"unknown pack recipe(s) {', '.join(unknown)}; use {', '.join(PACK_RECIPES)}")


def _auto(name: str) -> tuple[float, int | None] | None:
    """``(bpw, e2e steps)`` of an ``auto-<bpw>`` (steps 0), ``auto-<bpw>-e2e`` (None: the default) or
    ``auto-<bpw>-e2e<N>`` (N >= 1) pack name, None for any other name."""
    if not name.startswith(AUTO):
        return None
    bpw_s, e2e, steps_s = name[len(AUTO):].partition(AUTO_E2E)
    try:
        bpw = float(bpw_s)
        steps = (int(steps_s) if steps_s else None) if e2e else 0
    except ValueError:
        return None
    return (bpw, steps) if bpw > 0 and (steps is None or steps >= 0) and not (e2e and steps == 0) else None


def _e2e_log(name: str):
    """A ``distill_pack`` progress callback that logs each step and validation."""
    def progress(phase: str, done: int, total: int, info: dict) -> None:
        if phase in ("train", "valid"):
            log(f"{name}: e2e {phase} {done}/{total} " + ", ".join(f"{k} {v:.4f}" for k, v in info.items()
                                                                  if isinstance(v, float)))
    return progress


def _auto_bpw(name: str) -> float | None:
    """The budget of an ``auto-...`` pack name (:func:`_auto`), None for any other name."""
    a = _auto(name)
    return None if a is None else a[0]


def pack_recipe(name: str, model: str | Path | None = None) -> Recipe:
    """Shipped recipes, moe-w2 variants at the same non-expert widths (matched baselines), and
    ``auto-<bpw>``: what ``convert MODEL --bpw <bpw> --e2e-steps 0`` plans for ``model``;
    ``auto-<bpw>-e2e``: what ``convert MODEL --bpw <bpw>`` plans (the default end-to-end stage),
    ``auto-<bpw>-e2e<N>`` with ``--e2e-steps N``."""
    auto = _auto(name)
    if auto is not None:
        if model is None:
            raise UsageError(f"pack {name} is planned for a model; give the model")
        return plan_auto(str(model), auto[0], e2e_steps=auto[1])[0]
    if name in ("rtn8", "rtn4", "moe-w2", "moe-w2-dup", "moe-gptq2", "moe-gptq2-quarot"):
        return load_recipe(name)
    rec = load_recipe("moe-w2")
    if name in ("moe-w2-3.0", "moe-w2-2.5"):  # moe-w2's policy where its widths overshoot the budget (SmolLM2's
        # 96-neuron experts take groups of 32): shared experts 3-bit, lm_head 2-bit; at 2.5 also attention 2-bit
        # and the experts (and layer 0's dense MLP) with one scale and offset per output channel
        low = QuantSpec(2, 128, symmetric=False)
        if name == "moe-w2-3.0":
            return dataclasses.replace(rec, name=name, lm_head=low, moe=dataclasses.replace(rec.moe, shared_bits=3))
        return dataclasses.replace(rec, name=name, default=QuantSpec(2, 0), embed=low, lm_head=low,
                                   rules=(dataclasses.replace(rec.rules[0], spec=QuantSpec(2, 64, symmetric=False)),),
                                   moe=dataclasses.replace(rec.moe, budget=2.5, shared_bits=3))
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


def log(msg: str) -> None:
    """A progress line with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def resolve_model(name: str) -> Path:
    """A directory, or the cached path of a named model; DupqError when it is not built yet."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    path = cached_path(name)
    if path is None:
        raise DupqError(f"model {name} is not built yet; run `mlx-dupq models fetch {name}` first")
    return Path(path)


def json_default(o):
    """``json.dumps`` default for numpy scalars and arrays."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


#: pack_parts: (part, which module paths of the pack belong to it)
PACK_PARTS = (
    ("embedding", lambda p: p == "model.embed_tokens"),
    ("lm_head", lambda p: p == "lm_head"),
    ("attention", lambda p: ".self_attn." in p),
    ("dense MLP (layer 0)", lambda p: ".mlp." in p and ".shared_experts" not in p and ".switch_mlp" not in p
     and not p.endswith(".mlp.gate")),
    ("shared experts", lambda p: ".shared_experts." in p),
    ("routed experts", lambda p: ".switch_mlp." in p),
)


def _leaf(mod) -> bool:
    """A module that holds a weight of its own (a linear, embedding or switch layer), not a container."""
    return "weight" in mod or "groups" in mod or "scales" in mod


class Study:
    """The float model loaded once, its MoE blocks hooked (:func:`mlx_dupq.moe.routing.install`),
    calibration batches and eval text read; ``part_<name>`` methods measure, :meth:`run_part` writes."""

    def __init__(self, settings: StudySettings, results: str | Path, prefix: str = PREFIX,
                 command: str = "python bench/moe_study.py"):
        self.settings = settings
        self.results = Path(results)
        self.prefix = prefix
        self.command = command  # recorded in every result's meta
        self.model_name = settings.model
        self.path = resolve_model(settings.model)
        self.model, self.tok = load(self.path)
        self.blocks = R.install(self.model)
        self.K = self.blocks[0].k
        self.E = self.blocks[0].num_experts
        self.eval_text = load_text(settings.eval_data)
        self.calib = calibration_batches(self.tok, load_text(settings.calib_data), settings.calib_samples,
                                         settings.seq_len, 0)
        self.base_snap = X.snapshot(self.model)
        self._ppl_cache: dict = {}
        self._routes = None
        self._dfrot = None
        self.refused: dict[str, str] = {}  # auto-<bpw> packs convert --bpw refused (see packs)

    # -- result files
    def part_path(self, part: str) -> Path:
        return self.results / f"{self.prefix}_{part}.json"

    def load_part(self, part: str) -> dict | None:
        """A part's written result, or None."""
        p = self.part_path(part)
        return json.loads(p.read_text()) if p.exists() else None

    def save_part(self, part: str, data: dict) -> None:
        """Write ``data`` as the part's JSON (temp file, then rename)."""
        self.results.mkdir(parents=True, exist_ok=True)
        p = self.part_path(part)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=json_default))
        os.replace(tmp, p)

    def run_part(self, part: str) -> dict:
        """Measure one part, add ``meta`` (settings, seconds), write its JSON, restore the float model."""
        check_parts([part])
        t0 = time.time()
        data = getattr(self, f"part_{part}")()
        data["meta"] = {**self.meta(), "seconds": time.time() - t0}
        self.save_part(part, data)
        self.restore()
        return data

    # -- helpers
    def ppl(self, model=None, **knobs) -> float:
        m = model if model is not None else self.model
        R.install(m, R.Routing(**knobs))
        try:
            return perplexity(m, self.tok, self.eval_text, ctx=self.settings.ctx, windows=self.settings.windows)["ppl"]
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
        s = self.settings
        return {"model": self.model_name, "path": str(self.path), "ctx": s.ctx, "windows": s.windows,
                "eval": s.eval_data, "calib": f"{s.calib_data} {s.calib_samples} x {s.seq_len} tokens",
                "experts": self.E, "k": self.K, "moe_layers": [b.layer for b in self.blocks],
                "command": self.command, "machine": machine_record()}

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
            ids = tokenize(self.tok, "\n\n".join(texts))[: self.settings.genre_tokens]
            n = len(ids) // self.settings.seq_len
            if n < 1:
                continue
            batch = mx.array(ids[: n * self.settings.seq_len].reshape(n, self.settings.seq_len))
            tokens[g] = int(n * self.settings.seq_len)
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
        sb = self.calib[: self.settings.sens_samples]
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
        routes = self.routes()
        out = {}
        for b in self.blocks:
            x = routes[b.layer]["x"][: self.settings.dfrot_tokens]
            h = S.expert_hidden(b, mx.array(x), mx.array(routes[b.layer]["inds"][: self.settings.dfrot_tokens]))
            h = h.reshape(-1, h.shape[-1])
            rx = dfrot(mx.array(x), steps=self.settings.dfrot_steps, gamma=100)
            rh = dfrot(h, steps=self.settings.dfrot_steps, gamma=100)
            out[b.layer] = {"gate_proj": rx, "up_proj": rx, "down_proj": rh}
        return out

    def _dup_plan(self) -> tuple[dict, dict]:
        freqs, cls = self.freqs(), self.classes()
        types = self.load_part("stats")
        groups = {}
        for b in self.blocks:
            t = (types or {}).get("layers", {}).get(str(b.layer), {}).get("types", {}).get("types") or ["general"] * self.E
            groups[b.layer] = [expert_group(float(freqs[b.layer][e]), self.K, cls[b.layer][e], t[e]) for e in range(self.E)]
        return plan_copies(freqs, groups, self.settings.dup_budget), groups

    def part_ladder(self) -> dict:
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
        """Convert (once) and evaluate every pack recipe; cached in moe_packs.json. An ``auto-<bpw>`` pack
        that ``convert --bpw`` refuses for this model (a budget below its floor) is recorded under
        ``refused`` with the one-line reason, and left out of the returned packs."""
        cache = self.load_part("packs") or {}
        out, self.refused = {}, {}
        for name in [p for p in self.settings.packs.split(",") if p]:
            path = Path(self.settings.pack_dir) / name
            if name in cache.get("packs", {}) and path.exists():
                out[name] = cache["packs"][name]
                continue
            log(f"convert {name}")
            cpu0, t0 = time.process_time(), time.time()
            try:
                recipe = pack_recipe(name, self.path)
            except DupqError as e:
                if _auto_bpw(name) is None:
                    raise
                log(f"{name}: refused: {e}")
                self.refused[name] = str(e)
                continue
            base = self.e2e_base(name, recipe)
            extra = {}
            if base is not None:  # only the end-to-end stage, on a copy of the pack convert made without it
                log(f"{name}: the e2e stage on a copy of {base.name} (the same plan)")
                shutil.rmtree(path, ignore_errors=True)
                spec = E2ESpec.from_dict(recipe.refine.e2e)
                resume = (path.with_name(path.name + ".e2e-work") / "state.json").is_file()

                def stage(resume: bool):
                    return distill_pack(base, self.path, spec, out=path, teacher_name=self.model_name,
                                        progress=_e2e_log(name), resume=resume)
                try:  # an interrupted stage with the same pack, teacher, data and options continues
                    e2e = stage(resume)
                except DupqError:
                    if not resume:
                        raise
                    log(f"{name}: its e2e work directory is another run's: starting over")
                    e2e = stage(False)
                bpw = json.loads((path / "config.json").read_text())["mlx_dupq"]["bits_per_weight"]
                extra = {"base": base.name, "e2e": {k: v for k, v in e2e.to_dict().items() if k != "out"}}
            else:
                partial = path.with_name(path.name + ".partial")
                try:  # an interrupted conversion of the same recipe continues where it stopped
                    res = convert(self.path, path, recipe, force=True, resume=partial.exists())
                except DupqError:
                    if not partial.exists():
                        raise
                    res = convert(self.path, path, recipe, force=True)  # another recipe's leftovers: start over
                bpw = res.bits_per_weight
            info = {"bpw": bpw, "path": str(path), "seconds": time.time() - t0,
                    "cpu_seconds": time.process_time() - cpu0, "loadavg": os.getloadavg()[0],
                    "recipe": recipe.description, **extra}
            m, _ = load(path)
            out[name] = {**info, "ppl": self.ppl(m)}
            del m
            self.save_part("packs", {"meta": self.meta(), "packs": {**cache.get("packs", {}), **out}})
        # the packs part's own keys (float PPL, tokens) stay when they were measured the same way
        m, now = cache.get("meta", {}), self.meta()
        same = all(m.get(k) == now[k] for k in ("model", "ctx", "windows", "eval"))
        keep = {k: cache[k] for k in ("fp_ppl", "tokens") if same and k in cache}
        self.save_part("packs", {**keep, "meta": now, "packs": out,
                                 **({"refused": self.refused} if self.refused else {})})
        return out

    def e2e_base(self, name: str, recipe: Recipe) -> Path | None:
        """For ``auto-<bpw>-e2e[N]``: the ``auto-<bpw>`` pack in ``pack_dir`` when its recorded recipe is this
        plan without the end-to-end stage. Convert runs that stage last, on the finished pack, so it is
        run on a copy of that pack instead of converting again (same result, one conversion saved)."""
        if AUTO_E2E not in name or _auto(name) is None:
            return None
        base = Path(self.settings.pack_dir) / name.partition(AUTO_E2E)[0]
        if not (base / "config.json").is_file():
            return None

        def plan(d: dict) -> dict:
            d = Recipe.from_dict(d).to_dict()  # options added since the pack was made at their defaults
            d.pop("description", None)
            d["refine"] = {k: v for k, v in (d.get("refine") or {}).items() if k != "e2e"}
            return d
        stored = json.loads((base / "config.json").read_text()).get("mlx_dupq", {}).get("recipe")
        return base if stored is not None and plan(stored) == plan(recipe.to_dict()) else None

    def part_packs(self) -> dict:
        """Only the packs (converted once, cached): bpw, PPL and its ratio to the float model."""
        packs = self.packs()
        fp = self.fp_ppl()
        return {"fp_ppl": fp, "tokens": self.tokens(),
                "packs": {n: {**p, "vs_float": p["ppl"] / fp} for n, p in packs.items()},
                **({"refused": self.refused} if self.refused else {})}

    def tokens(self) -> int:
        """Predicted tokens of one perplexity (windows x (ctx - 1), fewer if the text is shorter)."""
        return self.settings.windows * (self.settings.ctx - 1)

    def part_pack_parts(self) -> dict:
        """One pack's modules swapped into the float model one part at a time (the rest float): which
        part of the pack costs what. The pack (``pack_dir/parts_pack``) is converted first when it is not
        there; the whole pack is evaluated again, so every row is measured the same way."""
        name = self.settings.parts_pack
        path = Path(self.settings.pack_dir) / name
        recipe = pack_recipe(name, self.path)  # an unknown name fails here, before anything runs
        if not (path / "config.json").exists():
            log(f"convert {name}")
            convert(self.path, path, recipe, force=True)
        pack, _ = load(path)
        mods = dict(pack.named_modules())
        fp = self.fp_ppl()
        rows = [{"part": "float", "ppl": fp, "modules": 0}]
        for part, match in PACK_PARTS:
            model, _ = load(self.path)
            own = dict(model.named_modules())
            n = 0
            for path, mod in mods.items():
                if path and ".groups." not in path and _leaf(mod) and match(path):
                    parent, _, leaf = path.rpartition(".")
                    setattr(own[parent] if parent else model, leaf, mod)
                    n += 1
            rows.append({"part": part, "ppl": self.ppl(model), "modules": n})
            del model
        rows.append({"part": "whole pack", "ppl": self.ppl(pack), "modules": sum(r["modules"] for r in rows)})
        for r in rows:
            r["vs_float"] = r["ppl"] / fp
        return {"pack": name, "path": str(path), "fp_ppl": fp, "tokens": self.tokens(), "rows": rows}

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
        batches = self.calib[: self.settings.sens_samples]
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
               (f"experts INT2 + duplication ({self.settings.dup_budget:.0%})", dict(dup=dup)),
               ("experts INT2 + Hadamard + duplication", dict(rotation="hadamard", dup=dup))]
        if self.settings.dfrot_steps > 0:
            if self._dfrot is None:
                self._dfrot = self._dfrot_rotations()
            out += [("experts INT2 + DFRot", dict(dfrot_rots=self._dfrot)),
                    ("experts INT2 + DFRot + duplication", dict(dfrot_rots=self._dfrot, dup=dup))]
        return out
