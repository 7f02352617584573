"""Rotations (docs/quality.md, F4): seeded orthogonal transforms, QuaRot-style offline folding, DFRot refinement.

- :mod:`.hadamard`  full and block Hadamard transforms (pure functions)
- :mod:`.rotations` the :class:`Rotation` object, every kind, :func:`make_rotation`
- :mod:`.dfrot`     DFRot-style optimised rotation from calibration activations
- :mod:`.fold`      folding into Hugging Face weight dicts, layer by layer
- :mod:`.diversity` angular distance and dissimilar-rotation selection
"""

from .dfrot import dfrot, per_token_quantizer
from .diversity import angular_distance, greedy_diverse, most_dissimilar_pair
from .fold import (
    SUPPORTED_MODEL_TYPES,
    down_proj_name,
    fold_rotation,
    fuse_norms_layer,
    rotate_embeddings,
    rotate_layer,
    rotate_linear_input,
)
from .hadamard import block_hadamard, block_sizes, hadamard, hadamard_supported, largest_block
from .rotations import KINDS, Rotation, make_rotation

__all__ = [
    "KINDS",
    "SUPPORTED_MODEL_TYPES",
    "Rotation",
    "angular_distance",
    "block_hadamard",
    "block_sizes",
    "dfrot",
    "down_proj_name",
    "fold_rotation",
    "fuse_norms_layer",
    "greedy_diverse",
    "hadamard",
    "hadamard_supported",
    "largest_block",
    "make_rotation",
    "most_dissimilar_pair",
    "per_token_quantizer",
    "rotate_embeddings",
    "rotate_layer",
    "rotate_linear_input",
]
