"""Render the markdown tables of bench/results/*.json (the README quotes them).

    python bench/render_tables.py            # writes bench/results/TABLES.md
    python bench/render_tables.py --readme   # also replaces README.md's results block with it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main() -> None:
    parts = ["# Result tables (generated by `python bench/render_tables.py` from bench/results/*.json)", ""]
    parts += ["## Round-to-nearest: mlx-dupq vs mlx-lm's `convert -q`, same run", ""]
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
            parts += [w2_table(p), "", f"![PPL vs bpw](bench/results/{w2_plot(p).name})", ""]
    if (RESULTS / "stream_memory.json").exists():
        parts += ["## Streaming conversion memory (Qwen2-32B layer shapes)", "", stream_table(RESULTS / "stream_memory.json"), ""]
    benches = sorted(RESULTS.glob("bench_*.json"))
    if benches:
        parts += ["## Speed and memory (CPU, 2 cores, float32 compute)", ""]
        for p in benches:
            parts += [bench_table(p), ""]
    out = RESULTS / "TABLES.md"
    out.write_text("\n".join(parts).replace("](bench/results/", "]("))  # links relative to TABLES.md
    if "--readme" in sys.argv:
        readme = RESULTS.parent.parent / "README.md"
        text = readme.read_text()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        body = "\n".join(parts[2:])  # without the file's own title
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + body.replace("## ", "### ") + "\n" + end + rest.split(end, 1)[1])
    print(out.read_text() if "-q" not in sys.argv else out)


if __name__ == "__main__":
    main()
