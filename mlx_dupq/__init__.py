"""mlx-dupq: 2-bit quantization for MLX with rotations, error-compensating quantizers and layer duplication."""

__version__ = "0.1.0"


def convert(*args, **kwargs):
    """Convert a model to an mlx-dupq pack; see :func:`mlx_dupq.pipeline.convert`."""
    from .pipeline import convert as _convert

    return _convert(*args, **kwargs)


def load(*args, **kwargs):
    """Load a pack or a float model as ``(model, tokenizer)``; see :func:`mlx_dupq.io.loader.load`."""
    from .io.loader import load as _load

    return _load(*args, **kwargs)


__all__ = ["convert", "load", "__version__"]
