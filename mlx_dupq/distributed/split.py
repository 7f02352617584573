"""Which rank holds which layers: a pipeline split by measured bytes, read from safetensors headers.

A safetensors file starts with an 8-byte little-endian header length and a JSON header giving
every tensor's dtype, shape and byte range, so a tensor's stored size is known without reading
it. The pack's ``model.safetensors.index.json`` says which file holds which tensor.

Each rank holds a contiguous run of decoder layers; rank 0 also holds the token embedding, the
last rank the final norm and the head (with tied embeddings that is the embedding matrix, so
the last rank holds it too). A tensor's *resident* size is what it takes in memory once loaded:
its stored bytes, with float tensors (scales, norms, float weights) counted at the compute
dtype they are cast to. :func:`plan_stages` cuts the layers so that the largest rank's resident
bytes are as small as possible (an exact dynamic programme over the cut points).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..adapter import layer_index
from ..errors import DupqError

#: bytes per element of the float dtypes a safetensors header names
FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
COMPUTE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def is_embedding(name: str) -> bool:
    """The token embedding's tensors and module (``model.embed_tokens``)."""
    return ".embed_tokens" in "." + name


def read_header(path: Path) -> dict[str, dict]:
    """``{tensor: {"dtype", "shape", "data_offsets"}}`` of one safetensors file (the header only)."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise DupqError(f"{path} is not a readable safetensors file ({e}); the pack is damaged, convert it again") from None
    header.pop("__metadata__", None)
    return header


def weight_map(root: Path) -> dict[str, str]:
    """``{tensor: file name}`` from the index, or from the headers of a directory's safetensors files."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError):
            raise DupqError(f"{index} is damaged; convert the pack again") from None
    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise DupqError(f"no model*.safetensors in {root}; expected an mlx-dupq pack or an mlx-lm model directory")
    return {k: f.name for f in files for k in read_header(f)}


@dataclass(frozen=True)
class TensorSize:
    stored: int  # bytes in the file
    resident: int  # bytes in memory at the compute dtype


def tensor_sizes(root: str | Path, compute_dtype: str = "float32") -> dict[str, TensorSize]:
    """Stored and resident bytes of every tensor of a pack, from the safetensors headers."""
    root = Path(root)
    if compute_dtype not in COMPUTE_BYTES:
        raise DupqError(f"compute dtype {compute_dtype!r} is not supported; use one of {', '.join(COMPUTE_BYTES)}")
    wmap = weight_map(root)
    sizes: dict[str, TensorSize] = {}
    for fname in sorted(set(wmap.values())):
        for k, info in read_header(root / fname).items():
            if wmap.get(k) != fname:
                continue
            stored = int(info["data_offsets"][1]) - int(info["data_offsets"][0])
            fb = FLOAT_BYTES.get(info["dtype"])
            resident = stored if fb is None else stored // fb * COMPUTE_BYTES[compute_dtype]
            sizes[k] = TensorSize(stored, resident)
    missing = sorted(set(wmap) - set(sizes))
    if missing:
        raise DupqError(f"the index lists {missing[0]} but its file does not hold it; the pack is damaged, convert it again")
    return sizes


@dataclass(frozen=True)
class StagePlan:
    """Rank ``rank`` of ``size`` runs decoder layers ``start .. end-1``."""

    rank: int
    size: int
    start: int
    end: int
    tied: bool  # the head is the embedding matrix
    resident_bytes: int = 0
    stored_bytes: int = 0

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def owns(self, name: str) -> bool:
        """Whether this rank loads the tensor / module ``name``."""
        k = layer_index(name)
        if k is not None:
            return self.start <= k < self.end
        if is_embedding(name):
            return self.first or (self.last and self.tied)
        return self.last  # final norm, lm_head

    def to_dict(self) -> dict:
        return {"rank": self.rank, "layers": [self.start, self.end], "embedding": self.first or (self.last and self.tied),
                "head": self.last, "resident_bytes": self.resident_bytes, "stored_bytes": self.stored_bytes}


def balanced_cuts(layer_bytes: list[int], extra: list[int]) -> list[tuple[int, int]]:
    """Contiguous ranges ``[(start, end)]``, one per rank (at least one layer each), minimising the
    largest ``sum(layer_bytes[start:end]) + extra[rank]`` (ties: the earliest cuts)."""
    n, r = len(layer_bytes), len(extra)
    if n < r:
        raise DupqError(f"{r} ranks but the model has {n} decoder layers; run with at most {n} ranks")
    pre = [0]
    for b in layer_bytes:
        pre.append(pre[-1] + b)
    inf = float("inf")
    # best[k][i]: the smallest max load of ranks 0..k-1 running layers 0..i-1
    best = [[inf] * (n + 1) for _ in range(r + 1)]
    cut = [[0] * (n + 1) for _ in range(r + 1)]
    best[0][0] = 0
    for k in range(1, r + 1):
        for i in range(k, n - (r - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], pre[i] - pre[j] + extra[k - 1])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    ranges, i = [], n
    for k in range(r, 0, -1):
        j = cut[k][i]
        ranges.append((j, i))
        i = j
    return ranges[::-1]


def plan_stages(sizes: dict[str, TensorSize], n_ranks: int) -> list[StagePlan]:
    """The split of a pack's decoder layers over ``n_ranks`` (see the module docstring)."""
    if n_ranks < 1:
        raise DupqError(f"{n_ranks} ranks: need at least one")
    layers = sorted({k for k in map(layer_index, sizes) if k is not None})
    if not layers or layers != list(range(len(layers))):
        raise DupqError("the pack's decoder layers are not numbered 0..N-1; convert it again")
    tied = not any(k.startswith("lm_head.") for k in sizes)
    per_layer = [TensorSize(0, 0)] * len(layers)
    embed = head = TensorSize(0, 0)

    def add(a: TensorSize, b: TensorSize) -> TensorSize:
        return TensorSize(a.stored + b.stored, a.resident + b.resident)

    for k, s in sizes.items():
        i = layer_index(k)
        if i is not None:
            per_layer[i] = add(per_layer[i], s)
        elif is_embedding(k):
            embed = add(embed, s)
        else:
            head = add(head, s)
    last_extra = add(head, embed) if tied and n_ranks > 1 else head  # one rank holds one embedding
    extras = [TensorSize(0, 0)] * n_ranks
    extras[0] = embed
    extras[-1] = add(extras[-1], last_extra)
    cuts = balanced_cuts([s.resident for s in per_layer], [e.resident for e in extras])
    plans = []
    for rank, (a, b) in enumerate(cuts):
        total = extras[rank]
        for s in per_layer[a:b]:
            total = add(total, s)
        plans.append(StagePlan(rank, n_ranks, a, b, tied, total.resident, total.stored))
    return plans
