"""Modules that run packed weights: :mod:`.quant_linear` (mlx and dupq formats, the module factory
``build_module``), :mod:`.moe_linear` (per-expert widths), :mod:`.dup_linear` (copies),
:mod:`.online_rotation`, :mod:`.act_quant` (activation fake-quant), :mod:`.cpu` (CPU prefill).

Importing the package registers every module format with
:data:`~mlx_dupq.layers.quant_linear.FORMAT_BUILDERS` (see docs/architecture.md).
"""

from . import moe_linear  # noqa: F401  (registers the "moe_mixed" module format)
