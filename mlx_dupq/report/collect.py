"""Read result JSON files of every kind the project writes and sort their numbers into records.

Recognised shapes (the file's keys decide, not its name):

- ``rows`` with ``ppl`` and ``bits_per_weight`` (``bench/rtn_table.py``, ``bench/recipe_ladder.py``):
  one perplexity point per row; a row whose label starts with ``reference`` (or with 16+ bits per
  weight) is the full-precision reference.
- ``ppl`` and ``ctx`` at the top (``mlx-dupq eval ppl --json``): one point; without
  ``bits_per_weight`` (not a pack) it is a reference.
- ``results`` rows with ``generation_tps`` (``mlx-dupq bench --json``): speed rows.
- ``identical_share`` (``mlx-dupq eval agree --json``): an agreement row.
- task entries ``{name: {"acc": ...}}`` (``mlx-dupq eval tasks --json``): one accuracy point per task.
- ``kind`` ``eval_longctx`` / ``eval_memory`` (``bench/long_context.py``, ``bench/memory_study.py``).
- ``rows`` of other dicts (e.g. ``bench/stream_memory.py``): kept as a plain table.
- a dict of named entries with ``ppl`` and ``bpw`` / ``bits_per_weight`` (``bench/moe_study.py``'s
  ``packs``, as a dict or a list of entries with a ``name``): one perplexity point each.
- any top-level list of dicts with an integer ``layer`` field: per-layer scores.

Anything else is listed as unknown with the reason; it never stops the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REFERENCE_BPW = 16.0  # at or above: a full-precision reference, drawn as a line


@dataclass
class Results:
    ppl: list[dict] = field(default_factory=list)  # model, label, bpw, ppl, data, ctx, reference, source
    acc: list[dict] = field(default_factory=list)  # model, label, bpw, task, acc, acc_norm, n, source
    agree: list[dict] = field(default_factory=list)
    speed: list[dict] = field(default_factory=list)
    longctx: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    layers: list[tuple[str, list[dict]]] = field(default_factory=list)  # (source, rows with "layer")
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)  # (source, plain rows)
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (source, why)


def _name(model) -> str:
    return Path(str(model)).name or str(model)


def _is_ref(label: str, bpw) -> bool:
    return label.lower().startswith("reference") or bpw is None or bpw >= REFERENCE_BPW


def _row_label(r: dict) -> str:
    if "label" in r:
        return str(r["label"])
    if "recipe" in r:
        return Path(str(r["recipe"])).stem if str(r["recipe"]).endswith(".toml") else str(r["recipe"])
    if "method" in r:
        if str(r["method"]).lower().startswith("reference"):
            return str(r["method"])
        g = r.get("group_size")
        return f"{r['method']} {r.get('bits')}b" + (f" g{g}" if g is not None else "")
    return str(r.get("name", r.get("model", "?")))


def _series(r: dict) -> str:
    """The family a perplexity point belongs to (one colour in the plots)."""
    if "method" in r:
        return str(r["method"])
    if "table" in r:
        return str(r["table"])
    return "recipes" if "recipe" in r else "models"


def _layer_lists(d: dict) -> list[list[dict]]:
    return [v for v in d.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
            and all(isinstance(x.get("layer"), int) for x in v)]


def _named_points(d: dict) -> list[tuple[str, dict]]:
    """``{"packs": {name: {"ppl", "bpw"|"bits_per_weight", ...}}}`` or ``{"packs": [{"name", "ppl", "bpw"}]}``
    entries, as (name, entry)."""
    def point(x) -> bool:
        return isinstance(x, dict) and "ppl" in x and ("bpw" in x or "bits_per_weight" in x)

    out = []
    for v in d.values():
        if isinstance(v, dict) and v and all(point(x) for x in v.values()):
            out += list(v.items())
        elif isinstance(v, list) and v and all(point(x) and "name" in x for x in v):
            out += [(str(x["name"]), x) for x in v]
    return out


def add_file(res: Results, path: str | Path) -> None:
    """Read one result file into ``res`` (an unreadable or unknown file lands in ``res.unknown``)."""
    src = str(path)
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        res.unknown.append((src, f"not readable JSON ({type(e).__name__})"))
        return
    if not isinstance(d, dict):
        res.unknown.append((src, f"top level is a {type(d).__name__}, not an object"))
        return
    found = False
    for rows in _layer_lists(d):
        res.layers.append((src, rows))
        found = True
    kind = d.get("kind")
    rows = d.get("rows")
    if kind == "eval_longctx":
        res.longctx += [{"model": d.get("model"), "data": d.get("data"), **r, "source": src} for r in d.get("runs", [])]
    elif kind == "eval_memory":
        res.memory.append({**d, "source": src})
    elif isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        if all("ppl" in r and "bits_per_weight" in r for r in rows):
            for r in rows:
                label, bpw = _row_label(r), r.get("bits_per_weight")
                res.ppl.append({"model": d.get("model", "?"), "label": label, "series": _series(r), "bpw": bpw,
                                "ppl": r["ppl"], "data": r.get("data", d.get("data")), "ctx": r.get("ctx", d.get("ctx")),
                                "reference": _is_ref(label, bpw), "source": src})
        else:
            res.tables.append((src, rows))
    elif isinstance(d.get("results"), list) and all(isinstance(r, dict) and "generation_tps" in r for r in d["results"]):
        res.speed += [{**r, "source": src} for r in d["results"]]
    elif "identical_share" in d:
        res.agree.append({**d, "source": src})
    elif "ppl" in d and "ctx" in d:
        bpw = d.get("bits_per_weight")
        res.ppl.append({"model": d.get("base_model") or _name(d.get("model", "?")), "label": _name(d.get("model", "?")),
                        "series": "models", "bpw": bpw, "ppl": d["ppl"], "data": d.get("data"), "ctx": d["ctx"],
                        "reference": _is_ref(_name(d.get("model", "?")), bpw), "source": src})
    elif any(isinstance(v, dict) and "acc" in v for v in d.values()):
        bpw = d.get("bits_per_weight")
        for task, v in d.items():
            if isinstance(v, dict) and "acc" in v:
                res.acc.append({"model": _name(d.get("model", "?")), "bpw": bpw, "task": task, "acc": v["acc"],
                                "acc_norm": v.get("acc_norm"), "n": v.get("n"), "num_fewshot": v.get("num_fewshot"),
                                "reference": bpw is None or bpw >= REFERENCE_BPW, "source": src})
    elif _named_points(d):
        meta = d.get("meta", {}) if isinstance(d.get("meta"), dict) else {}
        for name, v in _named_points(d):
            bpw = v.get("bits_per_weight", v.get("bpw"))
            res.ppl.append({"model": meta.get("model", d.get("model", "?")), "label": name, "series": "packs", "bpw": bpw,
                            "ppl": v["ppl"], "data": meta.get("eval", d.get("data")), "ctx": meta.get("ctx", d.get("ctx")),
                            "reference": _is_ref(name, bpw), "source": src})
    elif not found:
        keys = ", ".join(sorted(d)[:8])
        res.unknown.append((src, f"no known result fields (keys: {keys})"))


def collect(paths) -> Results:
    """All ``paths`` read into one :class:`Results` (in the given order)."""
    res = Results()
    for p in paths:
        add_file(res, p)
    return res
