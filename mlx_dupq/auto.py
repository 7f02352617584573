"""``mlx-dupq convert MODEL --bpw B``: the best pipeline we have at an all-in budget, chosen for the user.

:func:`plan_auto` decides, in this order, and says why (:class:`Choice` rows):

1. **rotation** (block Hadamard residual + online Hadamard on ``down_proj``). A model whose fold
   adds no stored parameters (untied head, or a final norm of all ones) is rotated: on
   Qwen2.5-Coder-0.5B (untied) rotation + GPTQ 2-bit measured 86.1 PPL against GPTQ's 99.5 at
   5.09 bpw (``bench/results/ladder_qwen2.5-coder-0.5b*.json``), and every best pack of it is
   rotated (``bench/results/w2_qwen2.5-coder-0.5b.json``). A tied embedding that the fold would
   untie (its final norm is not all ones) makes rotation store a second vocabulary-sized matrix,
   whose price depends on the budget and on how cheaply that head can be stored (a ternary one is
   ~1.7 bits/weight). Measured both ways on SmolLM2-135M (tied): rotation + GPTQ 2-bit with
   8-bit embeddings 325 PPL at 5.56 bpw against GPTQ's 385 at 3.77 (the rotation helps, the
   untied head costs 1.8 bpw), and ``w2`` (rotation, untied ternary embedding, 3-bit head, 2-bit
   layers) 630.5 at 3.11 bpw against the unrotated allocated GPTQ recipe's 260.2 at 3.00
   (``bench/results/ladder_smollm2-135m*.json``, ``w2_smollm2-135m.json``). So no fixed rule:
   such a model is **planned both ways** (steps 3, with the untied head allocated like any
   module) and the plan with the lower whole-plan KL is kept (:func:`~mlx_dupq.search.sensitivity.planned_kl`:
   every module rounded to nearest at its planned spec at once, KL of the logits against the
   float model's on the calibration tokens; one forward pass per plan). Round to nearest is not
   GPTQ: rotation helps GPTQ more than RTN (docs/quality.md), so this comparison leans against
   rotation.
2. **GPTQ** on calibration text (``mix:calib``: Brown, Lee news and Python source, :data:`CALIB_SAMPLES`
   x 512 tokens), the head included when separate. The plan's sensitivities use the same text. Prose alone
   (``brown:calib``, the default before) left Qwen2.5-Coder-0.5B's ``--bpw 2.5`` pack at 1.51x its
   reference on prose but 3.04x on held-out code (``bench/results/learned_qwen2.5-coder-0.5b.json``).
3. **bit allocation** to ``B`` with the cheap ``proxy`` sensitivity (each module's relative output
   error on its own float inputs; seconds, no extra forward passes) over 2-bit g64 and g128, 3/4-bit
   g128 and 8-bit g64 candidates (:data:`LAYER_CANDIDATES`; 2-bit g128 only when the budget needs
   it, see ``_allocate``), the embedding and head also ternary
   (1.58 bits, groups of 128, symmetric: :data:`TERNARY_SPEC`, as ``recipes/w2-t3.toml`` stores
   them); the embedding and head kept at >= 4 bits when that fits, else >= 3, else anything down to
   ternary (:data:`EMBED_FLOORS`) -- except a tied embedding, which is the head too and keeps
   ``mse`` (no GPTQ: ``pipeline._head_group``), where an mse ternary head measured 80.01 against
   64.27 at 2 bits on Qwen2.5-Coder-0.5B: it is offered no ternary candidate, and its proxy adds the
   head's output error. Ternary replaces the old last floor of 2 bits: on
   Qwen2.5-Coder-0.5B a ternary lm_head GPTQ'd against the final states costs PPL 46.97 alone
   against 48.58 at 2 bits g128 and 42.58 at 3 bits, a ternary embedding 43.26 against 42.55 at 2
   bits (reference 41.58; ``bench/results/head_sensitivity_qwen2.5-coder-0.5b.json``), and the
   ternary head's bits bought 3-bit decoder layers in the best packs at <= 2.6 bpw (``w2-t3``
   56.76 at 2.596, ``w2-t3a`` 61.50 at 2.499 against ``w2``'s 3-bit head 104.6 at 2.498).
4. **block reconstruction** (``[refine.block]``, :mod:`mlx_dupq.refine.block`) at :data:`BLOCK_DEFAULTS`.
5. **end-to-end distillation** (``[refine.e2e]``, :mod:`mlx_dupq.refine.e2e`): the pack's scales,
   biases and norms trained against the float model's next-token distribution on ``mix:calib``
   (:data:`E2E_DEFAULTS`, chosen from the SmolLM2-135M measurements in docs/e2e.md);
   ``e2e_steps`` sets its steps (0 skips it).

The budget is all-in (embeddings, head, norms, scales and biases count), as ``inspect`` reports it;
the allocation plans with the real packed sizes, so the pack is at or below ``B``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass

import mlx.core as mx

from ._env import release_memory
from .config import EMBED_PATTERN, LM_HEAD_PATTERN, Recipe
from .errors import DupqError, UsageError
from .eval.data import calibration_batches, load_text
from .io.loader import load_model, tokenizer_of
from .io.source import open_source
from .refine.e2e_spec import E2ESpec
from .refine.spec import BlockSpec, RefineSpec
from .rotation.plan import plan_rotation
from .search.allocate import allocate
from .search.sensitivity import Sensitivity, measure_sensitivity, planned_kl, rotate_float_model
from .specs import TERNARY, QuantizerSpec, QuantSpec, RotationSpec

#: decoder-linear candidates: 2 bits in groups of 64 and 128 (the latter reaches 2.25 bpw budgets),
#: 3/4 bits in groups of 128 where rows allow, 8 bits in groups of 64
LAYER_CANDIDATES = ((2, 64), (2, 128), (3, 128), (4, 128), (8, 64))
#: offered to the decoder linears only when the budget cannot be met without it (see ``_allocate``)
G128_2BIT = QuantSpec(2, 128)
#: ternary {-1, 0, +1} x scale, groups of 128, symmetric: the embedding and head of recipes/w2-t3.toml
TERNARY_SPEC = QuantSpec(TERNARY, 128, symmetric=True)
#: embedding and lm_head candidates: the layers' and ternary
HEAD_CANDIDATES = (TERNARY_SPEC, *LAYER_CANDIDATES)
#: minimum bits of the embedding and head, the first that fits the budget wins. Not the lowest whole-plan
#: RTN KL (planned_kl): on SmolLM2-135M --bpw 3.0 that kept a 3-bit tied embedding (KL 5.203 against 5.624
#: at >= 4 bits; its bits bought 68 more 3/4-bit decoder linears), whose pack measured brown:eval 219.9,
#: code:eval 24.45 against the 4-bit one's 220.0, 20.60 (4,088 tokens each, 2.9993 bpw, no e2e;
#: learned_smollm2-135m_embedfloor.json vs learned_smollm2-135m_mix.json; the former made by the commit
#: "convert --bpw: every embedding floor that fits ... is planned", since reverted, recorded there as 68bc060,
#: its hash before a rebase). RTN overstates the GPTQ'd decoder's error and not the mse embedding's.
EMBED_FLOORS = (4, 3, TERNARY)
ROTATION_NAME = "block Hadamard + online down_proj"
#: calibration sequences of 512 tokens for GPTQ and the block stage. 64 rather than the 16 of the hand recipes:
#: on Qwen2.5-Coder-0.5B's --bpw 2.5 plan, GPTQ alone (no refinement) measured brown:eval 73.09 / code:eval 5.716
#: on 64 x 512 tokens against 82.78 / 6.240 on 16 x 512 (2,044 tokens each); the whole --bpw 2.5 (block stage once
#: over 62 sequences, e2e 80 steps) 64.36 / 5.323 against 68.53 / 5.431, but its layer loop took 2,170 s, not ~1,170
#: (``bench/results/learned_qwen2.5-coder-0.5b_calib64.json``, docs/learned.md "Calibration tokens")
CALIB_SAMPLES = 64
E2E_MODULE = "mlx_dupq.refine.e2e"
#: The ``[refine.block]`` stage of ``convert --bpw``: every calibration sequence but the held-out ones
#: (62 x 512 tokens), each once (62 steps), lr 1e-4 on scales, biases and norms. It was 4 epochs of 14 x 512
#: (56 steps) when GPTQ had 16 sequences: the same steps, 4x the distinct tokens. On layer 3 of
#: Qwen2.5-Coder-0.5B under ``w2-t3`` it took the held-out output error from 0.0019 to 0.0008, where
#: BlockSpec's own defaults (8 steps of 4 x 256 tokens) reached 0.0015 and lr 1e-3 0.0013
#: (``bench/results/block_sweep_qwen2.5-coder-0.5b.json``).
#: GPTQ's coordinate-descent sweeps in ``convert --bpw`` (``[quantizer] cd_sweeps``, docs/quality.md).
CD_SWEEPS = 0
#: With 4 epochs of 14 x 512 tokens, ``min_gain`` 0.01 (a layer stopping after an epoch gaining < 1 %) cut
#: Qwen2.5-Coder-0.5B's --bpw 2.5 layer loop from 1,170 to 831 s but left the pack's validation KL
#: before e2e at 0.974 against 0.954, still behind after 80 e2e steps (0.748 vs 0.728; docs/learned.md)
#: With 64 x 512 tokens the 62-step pass took ~35 s of each layer's ~82 s on Qwen2.5-Coder-0.5B's --bpw 2.5
#: pack; 17 of its 24 layers gained < 1 % held-out error (3 none), layer 2 lost (init kept), layer 3 gained 35 %; a layer
#: now stops after 16 steps that gained < 0.5 % (``check_every``, ``min_gain``): the whole convert 3,103 s quiet
#: (+322 s of teacher answers on a fresh machine) against ~68 min, 63.11 / 5.437 against 64.36 / 5.323
#: (``bench/results/learned_qwen2.5-coder-0.5b_check16.json``, docs/learned.md).
BLOCK_DEFAULTS = dict(samples=None, seq_len=None, epochs=1, lr=1e-4, check_every=16, min_gain=0.005)
BLOCK_WHY = (f"up to {CALIB_SAMPLES - BlockSpec().holdout} steps of 512 tokens, each calibration sequence once, "
             f"a layer stopping after {BLOCK_DEFAULTS['check_every']} steps that gain "
             f"< {BLOCK_DEFAULTS['min_gain'] * 100:g} % (docs/learned.md); kept only if the held-out error drops")
#: the e2e stage of ``convert --bpw``: Adam on the stored scales and biases, each group's step 5e-4 of
#: its own initial |scale| (``relative``). One absolute step cannot fit a pack whose layers mix 2 to 8
#: bits: Qwen2.5-Coder-0.5B's ``--bpw 2.5`` pack (scales spanning ~50x between layers) did not train at
#: 5e-4 x the pack's median |scale| (validation KL 0.7322 -> 0.7305 best in 12 steps, loss spikes) and
#: did at relative 5e-4 (0.7322 -> 0.6357, still falling; ``bench/results/e2e_study_qwen2.5-coder-0.5b.json``).
#: Earlier, in absolute units (docs/e2e.md): SmolLM2-135M's 3-bit pack trained best at 1e-4 and got
#: worse at 1e-3, relative 3e-3 (6x this step) raised its KL; Qwen's all-3-bit w2-t3 trained at 1e-5
#: and diverged at 1e-4. Temperature 2 did not beat 1 at equal windows. One window of 256 tokens per
#: step, every window seen once. Each decoder layer is recomputed in the backward pass (``grad_checkpoint``):
#: on that Qwen pack a training step's resident memory fell from 6.1 to 3.4 GB (MLX peak 6.5 -> 3.2 GB) for
#: 0-15 % more time per step (``bench/results/e2e_memory_qwen2.5-coder-0.5b*.json``, docs/e2e.md "Memory").
#: Two changes measured on that pack did not beat this (docs/learned.md): 130 steps after a shorter block
#: stage (validation KL stopped falling after ~100 steps at 0.738; ``learned_..._mingain_e130.json``), and a
#: cosine decay from relative 1e-3 (0.750 at step 80 against 0.728; ``learned_..._cosine.json``).
#: A third of the windows are chat turns (``chat_samples``, ``chat_data = "self"``: the float teacher's own
#: answers to prompts built from the calibration text, :mod:`mlx_dupq.refine.chat_data`). On SmolLM2-135M's
#: 3-bit pack, 120 steps (80 text + 40 chat windows against 120 text windows): KL on 5,969 held-out answer
#: tokens 1.121 vs 1.243, greedy answers to three prompts begin with the right sentence (then loop) where
#: the text-only pack answers with nothing; brown:eval PPL 105.65 vs 102.98 (4,088 tokens;
#: ``bench/results/chat_eval_smollm2-135m.json``, docs/e2e.md "Chat turns"). smollm2-135m-moe's 3-bit pack,
#: 200 steps (134 text + 66 chat against 200 text): KL 0.949 vs 1.073, PPL 97.96 vs 91.83 (docs/moe.md).
#: Qwen2.5-Coder-0.5B's --bpw 2.5 pack, 80 steps (54 text + 26 chat against 80 text): brown:eval 68.53 vs 68.35,
#: code:eval 5.431 vs 5.364 (``bench/results/learned_qwen2.5-coder-0.5b_chat.json``, docs/learned.md).
E2E_CHAT_SHARE = 1 / 3
E2E_DEFAULTS = dict(steps=80, lr=5e-4, relative=True, batch=1, seq_len=256, samples=54, chat_samples=26,
                    valid_samples=4, temperature=1.0, top_k=256, trainable=["scales", "biases"], eval_every=20,
                    patience=0, data="mix:calib", grad_checkpoint=True)
E2E_WHY = ("relative steps of 5e-4 per group: one absolute lr did not train Qwen2.5-Coder-0.5B's mixed "
           "2-8-bit pack, this did; a third of the windows are chat turns of the teacher's own answers, so "
           "the pack answers in chat (docs/e2e.md)")


def e2e_windows(steps: int, batch: int, samples: int | None = None, chat_samples: int | None = None
                ) -> tuple[int, int]:
    """(text windows, chat windows) of an e2e stage of ``steps`` x ``batch`` windows, each seen once:
    :data:`E2E_CHAT_SHARE` of them chat turns, unless given."""
    total = max(steps, 1) * batch
    chat = int(total * E2E_CHAT_SHARE) if chat_samples is None else chat_samples
    return (max(total - chat, batch) if samples is None else samples), chat


@dataclass(frozen=True)
class Choice:
    step: str
    choice: str
    why: str


def _rotation(model: str) -> tuple[RotationSpec | None, str, bool]:
    """(spec or None, why, whether the fold unties a tied embedding)."""
    spec = RotationSpec(kind="block_hadamard", online_down=True)
    src = open_source(model)
    try:
        plan = plan_rotation(spec, src.config, src.keys(), lambda k: src.get(k).astype(mx.float32))
    except DupqError as e:
        return None, f"not applicable ({e})", False
    unties = plan.config_update.get("tie_word_embeddings") is False and src.config.get("tie_word_embeddings", False)
    return spec, "no extra stored parameters; rotation + GPTQ beat GPTQ on Qwen2.5-Coder-0.5B (86.1 vs 99.5)", unties


@dataclass
class _Plan:
    rotation: RotationSpec | None
    recipe: Recipe | None  # None: the budget is below what this model's candidates reach
    floor: float | None
    lowest: float  # the smallest all-in bits/weight reachable with the candidates
    highest: float  # the largest: every module at its widest candidate
    table: Sensitivity
    tied: bool  # the embedding is also the head (no ternary candidate for it)


def _allocate(m, tokens, base: Recipe, bpw: float, progress) -> _Plan:
    # a tied embedding (no lm_head module) is the head too and keeps mse (no GPTQ, pipeline._head_group):
    # ternary is offered only to an embedding or head that is not tied
    tied = not hasattr(m, "lm_head")
    table = measure_sensitivity(m, tokens, base, bits=LAYER_CANDIDATES, measures=("proxy",), progress=progress,
                                path_bits={f"{EMBED_PATTERN}|{LM_HEAD_PATTERN}": LAYER_CANDIDATES if tied
                                           else HEAD_CANDIDATES})
    lowest = (table.fixed_bits + sum(min(b.values()) for b in table.bits.values())) / table.n_params
    highest = (table.fixed_bits + sum(max(b.values()) for b in table.bits.values())) / table.n_params
    # 2-bit g128 layers only where the budget needs them: the proxy rates them close to g64 and spends
    # the saving elsewhere, but measured whole, SmolLM2-135M --bpw 3.0 with them (every down_proj) got
    # brown:eval 208.9 / code:eval 1,574 against 193.7 / 927.3 without (4,088 tokens each;
    # bench/results/learned_smollm2-135m_bpw3.0_plan2.json vs learned_smollm2-135m_bpw3.0*.json)
    tables = (_without(table, G128_2BIT), table)
    for floor in EMBED_FLOORS:
        for t in tables:
            try:
                rec = allocate(t, bpw, base, measure="proxy", embed_min_bits=floor, name=base.name)
                return _Plan(base.rotation, rec, floor, lowest, highest, table, tied)
            except DupqError:
                continue
    return _Plan(base.rotation, None, None, lowest, highest, table, tied)


def _without(table: Sensitivity, spec: QuantSpec) -> Sensitivity:
    """``table`` without the candidate ``spec`` for the decoder linears (the embedding and head keep it)."""
    label = spec.label()

    def drop(d: dict) -> dict:
        return {p: c if re.search(EMBED_PATTERN, p) or re.search(LM_HEAD_PATTERN, p)
                else {k: v for k, v in c.items() if k != label} for p, c in d.items()}
    return dataclasses.replace(table, bits=drop(table.bits), proxy=drop(table.proxy), kl=drop(table.kl))


def _head_specs(plan: _Plan) -> str:
    """'embedding wtg128s, lm_head w3g128' of an allocated plan."""
    out = []
    for path in sorted(plan.table.bits):
        if re.search(EMBED_PATTERN, path) or re.search(LM_HEAD_PATTERN, path):
            stored = plan.table.stored_spec(path, plan.recipe.spec_for(path).label())  # as the pack holds it
            out.append(f"{path.split('.')[-1]} {stored.label()}")
    return ", ".join(out)


def _untying_rotation(plans, fits, tokens, bpw: float) -> tuple[_Plan, Choice]:
    """Rotation that unties a tied head: the fitting plan, or of two the one with the lower whole-plan KL."""
    if len(fits) == 1:
        plan = fits[0][0]
        other = next(p for p, _ in plans if p is not plan)
        return plan, Choice("rotation", ROTATION_NAME + " (head untied)" if plan.rotation is not None else "none",
                            f"the fold unties the tied embedding; only this plan fits --bpw {bpw:g} (the other "
                            f"needs >= {other.lowest:.4f} bits/weight)")
    kl_plain, kl_rot = (planned_kl(mm, tokens, p.recipe) for p, mm in fits)
    plan = fits[1][0] if kl_rot < kl_plain else fits[0][0]
    return plan, Choice(
        "rotation", ROTATION_NAME + " (head untied)" if plan.rotation is not None else "none",
        f"the fold unties the tied embedding, so both were planned at --bpw {bpw:g}: whole-plan RTN KL "
        f"{kl_rot:.4g} rotated (untied head stored) vs {kl_plain:.4g} without on the calibration tokens, the "
        "lower kept (RTN leans against rotation; SmolLM2-135M measured untied w2 630.5 at 3.11 bpw vs the "
        "unrotated allocation's 260.2 at 3.00)")


def _lr_unit(spec) -> str:
    return " x median |scale|" if spec.lr_per_scale else " of each group's |scale|" if spec.relative else ""


def _e2e(steps: int | None) -> tuple[dict | None, Choice]:
    if steps == 0:
        return None, Choice("e2e distillation", "skipped", "--e2e-steps 0")
    if importlib.util.find_spec(E2E_MODULE) is None:
        return None, Choice("e2e distillation", "skipped", f"{E2E_MODULE} is not in this installation")
    opts = dict(E2E_DEFAULTS, steps=E2E_DEFAULTS["steps"] if steps is None else steps)
    opts["samples"], opts["chat_samples"] = e2e_windows(opts["steps"], opts["batch"])  # every window seen once
    spec = E2ESpec.from_dict(opts)  # validates (a bad --e2e-steps: one line, before anything runs)
    return spec.to_dict(), Choice(
        "e2e distillation", f"{spec.steps} steps x {spec.batch} x {spec.seq_len} tokens "
        f"({spec.samples} text, {spec.chat_samples} chat windows), "
        f"lr {spec.lr:g}{_lr_unit(spec)}{' decayed along a cosine' if spec.schedule == 'cosine' else ''}, "
        f"temperature {spec.temperature:g}, {', '.join(spec.trainable)}",
        f"{spec.data}; {E2E_WHY}; --e2e-steps N changes the steps (0 skips)")


def plan_auto(model: str, bpw: float, *, calib_data: str = "mix:calib", e2e_steps: int | None = None,
              cd_sweeps: int = CD_SWEEPS, progress=None) -> tuple[Recipe, list[Choice]]:
    """The recipe ``convert --bpw`` runs for ``model`` at ``bpw`` all-in bits/weight, and why.
    ``e2e_steps``: steps of the end-to-end stage (None: :data:`E2E_DEFAULTS`; 0: no e2e stage).
    ``cd_sweeps``: GPTQ's coordinate-descent sweeps (``[quantizer] cd_sweeps``)."""
    if not bpw > 0:
        raise UsageError(f"--bpw {bpw!r} must be a positive number of bits per weight, e.g. 2.5 or 3")
    if e2e_steps is not None and (isinstance(e2e_steps, bool) or not isinstance(e2e_steps, int) or e2e_steps < 0):
        raise DupqError(f"--e2e-steps {e2e_steps!r} must be an integer >= 0 (0 skips end-to-end distillation)")
    e2e, e2e_choice = _e2e(e2e_steps)
    rotation, rot_why, unties = _rotation(model)
    quantizer = QuantizerSpec(method="gptq", calib_data=calib_data, calib_samples=CALIB_SAMPLES, calib_seq_len=512,
                              calib_head=True, cd_sweeps=cd_sweeps)
    base = Recipe(name=f"auto-{bpw:g}", default=QuantSpec(2, 64), embed=QuantSpec(4, 64), lm_head=QuantSpec(4, 64),
                  rotation=None, quantizer=quantizer)
    m, config, tok_dir = load_model(model)
    tokens = calibration_batches(tokenizer_of(tok_dir, config), load_text(calib_data), 4, 128, 0)
    plans = []  # (plan, its float model)
    if rotation is None or unties:
        plans.append((_allocate(m, tokens, base, bpw, progress), m))
    if rotation is not None:
        # the unrotated model is not planned unless the rotation unties the head: then rotate it in place,
        # each layer freed as it is rotated (Qwen2.5-Coder-0.5B: 2.4 GB in float32)
        rm = rotate_float_model(m, config, rotation, consume=not unties)
        if not unties:
            del m
        plans.append((_allocate(rm, tokens, dataclasses.replace(base, rotation=rotation), bpw, progress), rm))
    fits = [(p, mm) for p, mm in plans if p.recipe is not None]
    if not fits:
        lowest = min(p.lowest for p, _ in plans)
        raise UsageError(f"--bpw {bpw:g} is below the smallest all-in budget reachable for {model} "
                        f"({lowest:.4f} bits/weight with 2-bit layers and a ternary embedding and head, 2-bit when tied); "
                        "raise --bpw")
    if not unties:
        plan = fits[0][0]
        rot_choice = Choice("rotation", ROTATION_NAME if rotation is not None else "none", rot_why)
    else:
        plan, rot_choice = _untying_rotation(plans, fits, tokens, bpw)
    del plans, fits
    release_memory()  # the plans' float models: the conversion runs next
    rec = plan.recipe
    rec = Recipe.from_dict({**rec.to_dict(), "refine": RefineSpec(block=BlockSpec(**BLOCK_DEFAULTS), e2e=e2e).to_dict()})
    floor_why = {4: "embedding/head >= 4 bits (fits)", 3: "embedding/head >= 3 bits (4 does not fit)",
                 TERNARY: "embedding/head down to ternary (3 bits do not fit; a ternary GPTQ head measured "
                          "46.97 vs 48.58 at 2 bits on Qwen2.5-Coder-0.5B, reference 41.58)"}[plan.floor]
    if plan.tied and plan.floor == TERNARY:
        floor_why = ("tied embedding down to 2 bits (3 bits do not fit; it is the head too and keeps mse, and an mse "
                     "ternary head measured 80.01 vs 64.27 at 2 bits on Qwen2.5-Coder-0.5B, reference 41.58)")
    if bpw > plan.highest:  # allocate() gives every module its widest candidate: say so, the pack is smaller than asked
        floor_why += (f"; --bpw {bpw:g} is above the widest plan ({plan.highest:.4f} bits/weight, every module at "
                      "its widest candidate): that plan")
    choices = [
        rot_choice,
        Choice("quantizer", f"GPTQ, {CALIB_SAMPLES} x 512 tokens"
               + (f", {cd_sweeps} coordinate-descent sweeps" if cd_sweeps else ""),
               f"{calib_data}; lm_head calibrated on the final states"),
        Choice("allocation", f"{rec.description.split('; ')[-1]}; {_head_specs(plan)}",
               f"proxy sensitivity, {floor_why}; {rec.description.split(' (')[1].split(')')[0]}"),
        Choice("block refine", "scales, biases, norms" + (", MoE experts too" if any(
            ".switch_mlp." in p for p in plan.table.params) else ""), f"reproduce each float layer: {BLOCK_WHY}"),
        e2e_choice,
    ]
    desc = f"convert --bpw {bpw:g}: " + "; ".join(f"{c.step}: {c.choice}" for c in choices)
    return Recipe.from_dict({**rec.to_dict(), "description": desc}), choices
