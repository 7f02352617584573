"""Optional extras: packages only some commands need, imported on first use.

    pip install 'mlx-dupq[eval]'     lm-eval, datasets, pyarrow   (eval tasks, hub datasets, parquet text)
    pip install 'mlx-dupq[search]'   optuna                       (search-dup --method tpe | two-stage)
    pip install 'mlx-dupq[plots]'    matplotlib                   (report, bench plots)

:func:`require` imports one of them or fails with a one-line :class:`DupqError` naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import DupqError

EXTRAS = {"eval": ("lm_eval", "datasets", "pyarrow"), "search": ("optuna",), "plots": ("matplotlib",)}


class MissingExtra(DupqError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module`` (e.g. ``"lm_eval.tasks"``), or say which extra to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if getattr(e, "name", None) and e.name.split(".")[0] not in (top, *EXTRAS.get(extra, ())):
            raise  # the package is there but broken: not a missing extra
        raise MissingExtra(f"{purpose} needs {top}, which is not installed; pip install 'mlx-dupq[{extra}]'") from None
