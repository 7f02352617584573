"""Mixture-of-Experts models: routing studies, expert-wise precision, expert duplication, top-k,
and (``train``) the tiny DeepSeek-MoE model trained here on the Brown corpus (docs/moe.md).

Submodules are imported on use (``from mlx_dupq.moe import train``); importing the package is free."""
