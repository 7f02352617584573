"""``mlx-dupq convert MODEL --bpw B``: the best pipeline we have at an all-in budget, chosen for the user.

:func:`plan_auto` decides, in this order, and says why (:class:`Choice` rows):

1. **rotation** (block Hadamard residual + online Hadamard on ``down_proj``) only when it adds no
   stored parameters: a model whose tied embedding would have to be untied by the fold (its final
   norm is not all ones) pays a second vocabulary-sized matrix, which at a fixed budget costs more
   than rotation recovers (SmolLM2-135M: rotation + GPTQ 325 PPL at 5.56 bpw against the allocated
   GPTQ recipe's 260 at 3.0, ``bench/results/ladder_smollm2-135m*.json``).
2. **GPTQ** on calibration text (``brown:calib``, 16 x 512 tokens), the head included when separate.
3. **bit allocation** to ``B`` with the cheap ``proxy`` sensitivity (each module's relative output
   error on its own float inputs; seconds, no extra forward passes) over 2-bit g64, 3/4-bit g128 and 8-bit g64 candidates,
   the embedding and head kept at >= 4 bits when that fits (else 3, else 2).
4. **block reconstruction** (``[refine.block]``, :mod:`mlx_dupq.refine.block`) with its defaults.
5. **end-to-end distillation** (``[refine.e2e]``, :mod:`mlx_dupq.refine.e2e`): the pack's scales,
   biases and norms trained against the float model's next-token distribution on ``mix:calib``
   (:data:`E2E_DEFAULTS`, chosen from the SmolLM2-135M measurements in docs/e2e.md);
   ``e2e_steps`` sets its steps (0 skips it).

The budget is all-in (embeddings, head, norms, scales and biases count), as ``inspect`` reports it;
the allocation plans with the real packed sizes, so the pack is at or below ``B``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import mlx.core as mx

from .config import Recipe
from .errors import DupqError
from .eval.data import calibration_batches, load_text
from .io.loader import load_model, tokenizer_of
from .io.source import open_source
from .refine.e2e_spec import E2ESpec
from .refine.spec import BlockSpec, RefineSpec
from .rotation.plan import plan_rotation
from .search.allocate import allocate
from .search.sensitivity import measure_sensitivity, rotate_float_model
from .specs import QuantizerSpec, QuantSpec, RotationSpec

CANDIDATES = ((2, 64), (3, 128), (4, 128), (8, 64))  # 3/4 bits in groups of 128 where rows allow
EMBED_FLOORS = (4, 3, 2)
E2E_MODULE = "mlx_dupq.refine.e2e"
#: the e2e stage of ``convert --bpw``: the settings measured on SmolLM2-135M's 3-bit pack (docs/e2e.md,
#: "What moves a 3-bit SmolLM2 pack", bench/results/e2e_study_smollm2-135m.json): Adam lr 1e-4 on the
#: stored (absolute) scales and biases; lr 1e-3 and relative steps of 3e-3 raised the validation KL
#: or barely lowered it, temperature 2 did not beat 1 at equal windows. One window of 256 tokens per
#: step, every window seen once; 80 steps is what a shared 2-core CPU ran in about 40 minutes.
E2E_DEFAULTS = dict(steps=80, lr=1e-4, batch=1, seq_len=256, samples=80, valid_samples=4, temperature=1.0,
                    top_k=256, trainable=["scales", "biases"], eval_every=20, patience=0, data="mix:calib")
E2E_WHY = "lr 1e-4 absolute and temperature 1 measured best on SmolLM2-135M (docs/e2e.md)"


@dataclass(frozen=True)
class Choice:
    step: str
    choice: str
    why: str


def _rotation(model: str) -> tuple[RotationSpec | None, Choice]:
    spec = RotationSpec(kind="block_hadamard", online_down=True)
    src = open_source(model)
    try:
        plan = plan_rotation(spec, src.config, src.keys(), lambda k: src.get(k).astype(mx.float32))
    except DupqError as e:
        return None, Choice("rotation", "none", f"not applicable ({e})")
    if plan.config_update.get("tie_word_embeddings") is False and src.config.get("tie_word_embeddings", False):
        return None, Choice("rotation", "none", "it would untie the tied embedding: a second "
                            "vocabulary-sized matrix costs more bits than rotation saves")
    return spec, Choice("rotation", "block Hadamard + online down_proj", "no extra stored parameters")


def _e2e(steps: int | None) -> tuple[dict | None, Choice]:
    if steps == 0:
        return None, Choice("e2e distillation", "skipped", "--e2e-steps 0")
    if importlib.util.find_spec(E2E_MODULE) is None:
        return None, Choice("e2e distillation", "skipped", f"{E2E_MODULE} is not in this installation")
    opts = dict(E2E_DEFAULTS, steps=E2E_DEFAULTS["steps"] if steps is None else steps)
    opts["samples"] = max(opts["steps"], 1) * opts["batch"]  # every training window seen once
    spec = E2ESpec.from_dict(opts)  # validates (a bad --e2e-steps: one line, before anything runs)
    return spec.to_dict(), Choice(
        "e2e distillation", f"{spec.steps} steps x {spec.batch} x {spec.seq_len} tokens, lr {spec.lr:g}, "
        f"temperature {spec.temperature:g}, {', '.join(spec.trainable)}",
        f"{spec.data}; {E2E_WHY}; --e2e-steps N changes the steps (0 skips)")


def plan_auto(model: str, bpw: float, *, calib_data: str = "brown:calib", e2e_steps: int | None = None,
              progress=None) -> tuple[Recipe, list[Choice]]:
    """The recipe ``convert --bpw`` runs for ``model`` at ``bpw`` all-in bits/weight, and why.
    ``e2e_steps``: steps of the end-to-end stage (None: :data:`E2E_DEFAULTS`; 0: no e2e stage)."""
    if not bpw > 0:
        raise DupqError(f"--bpw {bpw!r} must be a positive number of bits per weight, e.g. 2.5 or 3")
    if e2e_steps is not None and (isinstance(e2e_steps, bool) or not isinstance(e2e_steps, int) or e2e_steps < 0):
        raise DupqError(f"--e2e-steps {e2e_steps!r} must be an integer >= 0 (0 skips end-to-end distillation)")
    e2e, e2e_choice = _e2e(e2e_steps)
    rotation, rot_choice = _rotation(model)
    quantizer = QuantizerSpec(method="gptq", calib_data=calib_data, calib_samples=16, calib_seq_len=512,
                              calib_head=True)
    base = Recipe(name=f"auto-{bpw:g}", default=QuantSpec(2, 64), embed=QuantSpec(4, 64), lm_head=QuantSpec(4, 64),
                  rotation=rotation, quantizer=quantizer)
    m, config, tok_dir = load_model(model)
    tokens = calibration_batches(tokenizer_of(tok_dir, config), load_text(calib_data), 4, 128, 0)
    if rotation is not None:
        m = rotate_float_model(m, config, rotation)
    table = measure_sensitivity(m, tokens, base, bits=CANDIDATES, measures=("proxy",), progress=progress)
    del m
    rec, floor, err = None, None, None
    for floor in EMBED_FLOORS:
        try:
            rec = allocate(table, bpw, base, measure="proxy", embed_min_bits=floor, name=base.name)
            break
        except DupqError as e:
            err = e
    if rec is None:
        lowest = str(err).split("smallest reachable ")[-1].split(" ")[0]
        raise DupqError(f"--bpw {bpw:g} is below the smallest all-in budget reachable for {model} "
                        f"({lowest} bits/weight with 2-bit layers and a 2-bit embedding); raise --bpw")
    rec = Recipe.from_dict({**rec.to_dict(), "refine": RefineSpec(block=BlockSpec(), e2e=e2e).to_dict()})
    choices = [
        rot_choice,
        Choice("quantizer", "GPTQ, 16 x 512 tokens", f"{calib_data}; lm_head calibrated on the final states"),
        Choice("allocation", rec.description.split("; ")[-1],
               f"proxy sensitivity, embedding/head >= {floor} bits; {rec.description.split(' (')[1].split(')')[0]}"),
        Choice("block refine", "scales, biases, norms", "reproduce each float layer; keep only if held-out error drops"),
        e2e_choice,
    ]
    desc = f"convert --bpw {bpw:g}: " + "; ".join(f"{c.step}: {c.choice}" for c in choices)
    return Recipe.from_dict({**rec.to_dict(), "description": desc}), choices
