"""Custom kernels (Metal / CUDA / plain-mx reference) for packed dupq layers.

Entry points: :mod:`~mlx_dupq.kernels.ops` (``qmv``, ``hadamard_qmv``, ``multi_copy_qmv``,
``gather_qmv``) over a :func:`~mlx_dupq.kernels.layout.kernel_pack`; the backend is chosen in
:mod:`~mlx_dupq.kernels.dispatch`; the layers reach them through :mod:`~mlx_dupq.kernels.route`
(decode on a custom-kernel backend only). See docs/kernels.md.
"""

from .dispatch import accepts, backend, choose, custom_active, probe, set_backend
from .layout import KernelPack, kernel_pack, split_stacked
from .ops import gather_qmv, hadamard_qmv, multi_copy_qmv, qmv

__all__ = ["KernelPack", "accepts", "backend", "choose", "custom_active", "gather_qmv", "hadamard_qmv",
           "kernel_pack", "multi_copy_qmv", "probe", "qmv", "set_backend", "split_stacked"]
