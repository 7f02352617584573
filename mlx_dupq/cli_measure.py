"""``mlx-dupq`` commands that measure a model: ``eval ppl|agree|tasks``, ``bench``, ``report``, ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .cli_common import (MODEL_HELP, PEER_TIMEOUT_HELP, PIPELINE_HELP, command_line, err, lib, out, pack_bits,
                         print_ranks, progress_bar, rank_log, write_json)
from .errors import DupqError, UsageError
from .report.terminal import print_rows

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model (perplexity, ...).")


# ---------------------------------------------------------------------------------------- eval


@eval_app.command("ppl")
def eval_ppl(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option("brown:eval", "--data", "-d", help="brown[:calib|:eval], lee[:calib|:eval], code[:calib|:eval], "
                             "mix[:calib|:eval], a text file, or from the hub: wikitext2, c4, ptb (the \\[eval] extra)."),
    ctx: int = typer.Option(2048, "--ctx", min=2, help="Context length of each window."),
    windows: Optional[int] = typer.Option(None, "--windows", "-n", min=1, help="Use only the first N windows."),
    chunk: Optional[int] = typer.Option(None, "--chunk", min=1, help="Prefill step through the KV cache (default: one pass up to 2048, else 1024)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
    pipeline: bool = typer.Option(False, "--pipeline", help=PIPELINE_HELP),
    peer_timeout: float = typer.Option(300.0, "--peer-timeout", help=PEER_TIMEOUT_HELP),
):
    """Perplexity with the standard protocol (joined text, non-overlapping windows); long --ctx runs chunked."""
    load_text, perplexity, load, pipeline_perplexity = lib("load_text", "perplexity", "load", "pipeline_perplexity")

    with progress_bar() as cb:
        if pipeline:
            res = pipeline_perplexity(model, data, ctx=ctx, windows=windows, chunk=chunk, compute_dtype=compute_dtype,
                                      timeout=peer_timeout, progress=lambda d, t: cb("windows", d, t), log=rank_log)
            if res is None:  # not rank 0
                return
        else:
            m, tok = load(model, compute_dtype=compute_dtype)
            res = perplexity(m, tok, load_text(data), ctx=ctx, windows=windows, chunk=chunk,
                             progress=lambda d, t: cb("windows", d, t))
    res = {"model": model, "data": data, "bits_per_weight": pack_bits(model), **res, "command": command_line()}
    out.print(f"PPL {res['ppl']:.4f}  ({data}, ctx {res['ctx']}, {res['windows']} windows, {res['tokens']} tokens, "
              f"peak {res['peak_memory_bytes'] / 2**20:.0f} MiB)")
    print_ranks(res)
    if json_out:
        write_json(json_out, res)


@eval_app.command("agree")
def eval_agree(
    reference: str = typer.Argument(..., help="The reference (full-precision) model. " + MODEL_HELP),
    model: str = typer.Argument(..., help="The model compared with it (e.g. its 2-bit pack)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file, one per line (default: 8 built-in prompts)."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-m", min=1, help="Greedy tokens per prompt."),
    data: str = typer.Option("brown:eval", "--data", "-d", help="Held-out text for next-token agreement and KL (a set or a file; '' skips it)."),
    ctx: int = typer.Option(256, "--ctx", min=2, help="Context length of each text window."),
    windows: int = typer.Option(4, "--windows", "-n", min=1, help="Text windows scored."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
):
    """Agreement of MODEL with REFERENCE: greedy generations (divergence, BLEU-4, ROUGE-L), top-1 and KL."""
    DEFAULT_PROMPTS, agree_models, read_prompts = lib("DEFAULT_PROMPTS", "agree_models", "read_prompts")

    ps = read_prompts(prompts) if prompts else list(DEFAULT_PROMPTS)
    with progress_bar() as cb:
        res = agree_models(reference, model, ps, max_tokens=max_tokens, data=data or None, ctx=ctx, windows=windows,
                           compute_dtype=compute_dtype, progress=cb)
    res = {**res, "bits_per_weight": pack_bits(model), "command": command_line()}
    out.print(
        f"{res['prompts']} prompts x {res['max_tokens']} tokens: identical {res['identical_share']:.3f}, "
        f"first divergence {res['first_divergence']:.1f}, BLEU-4 {res['bleu4']:.3f}, ROUGE-L {res['rouge_l']:.3f}"
    )
    if res["top1_agreement"] is not None:
        out.print(f"next token ({escape(data)}, {res['positions']} positions): top-1 agreement "
                  f"{res['top1_agreement']:.4f}, KL(ref||model) {res['kl']:.5f} nats")
    if json_out:
        write_json(json_out, res)


@eval_app.command("tasks")
def eval_tasks(
    model: str = typer.Argument(..., help=MODEL_HELP),
    tasks: str = typer.Option("cloze,mc", "--tasks", "-t",
                              help="cloze (last word), mc (next sentence of 4) from held-out text; mmlu, mmlu_<subject>, "
                                   "hellaswag, arc_challenge through lm-eval."),
    n: int = typer.Option(200, "--n", min=1, help="Items per built-in task (cloze, mc)."),
    seed: int = typer.Option(0, "--seed"),
    data: str = typer.Option("brown:eval", "--data", "-d", help="Document set of cloze/mc: brown:eval or lee:eval (never calibration text)."),
    num_fewshot: int = typer.Option(0, "--num-fewshot", min=0, help="Few-shot examples for the lm-eval tasks."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N items of each lm-eval (sub)task."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local MMLU/HellaSwag/ARC files (hub formats) instead of the hub; "
                                            "layout in mlx_dupq/eval/lmeval.py."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
):
    """Accuracy on tasks built from held-out real text (cloze, mc) and on lm-eval's MMLU, HellaSwag, ARC-Challenge."""
    eval_data, run_harness, split_tasks, run_tasks, load = lib("eval_data", "run_harness", "split_tasks", "run_tasks",
                                                                "load")

    names, harness = split_tasks(tasks)
    if names and not data.strip().lower().endswith(":eval"):
        raise UsageError(f"--data {data} is not a held-out set; use brown:eval or lee:eval (disjoint from calibration)")
    docs = eval_data.documents(data) if names else None
    m, tok = load(model, compute_dtype=compute_dtype)
    res: dict = {"seconds": 0.0}
    if names:
        with progress_bar() as cb:
            res = run_tasks(m, tok, docs, names, n=n, seed=seed, progress=cb)
    if harness:
        h = run_harness(m, tok, harness, num_fewshot=num_fewshot, limit=limit, data_dir=data_dir, seed=seed)
        res = {**res, **h, "seconds": res["seconds"] + h["seconds"]}
    res = {"model": model, "bits_per_weight": pack_bits(model), "data": data, "n": n, "seed": seed, "num_fewshot": num_fewshot, "limit": limit, **res,
           "command": command_line()}
    rows = [[t, str(res[t]["n"]), *(f"{res[t][k]:.4f}" if k in res[t] else "-" for k in ("acc", "acc_norm", "target_nll"))]
            for t in names + harness]
    print_rows(out, f"mlx-dupq eval tasks ({data}, seed {seed}, {num_fewshot}-shot lm-eval)",
               ["task", "items", "acc", "acc_norm", "target NLL"], rows)
    if json_out:
        write_json(json_out, res)


# --------------------------------------------------------------------------------------- bench


def bench(
    model: str = typer.Argument(..., help=MODEL_HELP),
    tokens_per_sec: bool = typer.Option(True, "--tokens-per-sec/--no-tokens-per-sec", help="Measure prompt and generation speed."),
    against: Optional[List[str]] = typer.Option(None, "--against", help="Another model measured in the same run (repeatable)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1),
    gen_tokens: int = typer.Option(64, "--gen-tokens", min=2),
    repeats: int = typer.Option(1, "--repeats", min=1),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
    dup_base: Optional[str] = typer.Option(None, "--dup-base", help="The non-duplicated pack (one of the measured "
                                           "models) to report duplication overhead against."),
    pipeline: bool = typer.Option(False, "--pipeline", help=PIPELINE_HELP),
    peer_timeout: float = typer.Option(300.0, "--peer-timeout", help=PEER_TIMEOUT_HELP),
):
    """Speed, memory, size and bits per weight, side by side with --against."""
    bench_models, decode_comparison, pipeline_bench = lib("bench_models", "decode_comparison", "pipeline_bench")

    if pipeline:
        if against or dup_base:
            raise DupqError("--pipeline measures one pack; leave out --against and --dup-base")
        res = pipeline_bench(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                             compute_dtype=compute_dtype, timeout=peer_timeout, log=rank_log)
        if res is None:  # not rank 0
            return
        out.print(f"{res['ranks']} ranks: prompt {res['prompt_tps']:.1f} tok/s, generation "
                  f"{res['generation_tps']:.2f} tok/s, TTFT {res['ttft_s']:.3f} s")
        print_ranks(res)
        if json_out:
            write_json(json_out, {"command": command_line(), "results": [res]})
        return
    names = [model] + list(against or [])
    if dup_base is not None and dup_base not in names:
        raise UsageError(f"--dup-base {dup_base} is not one of the measured models; pass it as MODEL or --against too")
    results = bench_models(names, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                           speed=tokens_per_sec, compute_dtype=compute_dtype)
    cols = [("model", "model", "{}"), ("bits/weight", "bits_per_weight", "{:.3f}"), ("size MiB", "size_mib", "{:.1f}"),
            ("prompt tok/s", "prompt_tps", "{:.1f}"), ("gen tok/s", "generation_tps", "{:.2f}"),
            ("TTFT s", "ttft_s", "{:.3f}"), ("peak MiB", "peak_memory_mib", "{:.0f}")]
    print_rows(out, "mlx-dupq bench", [c[0] for c in cols],
               [[(fmt.format(r[k]) if r.get(k) is not None else "-") for _, k, fmt in cols] for r in results])
    comparison = decode_comparison(results, dup_base) if tokens_per_sec else {}
    for name, ratio in comparison.get("decode_ratio", {}).items():
        cpu = comparison.get("decode_ratio_cpu_time", {}).get(name)
        out.print(f"decode {escape(model)} / {escape(name)}: {ratio:.2f}x wall clock"
                  + ("" if cpu is None else f", {cpu:.2f}x CPU time"))
    for d in comparison.get("duplication", []):
        out.print(f"duplication {escape(d['model'])}: +{100 * d['dup_flop_share']:.1f}% linear FLOPs, "
                  f"+{100 * d['decode_overhead']:.1f}% time per token vs {escape(d['base'])}")
    if json_out:
        write_json(json_out, {"command": command_line(), "results": results, **comparison})


# -------------------------------------------------------------------------------------- report


def report(
    results: List[Path] = typer.Argument(..., help="Result JSON files (e.g. bench/results/*.json)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for REPORT.md and the PNG plots."),
):
    """Turn result files into a markdown report with tables and plots (PPL and accuracy vs bits, per layer)."""
    write_report = lib("write_report")

    res = write_report(results, out_dir)
    out.print(f"[green]wrote[/green] {res['report']} and {len(res['plots'])} plots")
    for src in res["unknown"]:
        err.print(f"[yellow]not understood[/yellow] {escape(src)} (listed in the report)")


# ------------------------------------------------------------------------------------- inspect


def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
):
    """Per-layer weight statistics, and for a pack its per-layer choices and all-in bits per weight."""
    inspect_model = lib("inspect_model")

    report = inspect_model(model)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if report.get("pack"):
        p = report["pack"]
        out.print(f"[bold]pack[/bold] {escape(model)}: {report['bits_per_weight']:.3f} bits/weight all-in, "
                  f"{p['n_params'] / 1e6:.1f}M params, recipe {escape(repr(p['recipe']['name']))}", soft_wrap=True)
    rows = [[r["name"], "x".join(map(str, r["shape"])), r.get("quant", "float"), f"{r['mean']:.2e}", f"{r['std']:.2e}",
             f"{r['kurtosis']:.2f}", f"{100 * r['outlier_share']:.3f}", f"{r['absmax']:.3g}"] for r in report["tensors"]]
    print_rows(out, "weights", ["tensor", "shape", "quant", "mean", "std", "kurtosis", "outliers %", "absmax"], rows,
               left=("quant",))
