"""What each shipped recipe measured: ``mlx-dupq recipes list``.

The numbers come from the result files in ``bench/results/`` (rows with a ``recipe`` field, written
by ``bench/recipe_ladder.py`` and ``bench/w2_compare.py``). ``python bench/render_tables.py`` copies
them into the package as ``mlx_dupq/recipes/measured.json`` (an installed wheel has no
``bench/``); ``tests/test_recipes_list.py`` checks that file against the results.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RECIPES_DIR, list_recipes, load_recipe

MEASURED = RECIPES_DIR / "measured.json"
KINDS = ("product", "studies", "generated")
REFERENCE_BPW = 16.0


def _protocol(d: dict, row: dict) -> tuple:
    return (d.get("model"), row.get("data", d.get("data")), row.get("ctx", d.get("ctx")),
            row.get("windows", d.get("windows")))


def _is_reference(row: dict) -> bool:
    label = str(row.get("recipe") or row.get("row") or row.get("method") or "")
    return label.startswith("reference") or row.get("bits_per_weight", 0) >= REFERENCE_BPW or row.get("bits") == 32


def measured_index(results_dir: str | Path) -> dict[str, list[dict]]:
    """``{recipe: [one entry per model]}`` from every result file with recipe rows.

    An entry: model, bits_per_weight, ppl, reference_ppl (same model, text, ctx and windows, from
    any file; None if never measured), data, ctx, windows, tokens, file, command. Of several
    measurements of one recipe on one model the one on the most tokens wins (then the later file).
    """
    files = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(d, dict) and isinstance(d.get("rows"), list) and d.get("model"):
            files.append((p, d))
    refs = {}
    for p, d in files:
        for row in d["rows"]:
            if isinstance(row, dict) and "ppl" in row and _is_reference(row):
                refs.setdefault(_protocol(d, row), row["ppl"])
    out: dict[str, dict[str, dict]] = {}
    for p, d in files:
        for row in d["rows"]:
            name = row.get("recipe") if isinstance(row, dict) else None
            if not name or "ppl" not in row or _is_reference(row) or "bits_per_weight" not in row:
                continue
            name = Path(str(name)).stem if str(name).endswith(".toml") else str(name)
            model, data, ctx, windows = _protocol(d, row)
            entry = {"model": model, "bits_per_weight": row["bits_per_weight"], "ppl": row["ppl"],
                     "reference_ppl": refs.get((model, data, ctx, windows)), "data": data, "ctx": ctx,
                     "windows": windows, "tokens": row.get("tokens"), "file": p.name,
                     "command": _command_of(d, name)}
            old = out.setdefault(name, {}).get(model)
            if old is None or (entry["tokens"] or 0) >= (old["tokens"] or 0):
                out[name][model] = entry
    return {k: [v[m] for m in sorted(v)] for k, v in sorted(out.items())}


def _command_of(d: dict, name: str) -> str:
    """The command that wrote recipe ``name``'s row (files merged from several runs list them all)."""
    cmds = d.get("commands") or [d.get("command", "")]
    return next((c for c in cmds if f":{name}" in c or f"{name}.toml" in c or f" {name}" in c
                 or f",{name}" in c), cmds[-1])


def read_measured() -> dict[str, list[dict]]:
    try:
        return json.loads(MEASURED.read_text())
    except (OSError, ValueError):
        return {}


def catalog(kinds: tuple[str, ...] = ("product",)) -> list[dict]:
    """The shipped recipes of ``kinds``: name, kind, description, measured entries (see above)."""
    measured = read_measured()
    rows = []
    for kind in kinds:
        for name in list_recipes(kind):
            rec = load_recipe(name)
            rows.append({"name": name, "kind": kind, "description": rec.description,
                         "measured": measured.get(name, [])})
    return rows


def describe(entry: dict) -> str:
    """One line: ``smollm2-135m: 5.345 bpw, PPL 36.23 = 1.24x float (brown:eval, 4088 tok)``."""
    ratio = f" = {entry['ppl'] / entry['reference_ppl']:.2f}x float" if entry.get("reference_ppl") else ""
    tokens = f", {entry['tokens']} tok" if entry.get("tokens") else ""
    return f"{entry['model']}: {entry['bits_per_weight']:.3f} bpw, PPL {entry['ppl']:.2f}{ratio} ({entry['data']}{tokens})"
