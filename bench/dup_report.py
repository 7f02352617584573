"""The duplication report: each seed claim beside our measurement, tables and plots.

    python bench/dup_report.py     # reads bench/results/dup_*.json (bench/dup_experiments.py)
                                   # writes bench/results/DUP_REPORT.md and bench/results/dup_*.png

The renderer is :func:`mlx_dupq.report.dup.write_dup_report`.
"""

from __future__ import annotations

from pathlib import Path

from mlx_dupq.report.dup import write_dup_report

if __name__ == "__main__":
    print(f"-> {write_dup_report(Path(__file__).resolve().parent / 'results')}")
