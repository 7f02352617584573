"""Render bench/results/*.json into the docs (every number in README.md and docs/results.md comes from here).

    python bench/render_tables.py            # docs/results.md's tables, README.md's summary table + plot,
                                             # and mlx_dupq/recipes/measured.json (`mlx-dupq recipes list`)
    python bench/render_tables.py --check    # exit 1 if any of them is out of date (tests run this)

The README's one table compares, per model, the float reference with the best mlx-lm and the best
mlx-dupq result in two bit-width classes; its sources are SUMMARY_FILES (add a result file there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

from mlx_dupq.report.recipes import MEASURED, measured_index  # noqa: E402

# The README table's sources: result files measured with one protocol (brown:eval, ctx 512). One line per file.
SUMMARY_FILES = [
    "rtn_*.json",       # python bench/rtn_table.py: mlx-dupq vs mlx-lm round-to-nearest, same run
    "w2_*.json",        # python bench/w2_compare.py: <= 2.5 bpw, mlx-dupq recipes vs mlx-lm's quantizers
    "ladder_*.json",    # python bench/recipe_ladder.py: mlx-dupq recipes
    "learned_*.json",   # python bench/learned.py: convert --bpw (+ the e2e stage); rows with eval["brown:eval"]
]
SUMMARY_PROTOCOL = ("brown:eval", 512)
# memory budgets of the README table: the best point at or under each (all-in bits per weight)
SUMMARY_BUDGETS = [2.6, 3.2, 4.6]
SUMMARY_PLOT = "summary_ppl_vs_bpw.png"


def rtn_table(path: Path) -> str:
    r = json.loads(path.read_text())
    ref = next(x for x in r["rows"] if x["bits"] == 32)
    lines = [
        f"**{r['model']}** — `{r['command']}`  ",
        f"{r['data']}, ctx {r['ctx']}, {ref['windows']} windows ({ref['tokens']} predicted tokens); "
        f"reference PPL {ref['ppl']:.3f}",
        "",
        "| bits | group | mlx-dupq bpw | mlx-dupq PPL | mlx-lm bpw | mlx-lm PPL |",
        "|---|---|---|---|---|---|",
    ]
    rows = [x for x in r["rows"] if x["bits"] != 32]
    keys = sorted({(x["bits"], x["group_size"]) for x in rows}, key=lambda k: (-k[0], k[1]))
    for b, g in keys:
        ours = next((x for x in rows if x["method"].startswith("mlx-dupq") and (x["bits"], x["group_size"]) == (b, g)), None)
        theirs = next((x for x in rows if x["method"].startswith("mlx-lm") and (x["bits"], x["group_size"]) == (b, g)), None)

        def cell(x):
            return ("-", "-") if x is None else (f"{x['bits_per_weight']:.3f}", f"{x['ppl']:.3f}")

        lines.append(f"| {b} | {g} | {' | '.join(cell(ours))} | {' | '.join(cell(theirs))} |")
    return "\n".join(lines)


def ladder_table(path: Path) -> str:
    r = json.loads(path.read_text())
    lines = [f"**{r['model']}** — `{r['command']}`  ", f"{r['data']}, ctx {r['ctx']}, {r['windows']} windows", "",
             "| recipe | all-in bpw | PPL | convert s |", "|---|---|---|---|"]
    for x in r["rows"]:
        conv = f"{x['convert_seconds']:.0f}" if "convert_seconds" in x else "-"
        lines.append(f"| {x['recipe']} | {x['bits_per_weight']:.3f} | {x['ppl']:.3f} | {conv} |")
    return "\n".join(lines)


def w2_table(path: Path) -> str:
    r = json.loads(path.read_text())
    ref = next((x for x in r["rows"] if x["row"] == "reference"), None)
    head = f"reference PPL {ref['ppl']:.3f}" if ref else "no reference row"
    cmds = "; ".join(f"`{c}`" for c in r.get("commands", [r["command"]]))
    lines = [f"**{r['model']}** — {cmds}  ",
             f"{r['data']}, ctx {r['ctx']}, {r['windows']} windows; calibration {r['calib_samples']} x "
             f"{r['calib_len']} tokens of {r['calib']}; {head}", "",
             "| method | all-in bpw | PPL | x reference |", "|---|---|---|---|"]
    for x in sorted((x for x in r["rows"] if x["row"] != "reference"), key=lambda x: x["bits_per_weight"]):
        rel = f"{x['ppl'] / ref['ppl']:.2f}" if ref else "-"
        lines.append(f"| {x['method']} | {x['bits_per_weight']:.3f} | {x['ppl']:.2f} | {rel} |")
    return "\n".join(lines)


def w2_plot(path: Path) -> Path:
    """PPL vs all-in bpw for one model: the w2 comparison plus the same model's RTN table and recipe
    ladders measured with the same protocol (data, ctx, windows); -> bench/results/w2_<model>.png."""
    import matplotlib  # deferred: optional extra (mlx-dupq[plots])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: optional extra

    r = json.loads(path.read_text())
    proto = (r["data"], r["ctx"], r["windows"])
    series: dict[str, list[tuple[float, float, str]]] = {}
    ref = None
    for x in r["rows"]:
        if x["row"] == "reference":
            ref = x["ppl"]
            continue
        kind = "mlx-dupq" if x["row"].startswith("dupq:") else "mlx-lm"
        series.setdefault(f"{kind} (this comparison)", []).append(
            (x["bits_per_weight"], x["ppl"], x["row"].split(":", 1)[1]))
    for other in sorted(RESULTS.glob(f"*_{r['model']}*.json")):
        o = json.loads(other.read_text())
        if other == path or (o.get("data"), o.get("ctx"), o.get("windows")) != proto or "rows" not in o:
            continue
        for x in o["rows"]:
            if x.get("bits_per_weight", 32) >= 16 or "ppl" not in x:
                continue
            if other.name.startswith("rtn_"):
                name = f"{x['method']} (RTN table)"
                label = f"{x['bits']}b g{x['group_size']}"
            elif other.name.startswith("ladder_"):
                name, label = "mlx-dupq recipes (ladder)", str(x["recipe"])
            else:
                continue
            series.setdefault(name, []).append((x["bits_per_weight"], x["ppl"], label))
    fig, ax = plt.subplots(figsize=(10, 6))
    for name, pts in series.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name, s=30)
        for bx, py, label in pts:
            ax.annotate(label, (bx, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=1, label=f"float reference {ref:.1f}")
        ax.axhline(1.3 * ref, color="g", ls=":", lw=1, label="1.3x reference (issue 4 target)")
    ax.axvline(2.5, color="r", ls=":", lw=1, label="2.5 bpw")
    ax.set_yscale("log")
    ax.set_xlabel("all-in bits per weight")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{r['model']}: PPL vs all-in bpw ({r['data']}, ctx {r['ctx']}, {r['windows']} windows)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def bench_table(path: Path) -> str:
    r = json.loads(path.read_text())
    lines = [f"`{r['command']}`", "",
             "| model | all-in bpw | size MiB | prompt tok/s | generation tok/s | TTFT s | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for x in r["results"]:
        bpw = "-" if x.get("bits_per_weight") is None else f"{x['bits_per_weight']:.3f}"
        lines.append(f"| {x['model']} | {bpw} | {x['size_mib']:.1f} | {x['prompt_tps']:.1f} | "
                     f"{x['generation_tps']:.2f} | {x['ttft_s']:.3f} | {x['peak_memory_mib']:.0f} |")
    return "\n".join(lines)


def stream_table(path: Path) -> str:
    r = json.loads(path.read_text())
    lines = [f"`{r['command']}` — {r['target']}: **{'passed' if r['passed'] else 'FAILED'}** "
             f"(growth {100 * r['peak_growth']:.1f} %)", "",
             "| decoder layers | source GiB (bf16) | peak RSS MiB | one layer, GiB bf16 | seconds | all-in bpw |",
             "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['layers']} | {x['source_gib']:.2f} | {x['peak_rss_mib']:.0f} | {x['layer_gib_bf16']:.2f} | "
                     f"{x['seconds']:.0f} | {x['bits_per_weight']:.3f} |")
    return "\n".join(lines)


def summary_points() -> tuple[dict, list[dict]]:
    """Every PPL point of SUMMARY_FILES under SUMMARY_PROTOCOL -> ({model: reference}, points).

    A point: model, family ("mlx-dupq" | "mlx-lm"), label, bpw, ppl, tokens, file, command."""
    refs, points, seen = {}, [], set()
    for pattern in SUMMARY_FILES:
        for path in sorted(RESULTS.glob(pattern)):
            if path in seen:
                continue
            seen.add(path)
            r = json.loads(path.read_text())
            if not isinstance(r, dict) or "rows" not in r or r.get("ctx") != SUMMARY_PROTOCOL[1]:
                continue
            texts = str(r.get("data", "")).split(",")
            multi = len(texts) > 1  # bench/learned.py: several texts per row, each under eval[name]
            if SUMMARY_PROTOCOL[0] not in texts:
                continue
            cmds = r.get("commands", [r.get("command", "")])
            for x in r["rows"]:
                if multi:
                    ev = (x.get("eval") or {}).get(SUMMARY_PROTOCOL[0])
                    if not ev or "bits_per_weight" not in x:
                        continue
                    if x["row"].startswith("mlxlm:"):  # mlx-lm's own rows ("mlx-lm dwq:2:64:80") stay mlx-lm's
                        x = {**x, "ppl": ev["ppl"], "tokens": ev.get("tokens")}
                    else:
                        row = x["row"].replace("refine:auto:", "--bpw ", 1).replace("auto:", "--bpw ", 1)
                        label = row + (" + e2e" if x["row"].startswith("refine:") else "")
                        x = {**x, "ppl": ev["ppl"], "tokens": ev.get("tokens"), "row": "dupq:" + x["row"],
                             "method": "mlx-dupq " + label}
                if "ppl" not in x:
                    continue
                label = str(x.get("row") or x.get("recipe") or x.get("method"))
                if label.startswith("reference") or x.get("bits_per_weight", 32) >= 16:
                    refs.setdefault(r["model"], (x["ppl"], path.name))
                    continue
                if "method" in x and "row" not in x:  # the RTN table: "mlx-dupq rtn ..." / "mlx-lm ..."
                    family, label = x["method"].split(" ", 1)[0], f"RTN {x['bits']}-bit g{x['group_size']}"
                elif "row" in x:
                    family = "mlx-dupq" if x["row"].startswith("dupq:") else "mlx-lm"
                    label = x["method"].split(" ", 1)[1]
                else:
                    family, label = "mlx-dupq", Path(str(x["recipe"])).stem
                points.append({"model": r["model"], "family": family, "label": label, "bpw": x["bits_per_weight"],
                               "ppl": x["ppl"], "tokens": x.get("tokens"), "file": path.name,
                               "command": x.get("command") or next((c for c in cmds if label in c), cmds[-1])})
    return refs, points


def summary_table() -> str:
    """The README's table: per model and memory budget, the reference and each tool's best point."""
    refs, points = summary_points()
    lines = ["| model | budget | float | mlx-lm | mlx-dupq |", "|---|---|---|---|---|"]
    used = set()
    for m in sorted({p["model"] for p in points}):
        last = None
        for budget in SUMMARY_BUDGETS:
            cells = []
            for fam in ("mlx-lm", "mlx-dupq"):
                best = min((p for p in points if p["model"] == m and p["family"] == fam and p["bpw"] <= budget),
                           key=lambda p: p["ppl"], default=None)
                if best is not None:
                    used.add((best["file"], best["command"]))
                    ppl = f"{best['ppl']:.0f}" if best["ppl"] >= 1000 else f"{best['ppl']:.1f}"
                    cells.append(f"{ppl} @ {best['bpw']:.2f} {best['label']}")
                else:
                    cells.append("-")
            if cells != ["-", "-"] and cells != last:  # (a larger budget that buys nothing better: no row)
                last = cells
                ref = f"{refs[m][0]:.1f}" if m in refs else "-"
                lines.append(f"| {m} | <= {budget} | {ref} | {cells[0]} | {cells[1]} |")
    notes = [
        "",
        f"PPL on held-out Brown text (`{SUMMARY_PROTOCOL[0]}`, windows of {SUMMARY_PROTOCOL[1]} tokens: 2044 "
        "tokens for the Qwen models, 4088 for SmolLM2) @ all-in bits per weight, then the method: the best "
        "each tool measured within the budget; float = the dequantized GGUF in float32. Rendered by "
        "`python bench/render_tables.py` from:",
    ]
    notes += [f"- `{f}`: `{c}`" for f, c in sorted(used)]
    return "\n".join(lines + notes)


def summary_plot() -> Path:
    """PPL / float reference vs all-in bpw of every summary point (log scale) -> bench/results/SUMMARY_PLOT."""
    import matplotlib  # deferred: optional extra (mlx-dupq[plots])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: optional extra

    refs, points = summary_points()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    markers = {"mlx-dupq": "o", "mlx-lm": "x"}
    for ci, m in enumerate(sorted({p["model"] for p in points if p["model"] in refs})):
        for fam, mk in markers.items():
            pts = [p for p in points if p["model"] == m and p["family"] == fam and p["bpw"] <= 6]
            ax.scatter([p["bpw"] for p in pts], [p["ppl"] / refs[m][0] for p in pts], marker=mk, color=f"C{ci}",
                       s=24, alpha=0.35)
            front, best = [], float("inf")  # the best PPL within each budget: what the README table reads
            for p in sorted(pts, key=lambda p: p["bpw"]):
                if p["ppl"] < best:
                    best = p["ppl"]
                    front.append((p["bpw"], best / refs[m][0]))
            if front:
                ax.step(*zip(*front), where="post", color=f"C{ci}", ls="-" if fam == "mlx-dupq" else ":",
                        marker=mk, label=f"{m}, {fam} (best within budget)")
    ax.axhline(1.0, color="k", lw=1, ls="--", label="float reference")
    ax.set_yscale("log")
    ax.set_xlabel("all-in bits per weight")
    ax.set_ylabel("perplexity / float reference (log)")
    ax.set_ylim(0.8, 1e4)
    ax.set_title(f"PPL vs size ({SUMMARY_PROTOCOL[0]}, ctx {SUMMARY_PROTOCOL[1]}); bench/render_tables.py")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out = RESULTS / SUMMARY_PLOT
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def full_tables(plots: bool = True) -> list[str]:
    """docs/results.md's generated part: every table, grouped by benchmark."""
    parts = ["## Round-to-nearest: mlx-dupq vs mlx-lm's `convert -q`, same run", ""]
    for p in sorted(RESULTS.glob("rtn_*.json")):
        parts += [rtn_table(p), ""]
    ladders = sorted(RESULTS.glob("ladder_*.json"))
    if ladders:
        parts += ["## Recipes (rotation, GPTQ, ...) at low bits", ""]
        for p in ladders:
            parts += [ladder_table(p), ""]
    w2 = sorted(RESULTS.glob("w2_*.json"))
    if w2:
        parts += ["## At most 2.5 bits per weight: mlx-dupq `w2` vs mlx-lm's quantizers, same protocol", ""]
        for p in w2:
            png = w2_plot(p) if plots else p.with_suffix(".png")
            parts += [w2_table(p), "", f"![PPL vs bpw](../bench/results/{png.name})", ""]
    if (RESULTS / "stream_memory.json").exists():
        parts += ["## Streaming conversion memory (Qwen2-32B layer shapes)", "", stream_table(RESULTS / "stream_memory.json"), ""]
    benches = sorted(RESULTS.glob("bench_*.json"))
    if benches:
        parts += ["## Speed and memory (CPU, 2 cores, float32 compute)", ""]
        for p in benches:
            parts += [bench_table(p), ""]
    return parts


def splice(path: Path, tag: str, body: str) -> str:
    """``path``'s text with the block between ``<!-- tag:start -->`` and ``<!-- tag:end -->`` replaced."""
    text = path.read_text()
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    if start not in text or end not in text:
        sys.exit(f"error: {path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body.strip("\n") + "\n" + end + rest.split(end, 1)[1]


def outputs(plots: bool) -> dict[Path, str]:
    """Every file this script writes -> its new text (the plots are written as a side effect)."""
    if plots:
        summary_plot()
    return {
        ROOT / "docs" / "results.md": splice(ROOT / "docs" / "results.md", "tables", "\n".join(full_tables(plots))),
        ROOT / "README.md": splice(ROOT / "README.md", "results", summary_table()
                                   + f"\n\n![PPL vs bpw](bench/results/{SUMMARY_PLOT})"),
        MEASURED: json.dumps(measured_index(RESULTS), indent=1) + "\n",
    }


def main() -> None:
    check = "--check" in sys.argv
    stale = []
    for path, text in outputs(plots=not check).items():
        if (path.read_text() if path.exists() else None) != text:
            stale.append(path)
            if not check:
                path.write_text(text)
    if check and stale:
        sys.exit("error: out of date (run python bench/render_tables.py): " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
    print("up to date" if not stale else "wrote " + ", ".join(str(p.relative_to(ROOT)) for p in stale))


if __name__ == "__main__":
    main()
