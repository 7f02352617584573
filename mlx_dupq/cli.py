"""``mlx-dupq`` command line: parse, call one library function, print with rich. No logic here.

This module holds the Typer app, the commands that make a pack or a recipe (``convert``,
``allocate``, ``refine``, ``search-dup``) and :func:`main`; the other commands live by group in
``cli_measure`` (eval, bench, report, inspect), ``cli_use`` (generate, verify, serve, export) and
``cli_catalog`` (models, recipes), and are registered below in the order ``--help`` lists them.
Shared helpers (consoles, progress bars, the lazy :mod:`mlx_dupq.api`) are in ``cli_common``.

Every user error is a :class:`~mlx_dupq.errors.DupqError`: printed as one line, exit code 1; a bad
command-line value (a click usage error or :class:`~mlx_dupq.errors.UsageError`) exits with 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import cli_measure, cli_use
from ._env import reexec_with_fast_blas
from .cli_catalog import models_app, recipes_app
from .cli_common import MODEL_HELP, command_line, err, lib, out, progress_bar, training_bar, write_json
from .errors import DupqError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="2-bit MLX quantization with layer duplication.")
app.add_typer(cli_measure.eval_app, name="eval")
app.add_typer(models_app, name="models")
app.add_typer(recipes_app, name="recipes")


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
    e2e_steps: Optional[int] = typer.Option(None, "--e2e-steps", help="With --bpw: steps of end-to-end "
                                            "distillation (0 skips it) \\[default: the plan's]."),
):
    """Quantize MODEL into a self-describing MLX pack, streaming layer by layer."""
    parse_bits, parse_group_size, run = lib("parse_bits", "parse_group_size", "convert")

    b = parse_bits(bits) if bits is not None else None
    g = parse_group_size(group_size) if group_size is not None else None
    if e2e_steps is not None and (bpw is None or e2e_steps < 0):
        raise UsageError("--e2e-steps needs --bpw and an integer >= 0 (a recipe sets its own [refine.e2e] steps)")
    if bpw is not None:
        plan_auto = lib("plan_auto")
        if recipe is not None or b is not None or g is not None:
            raise UsageError("--bpw chooses the recipe, bits and group size itself; drop --recipe/--bits/--group-size")
        with progress_bar() as cb:
            recipe, choices = plan_auto(model, bpw, e2e_steps=e2e_steps, progress=cb)
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
    allocate_model, write_recipe, parse_candidates = lib("allocate_model", "write_recipe", "parse_candidates")

    cands = parse_candidates(bits)
    with progress_bar() as cb:
        rec, table = allocate_model(model, budget, recipe, data=data, samples=samples, seq_len=seq_len, seed=seed,
                                    bits=cands, measure=measure, embed_min_bits=embed_min_bits, solver=solver,
                                    only=only, progress=cb)
    path = write_recipe(rec, output)
    if table_json is not None:
        write_json(table_json, {"command": command_line(), **table.to_dict()})
    out.print(f"[green]wrote[/green] {path}  {escape(rec.description)}  "
              f"(sensitivity of {len(table.bits)} modules in {table.seconds:.1f}s)")


@app.command()
def refine(
    pack: Path = typer.Argument(..., help="The pack to refine (made by `mlx-dupq convert`)."),
    teacher: str = typer.Option(..., "--teacher", "-t", help="The float model the pack came from. " + MODEL_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Refined pack directory (default: PACK in place)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps \\[default: convert --bpw's, 80]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate \\[default: convert --bpw's, 5e-4 "
                                       "relative to each group's |scale|]."),
    relative: Optional[bool] = typer.Option(None, "--relative/--absolute", help="--lr relative to each group's "
                                            "initial |scale| (a fraction of a quantization step) or in absolute "
                                            "units, as mlx-lm's DWQ \\[default: relative]."),
    lr_per_scale: bool = typer.Option(False, "--lr-per-scale", help="--lr in units of the pack's median |scale| "
                                      "(one step size for every group; implies --absolute)."),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help="Training windows of text \\[default: "
                                          "steps x batch less the chat windows, each seen once]."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per window \\[default: 256]."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Windows per step, split across processes \\[default: 1]."),
    trainable: Optional[str] = typer.Option(None, "--trainable", help="Any of scales,biases,norms,routers (MoE routers) \\[default: scales,biases]."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration text: a :calib set or a file \\[default: mix:calib]."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant, or cosine (--lr decayed to 0 at the "
                                           "last step) \\[default: convert --bpw's]."),
    chat_samples: Optional[int] = typer.Option(None, "--chat-samples", help="Training windows of chat "
                                               "turns beside the text's \\[default: a third of steps x batch]."),
    chat_data: Optional[str] = typer.Option(None, "--chat-data", help="'self' (the teacher's own answers to prompts "
                                            "built from the calibration text, generated once and cached) or a "
                                            ".jsonl file of {\"messages\": [...]} lines \\[default: self]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
):
    """Distill PACK's scales/biases (and norms) against TEACHER's next-token distribution (codes fixed).

    The defaults are the end-to-end stage of `convert --bpw` (the settings measured best, docs/e2e.md)."""
    distill_pack, E2ESpec, e2e_defaults, e2e_windows = lib("distill_pack", "E2ESpec", "E2E_DEFAULTS", "e2e_windows")
    base = dict(e2e_defaults)
    if lr_per_scale:
        relative = False
    spec = E2ESpec.from_dict(base).replace(steps=steps, lr=lr, relative=relative, seq_len=seq_len, batch=batch,
                                           trainable=trainable, data=data, lr_per_scale=lr_per_scale or None,
                                           schedule=schedule, chat_data=chat_data)
    text, chat = e2e_windows(spec.steps, spec.batch, samples, chat_samples)
    spec = spec.replace(samples=text, chat_samples=chat)
    with training_bar() as cb:
        res = distill_pack(pack, teacher, spec, out=output, resume=resume, progress=cb)
    out.print(f"[green]wrote[/green] {res.out}  validation KL {res.valid_kl_before:.4f} -> {res.valid_kl_after:.4f} "
              f"({res.kept} parameters, best step {res.best_step}/{res.steps_run}, lr {res.lr:.3g}, {res.seconds:.0f}s)")


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
    Objective, run, write_dup_recipe = lib("Objective", "search_dup", "write_dup_recipe")

    rec, trials_out = run(model, method, trials, base_bits=base_bits, layer_group=layer_group, last=last,
                          objective=Objective(alpha, beta, gamma, max_bpw), calib_data=data, samples=samples,
                          seq_len=seq_len, seed=seed)
    path = write_dup_recipe(rec, output)
    if json_path is not None:
        write_json(json_path, {"command": command_line(), "trials": trials_out})
    b = trials_out[0]
    out.print(f"[green]wrote[/green] {path}  best: calib PPL {b['ppl']:.3f}, {b['bits_per_weight']:.3f} bpw, "
              f"compute x{b['latency']:.2f} ({len(trials_out)} trials)")


# ------------------------------------------------------------------- the other commands, in order

app.command()(cli_use.generate)
app.command()(cli_measure.bench)
app.command()(cli_measure.report)
app.command()(cli_measure.inspect)
app.command()(cli_use.verify)
app.command()(cli_use.serve)
app.command()(cli_use.export)


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
