"""Issue 4's headline table: our ~2-bit recipes against mlx-lm's own quantizers, in one run.

    python bench/w2_compare.py --model qwen2.5-coder-0.5b --windows 4 \
        --rows reference,dupq:w2,mlxlm:rtn:2:64,mlxlm:mixed_2_6,mlxlm:gptq:2:64:4:64,mlxlm:awq:2:64:4:64

Every row is evaluated with the same protocol (``--data`` windows of ``--ctx`` tokens) and reports
*all-in* bits per weight: every stored tensor byte (packed codes, scales, biases, norms, the
float parts) divided by the float model's parameter count — mlx-lm's own ``compute_bits_per_weight``
leaves out the embedding, which at 2 bits is most of the story.

Row kinds:
  reference                 the dequantized GGUF in float32
  dupq:RECIPE               ``mlx-dupq convert`` with a named recipe (recipes/RECIPE.toml)
  mlxlm:rtn:B:G             ``mlx_lm.convert -q --q-bits B --q-group-size G`` (embeddings too)
  mlxlm:mixed_2_6 (etc.)    ``mlx_lm.convert --quant-predicate mixed_2_6`` (group 64)
  mlxlm:gptq:B:G:FB:FG      ``mlx_lm.quant.gptq.gptq_quantize``: linears B-bit GPTQ, the rest FB-bit RTN
  mlxlm:awq:B:G:EB:EG[:N]   ``mlx_lm.quant.awq.awq_quantize``: linears B-bit AWQ, embedding/lm_head EB-bit
                            (N: calibration sequences for this row, when the CPU cannot afford them all)
  mlxlm:dwq:B:G:STEPS       ``mlx_lm.quant.dwq.dwq_quantize``: B-bit RTN, then STEPS distillation steps on
                            the quantization scales/biases (float model as teacher, its temperature 2);
                            ``--dwq-windows e2e``: on the windows of ``--calib`` the e2e stage of
                            ``convert --bpw`` trains and validates on (STEPS x 1 x 256 tokens, 4 held out)

mlx-lm's calibrated methods get the same calibration tokens as ours (``--calib``, default
``brown:calib``, disjoint from ``brown:eval``; ``--calib-samples`` x ``--calib-len``), not the
calibration file they download by default (unreachable here). They run unmodified except that
``nn.QuantizedLinear`` is switched to dequantize-then-matmul for multi-row inputs on the CPU
(:mod:`mlx_dupq.layers.cpu`; same numbers, ~10x faster) and the model runs in float32; packs are
saved with float16 scales, like ours. Packs are cached in ``--work`` and reused on a re-run (delete a
directory to redo it); the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from mlx_dupq._env import machine_record, reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_dupq.config import load_recipe  # noqa: E402
from mlx_dupq.eval.data import calibration_batches, load_text  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.io.source import open_source, write_hf_dir  # noqa: E402
from mlx_dupq.layers.cpu import DensePrefillQuantizedLinear, use_dense_prefill  # noqa: E402
from mlx_dupq.pipeline import convert  # noqa: E402
from rtn_table import evaluate, weight_bits  # noqa: E402  (bench/, same protocol)

DONE = ".w2_compare_done"


def _mlx_load(float_dir: Path):
    from mlx_lm.utils import load as mlx_load

    model, tok, config = mlx_load(str(float_dir), return_config=True)
    model.set_dtype(mx.float32)
    return model, tok, config


def _mlx_save(out: Path, float_dir: Path, model, tok, config) -> None:
    from mlx_lm.utils import save

    model.set_dtype(mx.float16)  # floating parameters only: scales, biases, norms, float layers
    config = dict(config, torch_dtype="float16")
    save(str(out), str(float_dir), model, tok, config)


def _calib(tok, args, samples: int | None = None) -> mx.array:
    return calibration_batches(tok, load_text(args.calib), samples or args.calib_samples, args.calib_len, seed=0)


def _dwq_windows(tok, args, steps: int) -> tuple[list, list, int, int, dict]:
    """DWQ's (train, valid, batch, max_seq_length, record) for ``--dwq-windows``:

    ``calib``: ``steps`` x 2 training + 4 validation windows of ``--calib-len`` tokens drawn from
    ``--calib`` like the other calibrated rows (at most ``--calib-samples`` in all), batch 2;
    ``e2e``: the very windows the e2e stage of ``convert --bpw`` trains and validates on
    (:data:`mlx_dupq.auto.E2E_DEFAULTS` with ``steps`` steps, text only, ``--calib``: disjoint windows of
    seq_len + 1 tokens, seed 0), batch as that stage's; each window feeds seq_len tokens (DWQ drops
    the last), so the token budget is the stage's."""
    if args.dwq_windows == "e2e":
        from mlx_dupq.auto import _e2e
        from mlx_dupq.eval.data import tokenize
        from mlx_dupq.refine.e2e import calibration_windows
        from mlx_dupq.refine.e2e_spec import E2ESpec

        opts, _ = _e2e(steps)
        # all of them text, as the e2e stage before its chat turns (DWQ has no chat data; the rows compared
        # were measured text-only)
        opts = dict(opts, samples=opts["samples"] + opts.get("chat_samples", 0), chat_samples=0)
        spec = E2ESpec.from_dict(dict(opts, data=args.calib))
        train_w, valid_w = calibration_windows(tokenize(tok, load_text(args.calib)), spec)
        train, valid = [(w.tolist(), 0) for w in train_w], [(w.tolist(), 0) for w in valid_w]
        return train, valid, spec.batch, spec.seq_len + 1, {
            "windows": "e2e", "calib": args.calib, "seq_len": spec.seq_len, "seed": spec.seed,
            "train_windows": len(train), "valid_windows": len(valid),
            "train_tokens": len(train) * spec.seq_len, "valid_tokens": len(valid) * spec.seq_len}
    data = _calib(tok, args)
    n = min(steps * 2 + 4, len(data))
    rows = [(data[i].tolist(), 0) for i in range(n)]
    return rows[4:], rows[:4], 2, args.calib_len, {
        "windows": "calib", "calib": args.calib, "seq_len": args.calib_len - 1,
        "train_windows": n - 4, "valid_windows": 4,
        "train_tokens": (n - 4) * (args.calib_len - 1), "valid_tokens": 4 * (args.calib_len - 1)}


def mlxlm_row(kind: list[str], float_dir: Path, out: Path, args) -> dict:
    """Build an mlx-lm quantized model for ``kind`` (see the module docstring) into ``out``."""
    method = kind[0]
    if method == "rtn" or method.startswith("mixed_"):
        from mlx_lm.convert import convert as mlx_convert

        if method == "rtn":
            b, g = int(kind[1]), int(kind[2])
            mlx_convert(str(float_dir), str(out), quantize=True, q_bits=b, q_group_size=g, dtype="float16")
            return {"bits": b, "group_size": g}
        mlx_convert(str(float_dir), str(out), quantize=True, q_group_size=64, dtype="float16",
                    quant_predicate=method)
        return {"predicate": method, "group_size": 64}
    model, tok, config = _mlx_load(float_dir)
    if method != "dwq":
        data = _calib(tok, args, int(kind[5]) if method == "awq" and len(kind) > 5 else None)
    if method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        b, g, fb, fg = (int(x) for x in kind[1:5])
        model, config["quantization"] = gptq_quantize(model, data, b, g, fb, fg)
        info = {"bits": b, "group_size": g, "fallback_bits": fb, "fallback_group_size": fg}
    elif method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        b, g, eb, eg = (int(x) for x in kind[1:5])
        awq_quantize(model, data, AWQ_MODEL_CONFIGS[config["model_type"]], group_size=g, bits=b,
                     embed_group_size=eg, embed_bits=eb)
        config = update_config(model, config)
        info = {"bits": b, "group_size": g, "embed_bits": eb, "embed_group_size": eg, "calib_samples": int(data.shape[0])}
    elif method == "dwq":
        import copy
        import inspect

        import mlx.optimizers as optim
        from mlx_lm.quant.dwq import dwq_quantize
        from mlx_lm.utils import quantize_model

        b, g, steps = int(kind[1]), int(kind[2]), int(kind[3])
        if steps < 1:
            raise SystemExit(f"mlxlm:dwq needs STEPS >= 1 (got {steps})")
        q_model = copy.deepcopy(model)
        _, config = quantize_model(q_model, config, group_size=g, bits=b)
        use_dense_prefill(q_model)  # the tied head (QuantizedEmbedding.as_linear) too; same numbers
        train, valid, batch, max_len, windows = _dwq_windows(tok, args, steps)

        def target_fn(batch, idx, split):
            return model(batch)

        dwq_quantize(q_model, target_fn, optim.Adam(learning_rate=args.dwq_lr, bias_correction=True), train, valid,
                     batch_size=batch, max_seq_length=max_len, seed=0, dtype=mx.float32)
        model = q_model
        info = {"bits": b, "group_size": g, "steps": len(train) // batch, "lr": args.dwq_lr, "batch": batch,
                "temperature": inspect.signature(dwq_quantize).parameters["temperature"].default, **windows}
    else:
        raise SystemExit(f"unknown mlx-lm method {method!r}")
    _mlx_save(out, float_dir, model, tok, config)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--rows", default="reference,dupq:w2,mlxlm:rtn:2:64,mlxlm:gptq:2:64:4:64")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib", default="brown:calib")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--dwq-lr", type=float, default=1e-5)
    ap.add_argument("--dwq-windows", choices=("calib", "e2e"), default="calib",
                    help="mlxlm:dwq rows' data: --calib-samples windows of --calib (calib) or the e2e stage's windows of --calib (e2e)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dupq-w2"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"w2_{args.model}.json"
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    float_dir = work / "float"
    if not (float_dir / "config.json").exists():
        write_hf_dir(open_source(args.model), float_dir, dtype="float32")
    ref_model, _ = load(str(float_dir))
    n_params = sum(v.size for _, v in tree_flatten(ref_model.parameters()))
    del ref_model
    text = load_text(args.data)
    nn.QuantizedLinear.__call__ = DensePrefillQuantizedLinear.__call__  # CPU prefill for mlx-lm's own passes

    result = {"command": "python bench/w2_compare.py " + " ".join(sys.argv[1:]), "model": args.model,
              "data": args.data, "ctx": args.ctx, "windows": args.windows, "calib": args.calib,
              "calib_samples": args.calib_samples, "calib_len": args.calib_len, "n_params": n_params, "rows": []}
    mine: dict[str, dict] = {}

    def save():
        """Merge this run's rows into the file (rows of earlier or concurrent runs with the same
        protocol are kept; each run's command is listed)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        data = dict(result, rows=[], commands=[])
        if out.exists():
            old = json.loads(out.read_text())
            if all(old.get(k) == result[k] for k in ("model", "data", "ctx", "windows", "calib", "calib_samples")):
                data["rows"], data["commands"] = old["rows"], old.get("commands", [old["command"]])
        data["rows"] = [r for r in data["rows"] if r["row"] not in mine] + list(mine.values())
        if result["command"] not in data["commands"]:
            data["commands"].append(result["command"])
        write_result(out, data)

    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        t0 = time.time()
        parts = row.split(":")
        entry: dict = {"row": row}
        if row == "reference":
            path = float_dir
            entry.update(method="reference (dequantized GGUF, fp32)", bits_per_weight=32.0)
        else:
            path = work / row.replace(":", "_")
            if not (path / DONE).exists():
                shutil.rmtree(path, ignore_errors=True)
                if parts[0] == "dupq":
                    rec = load_recipe(parts[1])
                    res = convert(float_dir, path, rec, force=True)
                    entry.update(recipe=rec.name, recipe_dict=rec.to_dict())
                else:
                    entry.update(mlxlm_row(parts[1:], float_dir, path, args))
                # not a result: the build's marker (what the row reads back when the pack is reused)
                (path / DONE).write_text(json.dumps({k: v for k, v in entry.items() if k != "row"}))
            else:
                entry.update(json.loads((path / DONE).read_text()))
            entry["convert_seconds"] = time.time() - t0
            entry["method"] = ("mlx-dupq " if parts[0] == "dupq" else "mlx-lm ") + ":".join(parts[1:])
            entry["bits_per_weight"] = weight_bits(path) / n_params
        entry.update(evaluate(path, text, args.ctx, args.windows))
        entry["machine"] = machine_record()
        mine[row] = entry
        save()
        print(f"{row}: bpw {entry['bits_per_weight']:.3f} ppl {entry['ppl']:.3f}", flush=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
