"""Everything the command line calls, in one module (docs/architecture.md, layer "cli").

:func:`mlx_dupq.cli_common.lib` imports this module on first use, so that ``mlx-dupq --help`` does not pay for
importing mlx-lm; the library itself is used through its own modules.
"""

from __future__ import annotations

from .auto import E2E_DEFAULTS, e2e_windows, plan_auto
from .bench_run import bench_models
from .eval.agree import agree_models, DEFAULT_PROMPTS, read_prompts
from .eval import data as eval_data
from .eval.data import load_text
from .eval.lmeval import run_harness, split_tasks
from .eval.pipelined import pipeline_bench, pipeline_perplexity, stream_pipelined
from .eval.ppl import perplexity
from .eval.speed import decode_comparison
from .eval.tasks import run_tasks
from .export.gguf import export_gguf
from .generate import stream
from .inspect_model import inspect_model
from .io import pack as packio
from .io.loader import load
from .io.manifest import verify_pack
from .io.models import fetch, list_models
from .pipeline import convert
from .refine.e2e import distill_pack
from .refine.e2e_spec import E2ESpec
from .report.recipes import KINDS as RECIPE_KINDS, catalog as recipe_catalog, describe as describe_measured
from .report.render import write_report
from .search.allocate import allocate_model, write_recipe
from .search.dup_search import Objective, search_dup, write_dup_recipe
from .search.sensitivity import parse_candidates
from .serve import log_requests, make_server
from .specs import parse_bits, parse_group_size

__all__ = ["DEFAULT_PROMPTS", "E2E_DEFAULTS", "E2ESpec", "Objective", "RECIPE_KINDS", "agree_models", "allocate_model", "bench_models", "convert", "decode_comparison", "describe_measured", "distill_pack", "e2e_windows", "eval_data", "export_gguf", "fetch", "inspect_model", "list_models", "load", "load_text", "log_requests", "make_server", "packio", "parse_bits", "parse_candidates", "parse_group_size", "perplexity", "pipeline_bench", "pipeline_perplexity", "plan_auto", "read_prompts", "recipe_catalog", "run_harness", "run_tasks", "search_dup", "split_tasks", "stream", "stream_pipelined", "verify_pack", "write_dup_recipe", "write_recipe", "write_report"]
