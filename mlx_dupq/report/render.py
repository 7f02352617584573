"""``mlx-dupq report``: result files -> ``REPORT.md`` (tables) and PNG plots (matplotlib, Agg).

Plots (written only when there is something to draw):

- ``ppl_vs_bpw_<model>_<data>_ctx<N>.png``: perplexity (log scale when it spans more than 3x) against
  all-in bits per weight, one colour per method family, each point labelled; the full-precision
  reference a dashed line.
- ``accuracy_vs_bpw.png``: accuracy per task against bits per weight; references dashed lines.
- ``layers_<k>.png``: every numeric per-layer field of a per-layer score list, one panel each.

The markdown holds a table per kind (perplexity, accuracy, agreement, speed, long context,
memory study, other row lists) with the source file of every row, and lists unknown files.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..errors import DupqError
from ..extras import require
from .collect import Results, collect


def _fmt(v, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        if abs(v) >= 1e5 or 0 < abs(v) < 0.01:
            return f"{v:.3g}"
        return f"{v:.{nd}f}"
    return str(v).replace("|", "\\|")


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "x"


def _rel(src: str, root: Path) -> str:
    """The source file's name (the report lists its full path once, at the top)."""
    return Path(src).name


# --------------------------------------------------------------------------- plots


def _plt():
    matplotlib = require("matplotlib", "plots", "plotting")  # deferred: optional extra
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "plots", "plotting")  # deferred: optional extra

    return plt


def plot_ppl(points: list[dict], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    quant = [p for p in points if not p["reference"] and p["bpw"] is not None and p["ppl"] and math.isfinite(p["ppl"])]
    series = sorted({p["series"] for p in quant})
    for s in series:
        pts = sorted((p for p in quant if p["series"] == s), key=lambda p: p["bpw"])
        ax.scatter([p["bpw"] for p in pts], [p["ppl"] for p in pts], label=s, s=28, zorder=3)
        for p in pts:
            text = p["label"].replace(s, "").strip() or p["label"]
            ax.annotate(text if len(text) <= 24 else text[:22] + "..", (p["bpw"], p["ppl"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for i, r in enumerate({p["label"]: p for p in points if p["reference"]}.values()):
        ax.axhline(r["ppl"], ls="--", lw=1, color=f"C{(len(series) + i) % 10}", label=f"{r['label']}: {r['ppl']:.2f}")
    ys = [p["ppl"] for p in points if p["ppl"] and math.isfinite(p["ppl"])]
    log = bool(ys) and max(ys) / min(ys) > 3  # a narrow range reads better on a linear axis
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("all-in bits per weight")
    ax.set_ylabel("perplexity (log scale)" if log else "perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acc(points: list[dict], path: Path) -> None:
    plt = _plt()
    tasks = sorted({p["task"] for p in points})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        pts = [p for p in points if p["task"] == t]
        q = sorted((p for p in pts if not p["reference"]), key=lambda p: p["bpw"])
        ax.plot([p["bpw"] for p in q], [p["acc"] for p in q], "o", label="quantized")
        for p in q:
            ax.annotate(p["model"], (p["bpw"], p["acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for i, r in enumerate(p for p in pts if p["reference"]):
            ax.axhline(r["acc"], ls="--", lw=1, color=f"C{i + 1}", label=f"{r['model']}: {r['acc']:.3f}")
        ax.set_ylim(0, max(max(p["acc"] for p in pts) * 1.2, 0.05))
        n = max((p.get("n") or 0) for p in pts)
        ax.set_title(f"{t} (n={n})")
        ax.set_xlabel("all-in bits per weight")
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(rows: list[dict], title: str, path: Path) -> None:
    plt = _plt()
    keys = [k for k in rows[0] if k != "layer" and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                                     for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), sharex=True, squeeze=False)
    xs = [r["layer"] for r in rows]
    for ax, k in zip(axes[:, 0], keys):
        ax.bar(xs, [r[k] for r in rows])
        ax.set_ylabel(k)
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("layer")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batch(rows: list[dict], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    b = [x["batch"] for x in rows]
    ax.plot(b, [x["decode_tps"] for x in rows], "o-", label="all sequences")
    ax.plot(b, [x["per_seq_tps"] for x in rows], "s--", label="per sequence")
    ax.set_xscale("log", base=2)
    ax.set_xticks(b, [str(v) for v in b])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _sections(r: Results, root: Path, plots: dict[str, list[str]]) -> list[str]:
    s = []
    if r.ppl:
        s.append("## Perplexity\n")
        s += [f"![{p}]({p})\n" for p in plots.get("ppl", [])]
        rows = sorted(r.ppl, key=lambda p: (p["model"], str(p["data"]), p["ctx"] or 0, -(p["bpw"] or 99)))
        s.append(md_table(["model", "method / recipe", "bits/weight", "PPL", "data", "ctx", "source"],
                          [[p["model"], p["label"], p["bpw"], p["ppl"], p["data"], p["ctx"], _rel(p["source"], root)]
                           for p in rows]) + "\n")
    if r.acc:
        s.append("## Accuracy\n")
        s += [f"![{p}]({p})\n" for p in plots.get("acc", [])]
        s.append(md_table(["model", "bits/weight", "task", "acc", "acc_norm", "items", "shots", "source"],
                          [[p["model"], p["bpw"], p["task"], p["acc"], p["acc_norm"], p["n"], p["num_fewshot"],
                            _rel(p["source"], root)] for p in r.acc]) + "\n")
    if r.agree:
        s.append("## Agreement with the reference\n")
        s.append(md_table(["reference", "model", "bits/weight", "identical", "first divergence", "BLEU-4", "ROUGE-L",
                           "top-1", "KL (nats)", "source"],
                          [[Path(a["reference"]).name, Path(a["model"]).name, a.get("bits_per_weight"), a["identical_share"],
                            a["first_divergence"], a["bleu4"], a["rouge_l"], a.get("top1_agreement"), a.get("kl"),
                            _rel(a["source"], root)] for a in r.agree]) + "\n")
    if r.speed:
        s.append("## Speed and size\n")
        s.append(md_table(["model", "bits/weight", "size MiB", "prompt tok/s", "gen tok/s", "TTFT s", "peak MiB", "source"],
                          [[Path(str(x.get("model"))).name, x.get("bits_per_weight"), x.get("size_mib"), x.get("prompt_tps"),
                            x.get("generation_tps"), x.get("ttft_s"), x.get("peak_memory_mib"), _rel(x["source"], root)]
                           for x in r.speed]) + "\n")
    if r.longctx:
        s.append("## Long context\n")
        s.append(md_table(["model", "data", "mode", "ctx", "windows", "chunk", "PPL", "peak MiB", "seconds", "source"],
                          [[x["model"], x["data"], x.get("mode"), x["ctx"], x["windows"], x.get("chunk"), x["ppl"],
                            (x.get("peak_memory_bytes") or 0) / 2**20, x.get("seconds"), _rel(x["source"], root)]
                           for x in r.longctx]) + "\n")
    for i, m in enumerate(r.memory):
        s.append(f"## Memory study: {m.get('model')} ({m.get('device', '')})\n")
        s += [f"![{p}]({p})\n" for p in plots.get(f"memory{i}", [])]
        bw = m.get("bandwidth", {})
        mib = 2**20
        s.append(f"Weights read per decode step: {_fmt(bw.get('weight_bytes', 0) / mib, 1)} MiB ({bw.get('model_dtype')}); "
                 f"peak bandwidth {_fmt(bw.get('peak_gbps'), 2)} GB/s ({bw.get('peak_source')}); "
                 f"measured matrix-vector {_fmt(bw.get('measured_gemv_gbps'), 2)} GB/s.\n")
        s.append(md_table(["batch", "decode tok/s", "per sequence tok/s", "MiB moved / token", "GB/s", "utilisation",
                           "KV MiB (allocated)", "peak MiB"],
                          [[x["batch"], x["decode_tps"], x["per_seq_tps"], x["bytes_per_token"] / mib, x["achieved_gbps"],
                            x.get("utilisation"), x["kv_cache_bytes"] / mib, x["peak_memory_bytes"] / mib]
                           for x in m.get("batch", [])]) + "\n")
        s.append(md_table(["KV cache", "bytes / position", "decode tok/s", "PPL float cache", "PPL this cache", "top-1 agreement",
                           "KL (nats)"],
                          [[x["kv"], x["kv_bytes_per_position"], x["decode_tps"], x.get("ppl_float"), x.get("ppl_quant"),
                            x.get("top1_agreement"), x.get("kl")] for x in m.get("kv_cache", [])]) + "\n")
        s.append(f"source: {_rel(m['source'], root)}\n")
    for i, (src, rows) in enumerate(r.layers):
        s.append(f"## Per-layer scores ({_rel(src, root)})\n")
        s += [f"![{p}]({p})\n" for p in plots.get(f"layers{i}", [])]
        heads = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
        s.append(md_table(heads, [[x.get(k) for k in heads] for x in rows]) + "\n")
    for src, rows in r.tables:
        s.append(f"## {Path(src).stem}\n")
        heads = list(dict.fromkeys(k for x in rows for k in x if not isinstance(x[k], (dict, list))))
        s.append(md_table(heads, [[x.get(k) for k in heads] for x in rows]) + "\n")
    if r.unknown:
        s.append("## Files not understood\n")
        s += [f"- {_rel(src, root)}: {why}" for src, why in r.unknown]
        s.append("")
    return s


def write_report(paths, out_dir: str | Path) -> dict:
    """Read ``paths`` and write ``out_dir/REPORT.md`` and the plots; returns ``{"report", "plots", "unknown"}``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DupqError("no result files given; pass one or more JSON files (e.g. bench/results/*.json)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DupqError(f"{missing[0]} is not a file; pass result JSON files")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DupqError(f"could not create {out} ({e.strerror or e}); choose another --out") from None
    r = collect(paths)
    plots: dict[str, list[str]] = {}

    def save(kind: str, name: str, fn, *args) -> None:
        tmp = out / (name + ".tmp.png")
        fn(*args, tmp)
        if tmp.exists():
            os.replace(tmp, out / name)
            plots.setdefault(kind, []).append(name)

    groups: dict[tuple, list[dict]] = {}
    for p in r.ppl:
        groups.setdefault((p["model"], p["data"], p["ctx"]), []).append(p)
    for (model, data, ctx), pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if any(not p["reference"] for p in pts):
            save("ppl", f"ppl_vs_bpw_{_slug(model)}_{_slug(data)}_ctx{ctx}.png", plot_ppl, pts,
                 f"{model}: perplexity on {data}, ctx {ctx}")
    if any(not p["reference"] and p["bpw"] is not None for p in r.acc):
        save("acc", "accuracy_vs_bpw.png", plot_acc, r.acc)
    for i, m in enumerate(r.memory):
        if m.get("batch"):
            save(f"memory{i}", f"batch_scaling_{_slug(m.get('model'))}.png", plot_batch, m["batch"],
                 f"{m.get('model')}: decode speed vs batch")
    for i, (src, rows) in enumerate(r.layers):
        save(f"layers{i}", f"layers_{i}.png", plot_layers, rows, f"per-layer scores: {Path(src).name}")
    files = "\n".join(f"- {p}" for p in paths)
    text = f"# mlx-dupq results\n\nFrom {len(paths)} result files:\n\n{files}\n\n" + "\n".join(_sections(r, out, plots))
    tmp = out / "REPORT.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "REPORT.md")
    return {"report": str(out / "REPORT.md"), "plots": [p for v in plots.values() for p in v],
            "unknown": [src for src, _ in r.unknown]}
