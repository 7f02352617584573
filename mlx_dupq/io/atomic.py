"""Atomic writes: a temp file, fsync, then rename (a reader never sees a half-written file).

:func:`write_result` is the one writer of result files (``bench/results/*.json``, a command's
``--json``): it adds the machine that measured them (``tests/test_bench_results.py`` checks that the
bench scripts write through it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._env import machine_record


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON through a temp file + rename (never a half-written file)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temp file + rename (never a half-written file).

    The temp file is this process's own (``NAME.PID.tmp``), so that runs writing the same file at the
    same time never write into each other's temp file; it is removed when the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_result(path: str | Path, data: dict) -> None:
    """Write a result file atomically (:func:`write_json_atomic`): ``data`` plus ``"machine"``, what
    measured it (:func:`mlx_dupq._env.machine_record`: CPU, BLAS, versions, device; it replaces a
    ``"machine"`` that ``data`` carries). In a file that gathers the rows of several runs it is the
    machine of the run that wrote last; rows that must say their own machine carry a record themselves."""
    write_json_atomic(path, {**data, "machine": machine_record()})
