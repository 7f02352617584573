"""mlx-dupq: 2-bit quantization for MLX with rotations, error-compensating quantizers and layer duplication.

The public API is :func:`convert` and :func:`load`; the package layout is in docs/architecture.md.
"""

from ._version import __version__


def _api():
    from . import api  # deferred: `import mlx_dupq.<anything>` runs this file; importing mlx-lm here costs ~5 s

    return api


def convert(*args, **kwargs):
    """Convert a model to an mlx-dupq pack; see :func:`mlx_dupq.pipeline.convert`."""
    return _api().convert(*args, **kwargs)


def load(*args, **kwargs):
    """Load a pack or a float model as ``(model, tokenizer)``; see :func:`mlx_dupq.io.loader.load`."""
    return _api().load(*args, **kwargs)


__all__ = ["convert", "load", "__version__"]
