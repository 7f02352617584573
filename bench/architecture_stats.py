"""Architecture figures of a checkout of mlx_dupq: import cycles, deferred internal imports, lines per module.

    python bench/architecture_stats.py                       # this checkout, printed
    python bench/architecture_stats.py --root /tmp/arch-before --label before --json bench/results/architecture.json
    python bench/architecture_stats.py --label after --json bench/results/architecture.json

``--json`` adds (or replaces) the entry ``--label`` in the file, so "before" and "after" sit side by
side. The import graph is :mod:`mlx_dupq.import_graph`'s, the one tests/test_architecture.py checks:
every import of the package counts, module level and inside functions (``if TYPE_CHECKING:`` blocks
excepted); a deferred import is one inside a function.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mlx_dupq.import_graph import cycles, import_graph
from mlx_dupq.io.atomic import write_result


def stats(root: Path) -> dict:
    pkg = root / "mlx_dupq"
    edges, deferred = import_graph(pkg)
    cyc = cycles(edges)
    lines = {str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(pkg.rglob("*.py"))}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "commit": commit,
        "modules": len(lines),
        "cycles": len(cyc),
        "largest_cycle": len(cyc[0]) if cyc else 0,
        "deferred_internal_imports": len(deferred),
        "lines_max": max(lines.values()),
        "lines_max_module": max(lines, key=lines.get),
        "lines_mean": round(sum(lines.values()) / len(lines), 1),
        "modules_over_600_lines": sum(v > 600 for v in lines.values()),
        "lines_total": sum(lines.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout to measure")
    ap.add_argument("--label", default="after", help="entry name in the JSON file (before / after)")
    ap.add_argument("--json", type=Path, help="add the figures to this JSON file under --label")
    args = ap.parse_args()
    s = stats(args.root.resolve())
    s["command"] = "python " + " ".join(["bench/architecture_stats.py", *sys.argv[1:]])
    for k, v in s.items():
        print(f"{k:28s} {v}")
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.exists() else {}
        data[args.label] = s
        write_result(args.json, data)


if __name__ == "__main__":
    main()
