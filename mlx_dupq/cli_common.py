"""What every ``mlx-dupq`` command module shares: the two consoles, progress bars, help strings and
the lazy door to :mod:`mlx_dupq.api` (docs/architecture.md, layer "cli")."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import DupqError
from .io.atomic import write_result

out = Console()
err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = "A pack, a local HF/mlx directory, a .gguf file, a named model (see `models list`) or a hub repo id."
PIPELINE_HELP = "Split the pack's layers over the processes of `mlx.launch` (docs/distributed.md)."
PEER_TIMEOUT_HELP = "With --pipeline: exit when a step waits this many seconds on another rank."


def lib(*names: str):
    """The library functions a command calls (from :mod:`mlx_dupq.api`), one name -> one object."""
    from . import api  # deferred: mlx-lm's import costs ~5 s (python -X importtime); --help and bad flags answer at once

    objs = [getattr(api, n) for n in names]
    return objs[0] if len(objs) == 1 else objs


def rank_log(line: str) -> None:
    err.print(f"[dim]{escape(line)}[/dim]")


def print_ranks(res: dict) -> None:
    for r in res.get("per_rank", []):
        out.print(f"  rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][1] - 1}, "
                  f"{r['resident_bytes'] / 2**20:.1f} MiB weights, peak {r['peak_memory_bytes'] / 2**20:.1f} MiB")


@contextmanager
def progress_bar(enabled: bool = True):
    """A rich progress bar; yields a callback ``(message, done, total)``."""
    if not enabled or not err.is_terminal and os.environ.get("MLX_DUPQ_PROGRESS") != "1":
        # non-interactive: a line when the message changes and at each tenth of the total (so a
        # fixed message, "cloze" or "windows", still shows its progress), never one per step
        last = {"msg": None, "tenth": None}

        def plain(message: str, done: int, total: int) -> None:
            tenth = done * 10 // total if total > 0 else 0
            if message != last["msg"] or tenth != last["tenth"]:
                err.print(f"[dim]{escape(message)} ({done}/{total})[/dim]")
                last.update(msg=message, tenth=tenth)

        yield plain
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=False,
    ) as bar:
        task = bar.add_task("starting", total=1)

        def cb(message: str, done: int, total: int) -> None:
            bar.update(task, description=message, completed=done, total=max(total, 1))

        yield cb


@contextmanager
def training_bar():
    """Progress of a training stage; yields ``(phase, done, total, info)`` (loss, validation KL, ETA)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err,
                  disable=not err.is_terminal and os.environ.get("MLX_DUPQ_PROGRESS") != "1") as bar:
        tasks: dict = {}
        shown = {"valid": ""}

        def cb(phase: str, done: int, total: int, info: dict) -> None:
            if phase == "valid":
                shown["valid"] = f"valid KL {info['kl']:.4f}"
                if bar.disable:  # logs: one line per validation
                    err.print(f"[dim]step {done}/{total}: {shown['valid']}[/dim]")
            key = phase if phase in ("targets", "chat") else "train"
            if key not in tasks:
                label = {"targets": "teacher targets", "chat": "teacher answers (chat data)"}.get(key, "distilling")
                tasks[key] = bar.add_task(label, total=1, info="")
            text = f"loss {info['loss']:.4f}  {shown['valid']}" if "loss" in info else shown["valid"]
            bar.update(tasks[key], completed=done, total=max(total, 1), info=text)

        yield cb


def write_json(path: Path, data: dict) -> None:
    """Write a command's result (``--json``) with :func:`~mlx_dupq.io.atomic.write_result`, which adds the
    machine that measured it (``"machine"``)."""
    try:
        write_result(path, data)
    except OSError as e:
        raise DupqError(f"could not write {path} ({e.strerror or e}); choose another --json path") from None


def pack_bits(model: str) -> Optional[float]:
    """All-in bits per weight of a pack (None for anything else: a full-precision reference)."""
    packio = lib("packio")

    p = Path(str(model)).expanduser()
    return packio.pack_summary(p)["bits_per_weight"] if p.is_dir() and packio.is_pack(p) else None


def command_line() -> str:
    return " ".join(["mlx-dupq", *sys.argv[1:]])
