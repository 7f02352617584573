"""Tables for a terminal of any width, and for a pipe: whole names, never ``smollm2-1…``.

:func:`print_rows` prints a rich table when every cell fits the console's width on one line;
otherwise it *stacks*: the key column(s) on a line of their own, the other columns aligned under
one header line, indented::

    tensor
      shape     quant        mean       std  kurtosis  outliers %  absmax
    model.layers.0.self_attn.q_proj.weight
      576x576   mlx 4b g64  1.2e-04  4.5e-02      3.21       0.012   0.345

A key longer than the console is printed whole (the terminal wraps it; a pipe keeps it on one line).
"""

from __future__ import annotations

import textwrap
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

INDENT = "  "


def fits(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> bool:
    """True when a rich table (one space of padding per side, a border between columns) is at most ``width``."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return sum(widths) + 3 * len(widths) + 1 <= width


def print_rows(console: Console, title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]],
               key: int = 1, left: Sequence[str] = ()) -> None:
    """Print ``rows`` (strings) under ``headers``; the first ``key`` columns identify a row.

    ``left``: headers of the columns aligned left (the key columns always are); the rest align right.
    """
    rows = [[str(c) for c in r] for r in rows]
    if fits(headers, rows, console.width):
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i < key or h in left else "right", no_wrap=True)
        for r in rows:
            table.add_row(*map(escape, r))
        console.print(table)
        return
    rest = list(range(key, len(headers)))
    widths = {i: max([len(headers[i])] + [len(r[i]) for r in rows]) for i in rest}

    def line(cells: Sequence[str]) -> str:
        parts = [(c.ljust(widths[i]) if headers[i] in left else c.rjust(widths[i])) for i, c in zip(rest, cells)]
        return (INDENT + "  ".join(parts)).rstrip()

    if title:
        console.print(title, markup=False, highlight=False)
    console.print(" / ".join(headers[:key]), style="bold", markup=False, highlight=False)
    console.print(line([headers[i] for i in rest]), style="bold", markup=False, highlight=False)
    for r in rows:
        console.print("  ".join(r[:key]), markup=False, highlight=False, soft_wrap=True)
        console.print(line([r[i] for i in rest]), markup=False, highlight=False, soft_wrap=True)


def wrap_words(text: str, width: int, indent: str) -> list[str]:
    """``text`` wrapped at spaces to ``width`` (continuation lines start with ``indent``); a word longer
    than a line (a name, a path) is kept whole on a line of its own, never broken."""
    return textwrap.wrap(text, width=max(width, 40), subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False, drop_whitespace=True) or [""]
