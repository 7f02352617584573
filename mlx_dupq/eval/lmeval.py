"""MMLU, HellaSwag and ARC-Challenge through EleutherAI's lm-evaluation-harness (README.md, F7.2).

The model is wrapped in mlx-lm's own lm-eval adapter (:class:`mlx_lm.evaluate.MLXLM`: prompt
prefilled into the KV cache once per context, each continuation scored from a copy of it);
:class:`DupqLM` only swaps its loader for :func:`mlx_dupq.io.loader.load`, so packs, GGUF files
and named models work too. Prompts, few-shot sampling and metrics are lm-eval's task configs,
unchanged (``acc``; HellaSwag and ARC also ``acc_norm``, the length-normalised choice). The
tokenizer adds its default special tokens (BOS for Llama-style tokenizers); no chat template.

Task names: ``mmlu`` (the 57 subjects; ``acc`` over all items, as lm-eval's group with
``weight_by_size``), ``mmlu_<subject>`` (one subject, e.g. ``mmlu_anatomy``), ``hellaswag``,
``arc_challenge``.

Data
----
Without ``data_dir`` the datasets come from the Hugging Face hub (``cais/mmlu``,
``Rowan/hellaswag``, ``allenai/ai2_arc``) via ``datasets``; offline that fails with a
:class:`DupqError`. With ``data_dir`` nothing is downloaded: each task reads local files in the
datasets' own formats (``.parquet`` as in the hub repos, or ``.jsonl`` with the same fields)::

    DIR/mmlu/<subject>/test-00000-of-00001.parquet   (few-shot: dev-...)   from hf.co/datasets/cais/mmlu
    DIR/ARC-Challenge/test-00000-of-00001.parquet   (few-shot: train-...) from hf.co/datasets/allenai/ai2_arc
    DIR/hellaswag/hellaswag_val.jsonl               (few-shot: hellaswag_train.jsonl)
                                                    from github.com/rowanz/hellaswag (data/)

For each split the names ``<split>-*.parquet``, ``<split>.parquet``, ``<split>.jsonl`` (and
HellaSwag's ``hellaswag_val.jsonl`` / ``hellaswag_train.jsonl``) are accepted. The split that
few-shot examples come from is needed only when ``num_fewshot > 0``; a missing file is a
one-line error that names it and where to get it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DupqError, UsageError
from ..extras import require
from .tasks import TASKS


@dataclass(frozen=True)
class LocalLayout:
    """Where a task's files live under ``--data-dir`` and which splits it needs."""

    subdir: str  # folder under DIR
    eval_split: str  # the split scored
    fewshot_split: str  # the split few-shot examples are drawn from
    source: str  # where to get the files
    aliases: tuple[tuple[str, str], ...] = ()  # (split, extra file name)


HELLASWAG = LocalLayout("hellaswag", "validation", "train", "https://github.com/rowanz/hellaswag/tree/master/data",
                        (("validation", "hellaswag_val.jsonl"), ("train", "hellaswag_train.jsonl")))
ARC_CHALLENGE = LocalLayout("ARC-Challenge", "test", "train",
                            "https://huggingface.co/datasets/allenai/ai2_arc/tree/main/ARC-Challenge")
HARNESS_TASKS = ("mmlu", "hellaswag", "arc_challenge")


def mmlu_layout(subject: str) -> LocalLayout:
    return LocalLayout(f"mmlu/{subject}", "test", "dev",
                       f"https://huggingface.co/datasets/cais/mmlu/tree/main/{subject}")


def is_harness_task(name: str) -> bool:
    return name in HARNESS_TASKS or name.startswith("mmlu_")


# --------------------------------------------------------------------------- the model adapter


def model_class():
    """:class:`DupqLM`, built on first use (importing lm-eval takes ~1 s)."""
    global _DupqLM
    if _DupqLM is None:
        LM = require("lm_eval.api.model", "eval", "lm-eval tasks").LM  # deferred: optional extra
        MLXLM = require("mlx_lm.evaluate", "eval", "lm-eval tasks").MLXLM  # deferred: optional extra (imports lm_eval)

        class DupqLM(MLXLM):
            """mlx-lm's lm-eval adapter around an already loaded ``(model, tokenizer)``."""

            def __init__(self, model, tokenizer, max_tokens: int | None = None, batch_size: int = 8):
                LM.__init__(self)
                self._model, self.tokenizer = model, tokenizer
                self._max_tokens = max_tokens
                self._batch_size = batch_size
                self.use_chat_template = False
                self._sampler = None

            @property
            def tokenizer_name(self) -> str:
                return str(getattr(self.tokenizer, "name_or_path", "mlx-dupq")).replace("/", "__")

        _DupqLM = DupqLM
    return _DupqLM


_DupqLM = None


# --------------------------------------------------------------------------- task configs


def _task_manager():
    """lm-eval's task index over the three task folders only (indexing all ~14k configs takes ~40 s)."""
    tasks_pkg = require("lm_eval.tasks", "eval", "lm-eval tasks")  # deferred: optional extra
    TaskManager = tasks_pkg.TaskManager

    root = Path(tasks_pkg.__file__).parent
    return TaskManager(include_defaults=False, include_path=[root / "mmlu" / "default", root / "hellaswag", root / "arc"])


def mmlu_subjects(tm) -> list[str]:
    """The 57 ``mmlu_<subject>`` task names of lm-eval's default MMLU."""
    return sorted(n for n, e in tm.task_index.items()
                  if n.startswith("mmlu_") and e.yaml_path is not None and e.kind.name == "TASK"
                  and e.yaml_path.parent.name == "default" and e.yaml_path.parent.parent.name == "mmlu")


def expand(names: Sequence[str], tm) -> dict[str, list[str]]:
    """``{requested name: [lm-eval task names]}``: ``mmlu`` becomes its 57 subjects."""
    subjects = mmlu_subjects(tm)
    out = {}
    for n in names:
        if n == "mmlu":
            out[n] = subjects
        elif n.startswith("mmlu_"):
            if n not in subjects:
                raise DupqError(f"unknown MMLU subject task {n!r}; use mmlu or one of mmlu_{subjects[0][5:]}, ...")
            out[n] = [n]
        else:
            out[n] = [n]
    return out


def find_split_file(root: Path, layout: LocalLayout, split: str) -> Path | None:
    """The local file of ``split`` under ``root / layout.subdir``, or None."""
    d = root / layout.subdir
    names = sorted(d.glob(f"{split}-*.parquet")) + [d / f"{split}.parquet", d / f"{split}.jsonl"]
    names += [d / f for s, f in layout.aliases if s == split]
    return next((p for p in names if p.is_file()), None)


def _layout(task: str) -> LocalLayout:
    if task == "hellaswag":
        return HELLASWAG
    if task == "arc_challenge":
        return ARC_CHALLENGE
    return mmlu_layout(task[len("mmlu_"):])


def local_config(task: str, tm, data_dir: Path, num_fewshot: int) -> dict:
    """lm-eval's config of ``task`` with its dataset replaced by the files under ``data_dir``."""
    load_yaml = require("lm_eval.tasks._yaml_loader", "eval", "lm-eval tasks").load_yaml  # deferred: optional extra

    layout = _layout(task)
    needed = [layout.eval_split] + ([layout.fewshot_split] if num_fewshot > 0 else [])
    files = {}
    for split in needed:
        f = find_split_file(data_dir, layout, split)
        if f is None:
            want = data_dir / layout.subdir / f"{split}-00000-of-00001.parquet"
            if layout.aliases:
                want = data_dir / layout.subdir / dict(layout.aliases)[split]
            raise DupqError(f"{want} not found (task {task}, {split} split); get it from {layout.source} "
                            f"or leave out --data-dir to load from the hub")
        files[split] = str(f)
    kinds = {Path(f).suffix for f in files.values()}
    if len(kinds) > 1:
        raise DupqError(f"the files of {task} under {data_dir / layout.subdir} mix {' and '.join(sorted(kinds))}; "
                        "use one format per task")
    cfg = load_yaml(tm.task_index[task].yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg.update(dataset_path="parquet" if kinds == {".parquet"} else "json", dataset_name=None,
               dataset_kwargs={"data_files": files})
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) is not None and cfg[key] not in files:
            cfg[key] = None
    return cfg


# --------------------------------------------------------------------------- running


def run_harness(model, tokenizer, tasks: Sequence[str], num_fewshot: int = 0, limit: int | None = None,
                data_dir: str | Path | None = None, seed: int = 0, batch_size: int = 8) -> dict:
    """Score ``model`` on lm-eval ``tasks``: ``{task: {"acc", ["acc_norm"], "n", "stderr"...}, ...}``.

    ``limit``: the first N items of each (sub)task. ``data_dir``: local files (module docstring).
    ``mmlu`` is reported as the item-weighted mean over its subjects plus ``subjects`` (count)."""
    if num_fewshot < 0:
        raise UsageError(f"--num-fewshot {num_fewshot} must be 0 or more")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit} must be at least 1")
    lm_eval = require("lm_eval", "eval", f"the tasks {', '.join(tasks)}")  # deferred: optional extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tm = _task_manager()
    groups = expand(tasks, tm)
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise DupqError(f"--data-dir {root} is not a directory")
    specs = []
    for subs in groups.values():
        for t in subs:
            specs.append(local_config(t, tm, root, num_fewshot) if root is not None else t)
    lm = model_class()(model, tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit, task_manager=tm, log_samples=False,
            bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except DupqError:
        raise
    except Exception as e:  # datasets' offline / missing-split errors
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if root is not None:
            raise DupqError(f"lm-eval could not run {', '.join(tasks)} on the files under {root} ({why}); check that "
                            "they are the datasets' own files (few-shot needs more than --num-fewshot examples)") from None
        raise DupqError(f"lm-eval could not load {', '.join(tasks)} from the hub ({why}); offline, pass --data-dir "
                        "with local files (layout: mlx_dupq/eval/lmeval.py)") from None
    per_task, sizes = res["results"], res.get("n-samples", {})
    out: dict = {}
    for name, subs in groups.items():
        n = {s: int(sizes.get(s, {}).get("effective", 0)) for s in subs}
        total = sum(n.values())
        entry: dict = {"n": total, "num_fewshot": num_fewshot, "harness": f"lm-eval {lm_eval.__version__}"}
        for metric in ("acc", "acc_norm"):
            key = f"{metric},none"
            if all(key in per_task.get(s, {}) for s in subs) and total:
                entry[metric] = sum(per_task[s][key] * n[s] for s in subs) / total
        if len(subs) > 1:
            entry["subjects"] = len(subs)
        out[name] = entry
    out["seconds"] = time.perf_counter() - t0
    return out


def split_tasks(spec: str) -> tuple[list[str], list[str]]:
    """``"cloze,mmlu,mc"`` -> (built-in Brown tasks, lm-eval tasks), each in the given order."""
    names = list(dict.fromkeys(t.strip().lower() for t in spec.split(",") if t.strip()))
    bad = [t for t in names if t not in TASKS and not is_harness_task(t)]
    if bad or not names:
        raise UsageError(f"unknown task {', '.join(bad) or repr(spec)}; use a comma-separated list of "
                        f"{', '.join(TASKS + HARNESS_TASKS)} or mmlu_<subject>")
    return [t for t in names if t in TASKS], [t for t in names if t not in TASKS]
