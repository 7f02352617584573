"""End-to-end distillation of a pack (``mlx-dupq refine PACK``): train its scales / biases
(and norms, MoE routers when asked) against the float model's next-token distribution; the codes never move.

The method is mlx-lm's DWQ (``mlx_lm/quant/dwq.py``), reused where it can be: its loss
(``mlx_lm.tuner.losses.kl_div_loss``), its batching (``mlx_lm.tuner.trainer.iterate_batches``,
whose ``comm_group`` gives each rank its share of a batch) and gradient checkpointing; the
gradients of the quantized layers' scales and biases come from ``mx.quantized_matmul`` /
``mx.dequantize``, as in DWQ. What is added:

- every layer kind a pack holds: mlx's ``QuantizedLinear`` / ``QuantizedEmbedding`` /
  ``QuantizedSwitchLinear`` and our own (:mod:`mlx_dupq.layers`: ``DupqLinear`` ..., the copies of a
  ``DupLinear``, the groups of a ``MixedSwitchLinear``, a ``RotatedInput``'s inner linear). Their
  stored ``scales`` / ``biases`` become trainable parameters, the stored layout stays (a symmetric
  format stores no biases: only its scales train). A module holding packed (integer) arrays of a
  kind not listed is refused in one line;
- chat data (``chat_samples``): windows of conversations in the chat template beside the text windows
  (:mod:`mlx_dupq.refine.chat_data`: the teacher's own answers, or a file), their validation windows
  beside the text's;
- data: ``samples + valid_samples`` disjoint windows of ``seq_len + 1`` tokens, picked at random
  (``seed``) among the non-overlapping windows of the calibration text; the validation windows are
  never trained on. The teacher runs once (:mod:`mlx_dupq.refine.teacher`; a model name, path or
  source is streamed one decoder layer at a time, never loaded whole): the top-``top_k``
  log-probabilities per position (float16, at ``temperature``) and their indices are kept in memory
  and in the work directory;
- loss: ``KL(teacher || student)`` over the teacher's top-k tokens plus one bucket for the rest
  of the vocabulary, at ``temperature`` (DWQ's cached loss renormalises over the top-k and misses
  student mass outside it), averaged over positions; Adam on float32 copies of the trained arrays;
- relative (option): scales and biases train in units of each group's initial ``|scale|``;
  lr_per_scale (option): one global unit instead, the median ``|scale|`` of the pack, so that a
  default lr carries from one model to another (the effective lr is in the result);
- validation KL (always at temperature 1: the teacher's validation targets are kept at 1 whatever
  the training temperature, so runs at different temperatures compare and early stopping follows
  what PPL sees) before training, every ``eval_every`` steps and at the end decides early stopping
  (``patience``) and which parameters are kept: the best validation ones, measured after rounding
  to the stored dtype, and never worse than the start (then the pack is left as it was);
- ``OUT.e2e-work/`` (or ``work``; convert puts it inside ``OUT.partial/``) holds the teacher targets and a checkpoint (parameters, Adam state, best so far)
  written at every validation; ``resume=True`` continues from it and gives the identical pack; a
  run started over (other lr, steps, samples ...) keeps the targets an interrupted run left there
  when the teacher, data, seq_len, seed, valid_samples, top_k and temperature are the same;
- data parallel: under ``mx.distributed.init()`` with ``size > 1`` (``mlx.launch``), each rank takes
  ``batch / size`` windows of every batch, gradients are averaged (``nn.average_gradients``), and
  rank 0 writes; the result equals one process with the same global batch up to float rounding;
  a rank on another machine (it does not see rank 0's work directory) keeps its teacher targets in
  its own ``WORK.rank<r>``, and a resumed run gets rank 0's checkpoint from rank 0;
- memory: a step holds the trained arrays in float32 as what Adam moves, its m and v, the gradients
  and the student's own values, plus (relative) one unit per quantized layer that its scales and
  biases share: about 5 to 5.5 times their float32 bytes. The start and the best so far are not
  held: the best lives in the checkpoint and is read back at the end.

The refined pack is written to ``OUT.tmp`` and renamed; its config.json records the options and
the validation KL before and after under ``mlx_dupq.refine.e2e``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.tuner.losses import kl_div_loss
from mlx_lm.tuner.trainer import grad_checkpoint, iterate_batches

from .._env import release_memory
from ..errors import DupqError
from ..eval.data import load_text, tokenize
from ..io import pack as packio
from ..io.manifest import read_manifest, write_manifest
from ..io.base import Source
from ..io.loader import float_model, load, load_model
from ..io.source import open_source
from ..layers.act_quant import ActQuantInput
from ..layers.cpu import use_dense_prefill
from ..layers.quant_linear import DupqEmbedding, DupqLinear, DupqSwitchLinear
from . import chat_data
from .e2e_spec import E2ESpec
from .teacher import Progress, Targets, build_targets, window_key
from .train_codes import unpack_codes

QUANT_CLASSES = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear, DupqLinear, DupqEmbedding,
                 DupqSwitchLinear)
NORM_CLASSES = (nn.RMSNorm, nn.LayerNorm)
STATE_FILE, CKPT_FILE, TARGETS_FILE = "state.json", "checkpoint.safetensors", "targets.json"
OWNER_FILE = "rank0"  # rank 0's token: which ranks share its work directory
MEMORY_TARGETS_BYTES = 1 << 30  # keep the teacher targets in memory below this size


@dataclass
class E2EResult:
    """What :func:`distill_pack` did. KL values are the validation loss (nats per token)."""

    out: Path
    valid_kl_before: float
    valid_kl_after: float
    steps_run: int
    best_step: int
    kept: str  # "trained" or "initial" (training never beat the start on validation)
    n_trainable: int
    train_tokens: int
    valid_tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    lr: float = 0.0  # Adam's effective learning rate (``spec.lr``, times the median |scale| with lr_per_scale)

    def to_dict(self) -> dict:
        return {"valid_kl_before": self.valid_kl_before, "valid_kl_after": self.valid_kl_after,
                "steps_run": self.steps_run, "best_step": self.best_step, "kept": self.kept,
                "n_trainable": self.n_trainable, "train_tokens": self.train_tokens,
                "valid_tokens": self.valid_tokens, "seconds": round(self.seconds, 1), "lr": self.lr,
                "history": self.history}


# --------------------------------------------------------------------------- trainable parameters


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_CLASSES) or type(m).__name__.endswith("Norm")


def _router(block: nn.Module) -> nn.Module | None:
    """The float router of an MoE block (mlx-lm's ``switch_mlp`` + ``gate``), None for other modules
    and for a quantized router (its scales train as any quantized layer's)."""
    if "switch_mlp" not in block or not isinstance(block.get("gate"), nn.Module):
        return None
    gate = block["gate"]
    return None if isinstance(gate, QUANT_CLASSES) else gate


def mark_trainable(model: nn.Module, trainable: tuple[str, ...]) -> list[str]:
    """Freeze ``model``, then unfreeze the requested stored arrays; returns their parameter names.

    Quantized layers (``QUANT_CLASSES``): ``scales`` / ``biases`` where stored; norms: ``weight`` /
    ``bias`` when ``"norms"`` is asked; the float routers of MoE blocks (their float arrays: weight,
    bias, a score-correction bias) when ``"routers"`` is asked. Refuses (one line) activation-quantized
    packs, non-affine mlx modes and any other module that holds packed integer arrays.
    """
    model.freeze()
    for path, m in model.named_modules():
        router = _router(m) if "routers" in trainable else None
        if router is not None:
            router.unfreeze(keys=[k for k, v in router.items() if isinstance(v, mx.array)
                                  and mx.issubdtype(v.dtype, mx.floating)], recurse=False)
        if isinstance(m, ActQuantInput):
            raise DupqError(f"refine cannot train {path}: activation fake-quant has no gradient; "
                            "refine a pack converted without [activations]")
        own = {k: v for k, v in m.items() if isinstance(v, mx.array)}
        if isinstance(m, QUANT_CLASSES):
            mode = getattr(m, "mode", "affine")
            if mode != "affine":
                raise DupqError(f"refine cannot train {path}: mlx quantization mode {mode!r} (only affine)")
            keys = [k for k in ("scales", "biases") if k in trainable and isinstance(own.get(k), mx.array)]
            if keys:
                m.unfreeze(keys=keys, recurse=False)
        elif _is_norm(m):
            if "norms" in trainable:
                m.unfreeze(keys=[k for k in ("weight", "bias") if k in own], recurse=False)
        else:
            packed = [k for k, v in own.items() if not mx.issubdtype(v.dtype, mx.floating)]
            if packed:
                raise DupqError(f"refine cannot train {path} ({type(m).__name__} with packed {packed[0]!r}): "
                                f"unknown layer kind; known: {', '.join(c.__name__ for c in QUANT_CLASSES)}")
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    if not names:
        raise DupqError(f"the pack has nothing to train for {', '.join(trainable)} "
                        "(no quantized layer, norm or MoE router)")
    return names


# --------------------------------------------------------------------------- data


def calibration_windows(ids: np.ndarray, spec: E2ESpec) -> tuple[np.ndarray, np.ndarray]:
    """Token stream (T,) -> (train (samples, L+1), valid (valid_samples, L+1)) int32, L = seq_len.

    The stream is cut into non-overlapping windows of L + 1 tokens; a seeded permutation picks the
    validation windows first and the training windows next, so the two never overlap."""
    return _windows(ids, spec.samples, spec.valid_samples, spec.seq_len, spec.seed, "the calibration text")


def _windows(ids: np.ndarray, samples: int, valid: int, seq_len: int, seed: int, what: str
             ) -> tuple[np.ndarray, np.ndarray]:
    w = seq_len + 1
    n = len(ids) // w
    need = samples + valid
    if n < need:
        raise DupqError(f"{what} has {len(ids)} tokens, {n} windows of {w}; {need} are needed "
                        f"(samples + valid_samples): use more text, fewer samples or a shorter seq_len")
    chunks = np.asarray(ids[: n * w], dtype=np.int32).reshape(n, w)
    order = np.random.default_rng(seed).permutation(n)
    return chunks[order[valid:need]], chunks[order[:valid]]


def _generator(src: Source) -> nn.Module:
    """The whole float model of ``src`` to generate with (MoE blocks on the CPU's dense-experts path)."""
    m = float_model(src)
    if mx.default_device() == mx.cpu:
        use_dense_prefill(m)
    return m


def chat_windows(teacher, tokenizer, spec: E2ESpec, progress: Progress | None = None, group=None
                 ) -> tuple[np.ndarray, np.ndarray, str]:
    """The chat windows of ``spec`` (:mod:`mlx_dupq.refine.chat_data`): (train (chat_samples, L+1),
    valid (chat_valid, L+1), a name with the conversations' count and digest). ``teacher``: the float
    teacher as :func:`distill_pack` holds it (a source is loaded whole to generate, then freed).
    Under data parallelism (``group`` of size > 1) rank 0 reads or generates the conversations and sends
    them to the others, so every rank holds the same windows (ranks on other machines sample nothing)."""
    if group is not None and group.size() > 1 and group.rank() != 0:
        convs, name = _from_rank0_json(None, group)
    else:
        convs, name = _chat_conversations(teacher, tokenizer, spec, progress)
        if group is not None and group.size() > 1:
            _from_rank0_json([convs, name], group)
    ids = chat_data.conversation_ids(tokenizer, convs)
    train, valid = _windows(ids, spec.chat_samples, spec.chat_valid(), spec.seq_len, spec.seed + 1,
                            f"the chat data ({len(convs)} conversations)")
    return train, valid, f"{name}[{len(convs)} conversations, {chat_data.digest(convs)}]"


def _chat_conversations(teacher, tokenizer, spec: E2ESpec, progress: Progress | None) -> tuple[list, str]:
    if spec.chat_data != "self":
        convs, name = chat_data.read_conversations(spec.chat_data), f"chat:{Path(spec.chat_data).name}"
    else:
        need = (spec.chat_samples + spec.chat_valid()) * (spec.seq_len + 1)
        if isinstance(teacher, Source):
            cache = chat_data.cache_path(teacher.fingerprint(), spec.data, spec.seed, spec.chat_max_tokens,
                                         spec.chat_temp)
            get = lambda: _generator(teacher)  # noqa: E731
        else:
            cache, get = None, lambda: teacher  # noqa: E731
        convs = chat_data.self_conversations(get, tokenizer, need, spec.data, spec.seed, spec.chat_max_tokens,
                                             spec.chat_temp, cache, progress)
        release_memory()
        name = "chat:self"
    return convs, name


def _rank_windows(windows: np.ndarray, batch: int, seq_len: int, group) -> list[int]:
    """Indices of the training windows this rank ever sees (its share of every batch)."""
    index = {window_key(windows[i]): i for i in range(len(windows))}
    data = [(list(map(int, w)), 0) for w in windows]
    mine = []
    for b, _ in iterate_batches(data, batch, seq_len + 1, loop=False, seed=0, comm_group=group):
        mine.extend(index[window_key(r)] for r in np.array(b))
    return sorted(set(mine))


# --------------------------------------------------------------------------- loss


def _with_rest(logp_k: mx.array) -> mx.array:
    """(..., k) log-probs of k tokens -> (..., k + 1): the k and the rest of the vocabulary."""
    rest = mx.log(mx.maximum(1.0 - mx.exp(logp_k).sum(axis=-1, keepdims=True), 1e-9))
    return mx.concatenate([logp_k, rest], axis=-1)


def kl_loss(model: nn.Module, x: mx.array, t_logp: mx.array, t_idx: mx.array, temperature: float) -> mx.array:
    """Mean over positions of ``KL(p_teacher || q_student)`` on the teacher's top-k tokens plus one
    bucket for the rest of the vocabulary, both at ``temperature``.

    DWQ's cached-target loss renormalises both distributions over the top-k set, which does not
    see student mass outside it: a badly quantized student can put most of its mass there and PPL
    stays broken. The rest bucket keeps that mass in the loss (and equals the full KL when the
    teacher's top-k holds all its mass). Computed with mlx-lm's ``kl_div_loss`` on the (k+1)-way
    distributions. x (B, L) int; t_logp (B, L, k) teacher log-probs; t_idx (B, L, k) int."""
    logq = nn.log_softmax(model(x).astype(mx.float32) / temperature, axis=-1)
    logq = mx.take_along_axis(logq, t_idx, axis=-1)
    return kl_div_loss(_with_rest(logq), _with_rest(t_logp)).mean()


# --------------------------------------------------------------------------- checkpoint


def _fingerprint(pack: Path, teacher_name: str, spec: E2ESpec, data_name: str, size: int) -> str:
    h = hashlib.sha256()
    h.update((pack / "config.json").read_bytes())
    h.update(json.dumps([teacher_name, spec.to_dict(), data_name, size], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _targets_fingerprint(teacher_name: str, spec: E2ESpec, data_name: str) -> str:
    """What the teacher targets of window ``i`` depend on (not lr, steps, samples or what trains:
    :func:`calibration_windows` gives window ``i`` the same tokens for any ``samples``)."""
    keys = [teacher_name, data_name, spec.seq_len, spec.seed, spec.valid_samples, spec.top_k, spec.temperature]
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


def _fresh_work(work: Path, targets_fp: str) -> None:
    """Start ``work`` over, keeping the teacher targets of an interrupted run whose targets were made
    the same way (a run stopped to change lr or steps does not pay the teacher's passes again)."""
    try:
        same = json.loads((work / TARGETS_FILE).read_text()).get("fingerprint") == targets_fp
    except (OSError, ValueError, AttributeError):
        same = False
    if work.exists() and not same:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        if f.name != TARGETS_FILE and not (f.suffix == ".safetensors" and f.name.startswith(("train-", "valid-"))):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    (work / TARGETS_FILE).write_text(json.dumps({"fingerprint": targets_fp}))


def _save_ckpt(work: Path, state: dict, params: dict, opt: optim.Adam, improved: bool) -> None:
    """Write ``params``, Adam's m and v (its step is the state's) and the best parameters so far:
    ``params`` when they have just improved, else the previous checkpoint's (read back here rather than
    held through training)."""
    old = None if improved else mx.load(str(work / CKPT_FILE))
    arrays = {f"p:{k}": v for k, v in params.items()}
    arrays.update({f"b:{k}": v if improved else old[f"b:{k}"] for k, v in params.items()})
    for k in params:
        arrays[f"m:{k}"] = opt.state[k]["m"]
        arrays[f"v:{k}"] = opt.state[k]["v"]
    tmp = work / f"tmp-{CKPT_FILE}"
    # the state goes inside the checkpoint too: one atomic write, so a run stopped between the two
    # files resumes from a matching pair (state.json is the readable copy the resume check opens)
    mx.save_safetensors(str(tmp), arrays, metadata={"state": json.dumps(state)})
    os.replace(tmp, work / CKPT_FILE)
    packio.write_json_atomic(work / STATE_FILE, state)


def _load_ckpt(work: Path, params: dict, opt: optim.Adam, group) -> tuple[dict, dict]:
    """Rank 0 reads its checkpoint (the parameters, Adam's state and the run's state); every rank gets
    them, and Adam starts from them. The other ranks' work directories may be on other machines."""
    arrays = state = None
    if group.rank() == 0:
        try:
            arrays, meta = mx.load(str(work / CKPT_FILE), return_metadata=True)
            state = json.loads(meta["state"]) if "state" in meta else json.loads((work / STATE_FILE).read_text())
        except (OSError, ValueError, RuntimeError) as e:
            state = {"error": f"the checkpoint in {work} could not be read ({type(e).__name__}); "
                              "run again without --resume to start over"}
    state = _from_rank0_json(state, group)
    if "error" in state:  # on every rank, not only the one that read it
        raise DupqError(state["error"])
    like = {f"{p}:{k}": v for k, v in params.items() for p in "pmv"}
    got = _from_rank0_arrays(arrays, like, group)
    params = {k: got[f"p:{k}"] for k in params}
    opt.init(params)
    for k in params:
        opt.state[k]["m"] = got[f"m:{k}"]
        opt.state[k]["v"] = got[f"v:{k}"]
    opt.state["step"] = mx.array(state["step"], opt.state["step"].dtype)  # one update per training step
    return state, params


def _checkpoint_best(work: Path, params: dict, group) -> dict:
    """The best parameters of rank 0's checkpoint, on every rank."""
    arrays = mx.load(str(work / CKPT_FILE)) if group.rank() == 0 else None
    got = _from_rank0_arrays(arrays, {f"b:{k}": p for k, p in params.items()}, group)
    return {k: got[f"b:{k}"] for k in params}


def _from_rank0_arrays(arrays: dict | None, like: dict[str, mx.array], group) -> dict[str, mx.array]:
    """``arrays[k]`` of rank 0 (None elsewhere) for every ``k`` of ``like`` (4-byte dtypes), on every rank,
    bit for bit: rank 0's bits summed as integers with the others' zeros."""
    out = {}
    for k, p in like.items():
        a = arrays[k] if arrays is not None else mx.zeros_like(p)
        if group.size() > 1:
            a = mx.distributed.all_sum(a.view(mx.uint32), group=group, stream=mx.cpu).view(p.dtype)
        out[k] = a
        mx.eval(a)  # one array at a time, in the same order on every rank
    return out


def _from_rank0_json(obj, group):
    """Rank 0's JSON-able ``obj`` on every rank (the others pass anything); also a barrier."""
    if group.size() == 1:
        return obj
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if group.rank() == 0 else np.zeros(0, np.uint8)
    n = int(mx.distributed.all_sum(mx.array(len(data), mx.int32), group=group, stream=mx.cpu).item())
    buf = np.zeros(n, np.int32)
    buf[: len(data)] = data
    got = mx.distributed.all_sum(mx.array(buf), group=group, stream=mx.cpu)
    return json.loads(np.array(got).astype(np.uint8).tobytes().decode())


def _prepare_work(work: Path, resume: bool, fp: str, targets_fp: str, group) -> tuple[bool, Path]:
    """Rank 0 decides from ``work`` whether the run resumes (``resume`` and a state of the same run
    there) or starts over (keeping matching teacher targets); every rank learns the decision. Returns
    it and where this rank keeps its teacher targets: ``work`` when it sees rank 0's directory, else
    (another machine) its own ``WORK.rank<r>`` prepared the same way, never another run's targets."""
    rank = group.rank()
    said = None
    if rank == 0:
        said = {"resume": False, "token": os.urandom(8).hex()}
        if resume and (work / STATE_FILE).exists():
            try:
                said["resume"] = json.loads((work / STATE_FILE).read_text()).get("fingerprint") == fp
            except (OSError, ValueError, AttributeError):
                pass
            if not said["resume"]:
                said["error"] = (f"{work} was started with another pack, teacher, data or options; "
                                 "run without --resume to start over")
        if "error" not in said:
            if not said["resume"]:
                _fresh_work(work, targets_fp)
            (work / OWNER_FILE).write_text(said["token"])
    said = _from_rank0_json(said, group)
    if "error" in said:
        raise DupqError(said["error"])
    mine = work
    if rank > 0:
        try:
            shared = (work / OWNER_FILE).read_text() == said["token"]
        except OSError:
            shared = False
        if not shared:
            mine = work.with_name(f"{work.name}.rank{rank}")
            _fresh_work(mine, targets_fp)
    return said["resume"], mine


# --------------------------------------------------------------------------- writing


def write_refined(pack: Path, out: Path, new: dict[str, mx.array], record: dict, skip: tuple[str, ...] = ()) -> None:
    """Copy ``pack`` to ``out`` with the arrays in ``new`` replaced (stored dtype kept) and
    ``record`` under ``mlx_dupq.refine.e2e`` in config.json; via ``OUT.tmp`` + rename.
    ``skip``: top-level entries of ``pack`` not copied (a work directory inside it)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(pack, tmp, ignore=lambda d, names: [n for n in names if n in skip] if Path(d) == pack else [])
    left = set(new)
    for f in sorted(tmp.glob("model*.safetensors")):
        arrays = mx.load(str(f))
        hit = [k for k in arrays if k in left]
        if not hit:
            continue
        for k in hit:
            arrays[k] = new[k].astype(arrays[k].dtype)
            left.discard(k)
        part = f.with_name("tmp-" + f.name)
        mx.save_safetensors(str(part), arrays, metadata={"format": "mlx"})
        os.replace(part, f)
    if left:
        shutil.rmtree(tmp)
        raise DupqError(f"trained array {sorted(left)[0]} has no stored tensor in {pack}; the pack is damaged")
    config = packio.read_config(tmp)
    config["mlx_dupq"].setdefault("refine", {})["e2e"] = record
    packio.write_json_atomic(tmp / "config.json", config)
    old_manifest = read_manifest(tmp)
    write_manifest(tmp, old_manifest.get("recipe") if old_manifest else config["mlx_dupq"].get("recipe"))
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# --------------------------------------------------------------------------- the stage


def _text_ids(tokenizer, data) -> tuple[np.ndarray, str]:
    if isinstance(data, np.ndarray):
        return data.astype(np.int32).reshape(-1), f"tokens[{data.size}]"
    name = str(data)
    if ":eval" in name.lower():
        raise DupqError(f"{name} is an evaluation split; distill on calibration text (e.g. mix:calib)")
    return tokenize(tokenizer, load_text(name)), name


def distill_pack(pack_dir: str | Path, teacher: str | Path | Source | nn.Module, spec: E2ESpec, data=None,
                 progress: Progress | None = None, out: str | Path | None = None, resume: bool = False,
                 teacher_name: str | None = None, work: str | Path | None = None) -> E2EResult:
    """Distill the pack at ``pack_dir`` against ``teacher`` (the float model: a name, path or opened
    :class:`Source`, streamed one layer at a time, or a loaded model); write the refined pack to
    ``out`` (default: in place). See the module doc.

    data: a text name or file (default ``spec.data``) or a 1-D array of token ids.
    progress(phase, done, total, info): phases ``targets`` (per decoder layer of a streamed teacher; info:
    windows, unit), ``train`` (info: loss), ``valid`` (info: kl).
    work: the work directory (default ``OUT.e2e-work``; convert puts it inside its partial pack).
    """
    t0 = time.perf_counter()
    pack = Path(pack_dir).expanduser()
    if not (pack / "config.json").is_file():
        raise DupqError(f"{pack} is not a model directory (no config.json); refine trains an mlx-dupq pack")
    if not packio.is_pack(pack):
        raise DupqError(f"{pack} is not an mlx-dupq pack (a float or mlx-lm model?); convert it first: "
                        "mlx-dupq convert MODEL -o PACK")
    if spec.chat_data != "self" and not Path(spec.chat_data).expanduser().is_file():
        raise DupqError(f"chat data {spec.chat_data} is not a file; pass 'self' (the teacher's own answers) or a "
                        ".jsonl file with one {\"messages\": [...]} per line")
    out = pack if out is None else Path(out).expanduser()
    if out != pack and out.exists() and not packio.is_pack(out):
        raise DupqError(f"{out} exists and is not a pack; choose another output path")
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    if spec.batch % size:
        raise DupqError(f"the batch ({spec.batch}) must be a multiple of the number of processes ({size})")

    # lazy: the student's bytes are read once the teacher is gone (its targets phase is the stage's peak)
    student, tokenizer = load(pack, lazy=True)
    mark_trainable(student, spec.trainable)
    if isinstance(teacher, nn.Module):
        float_teacher, t_name = teacher, teacher_name or "model"
        float_teacher.eval()
    elif isinstance(teacher, Source):
        float_teacher, t_name = teacher, teacher_name or teacher.name
    elif packio.is_quantized_dir(str(teacher)):  # a pack or an mlx-lm quantized model as the teacher: small, loaded whole
        float_teacher, t_name = load_model(teacher)[0], teacher_name or str(teacher)
        float_teacher.eval()
    else:
        float_teacher, t_name = open_source(teacher), teacher_name or str(teacher)
    ids, data_name = _text_ids(tokenizer, spec.data if data is None else data)
    train_w, valid_w = calibration_windows(ids, spec)
    run_data = data_name
    if spec.chat_samples and getattr(tokenizer, "chat_template", None):
        chat_t, chat_v, chat_name = chat_windows(float_teacher, tokenizer, spec, progress, group)
        train_w, valid_w = np.concatenate([train_w, chat_t]), np.concatenate([valid_w, chat_v])
        run_data = f"{data_name}+{chat_name}"
    elif spec.chat_samples:  # a base model (convert --bpw asks for chat windows by default): text only
        run_data = f"{data_name} (no chat template: the {spec.chat_samples} chat windows skipped)"

    work = out.with_name(out.name + ".e2e-work") if work is None else Path(work)
    fp = _fingerprint(pack, t_name, spec, run_data, size)
    # (the targets are named by their windows' tokens: the chat windows need no part in this fingerprint)
    resuming, mine_work = _prepare_work(work, resume, fp, _targets_fingerprint(t_name, spec, data_name), group)
    k = spec.top_k
    keep = (len(train_w) + len(valid_w)) * spec.seq_len * k * 6 <= MEMORY_TARGETS_BYTES
    train_t, valid_t = Targets(mine_work, "train", keep), Targets(mine_work, "valid", keep)
    mine_valid = [i for i in range(len(valid_w)) if i % size == rank]
    chunk = max(1, spec.batch // size)
    t = spec.temperature
    mine_train = _rank_windows(train_w, spec.batch, spec.seq_len, group)
    # (validation targets at temperature 1: the real distribution)
    parts = [(train_t, train_w, mine_train, t), (valid_t, valid_w, mine_valid, 1.0)]
    build_targets(float_teacher, parts, k, chunk, progress)
    # from here on only the cached targets are used: drop a loaded float model (freed unless the caller
    # keeps a reference) and give the teacher pass's buffers back
    del teacher, float_teacher
    release_memory()
    mx.eval(student.parameters())

    flat = dict(tree_flatten(student.trainable_parameters()))
    unit = _units(student, flat) if spec.relative else {}

    def absolute(params: dict) -> dict:
        return {n: v * unit[n] if n in unit else v for n, v in params.items()}

    def loss_fn(params, x, tl, ti, temperature=t):
        student.update(tree_unflatten(list(absolute(params).items())))
        return kl_loss(student, x, tl, ti, temperature)

    grad_fn = mx.value_and_grad(loss_fn)

    def validate(params) -> float:
        total = mx.array(0.0)
        for j in range(0, len(mine_valid), chunk):
            rows = valid_w[mine_valid[j : j + chunk]]
            tl, ti = valid_t.get(rows)
            total = total + loss_fn(params, mx.array(rows[:, :-1]), tl, ti, 1.0) * len(rows)
            mx.eval(total)
        if size > 1:
            total = mx.distributed.all_sum(total, stream=mx.cpu)
        return float(total.item()) / len(valid_w)

    stored = _stored_dtypes(pack)
    # what Adam moves; the loaded arrays are not kept (the student's own are replaced at its first pass,
    # and a pack kept as it was is written unchanged)
    params = {n: v.astype(mx.float32) / unit[n] if n in unit else v.astype(mx.float32) for n, v in flat.items()}
    lr = spec.lr * median_scale(flat) if spec.lr_per_scale else spec.lr
    mx.eval(params, unit)
    del flat
    opt = optim.Adam(learning_rate=optim.cosine_decay(lr, max(spec.steps, 1)) if spec.schedule == "cosine" else lr,
                     bias_correction=True)
    opt.init(params)
    saved_call = None
    if spec.grad_checkpoint and hasattr(student, "layers") and len(student.layers):
        saved_call = type(student.layers[0]).__call__
        grad_checkpoint(student.layers[0])
    restore_codes = unpack_codes(student)  # the dense matmuls rebuild weights from unpacked codes (same values)
    try:
        if resuming:
            state, params = _load_ckpt(work, params, opt, group)
        else:
            v0 = validate(params)
            state = {"fingerprint": fp, "step": 0, "valid_before": v0, "best": v0, "best_step": 0, "bad": 0,
                     "history": [{"step": 0, "valid_kl": v0}], "stopped": False}
            if rank == 0:
                _save_ckpt(work, state, params, opt, improved=True)
        if progress:
            progress("valid", state["step"], spec.steps, {"kl": state["history"][-1]["valid_kl"]})
        data = [(list(map(int, w)), 0) for w in train_w]
        batches = iterate_batches(data, spec.batch, spec.seq_len + 1, loop=True, seed=spec.seed, comm_group=group)
        for _ in range(state["step"]):
            next(batches)
        step = state["step"]
        while step < spec.steps and not state["stopped"]:
            b, _ = next(batches)
            rows = np.array(b)
            tl, ti = train_t.get(rows)
            loss, grads = grad_fn(params, mx.array(rows[:, :-1]), tl, ti)
            grads = dict(tree_flatten(nn.average_gradients(grads)))  # (it returns a nested tree)
            params = opt.apply_gradients(grads, params)
            mx.eval(loss, params, opt.state)
            del grads  # not held through validation and the checkpoint
            if size > 1:
                loss = mx.distributed.all_sum(loss, stream=mx.cpu) / size
            step += 1
            if progress:
                progress("train", step, spec.steps, {"loss": float(loss.item())})
            if step % spec.eval_every == 0 or step == spec.steps:
                v = validate(params)
                state["history"].append({"step": step, "valid_kl": v})
                improved = v < state["best"]
                if improved:
                    state.update(best=v, best_step=step, bad=0)
                else:
                    state["bad"] += 1
                    if spec.patience and state["bad"] >= spec.patience:
                        state["stopped"] = True
                state["step"] = step
                if rank == 0:
                    _save_ckpt(work, state, params, opt, improved)
                if progress:
                    progress("valid", step, spec.steps, {"kl": v})
        # the kept parameters: the best, rounded to the stored dtype, and only if better than the start
        # (else the pack is written unchanged: the start is not needed again)
        del opt  # Adam's m and v
        kept, v_after, final = "initial", state["valid_before"], {}
        if state["best_step"] > 0:
            best = params if state["best_step"] == state["step"] else _checkpoint_best(work, params, group)
            rounded = {n: v.astype(stored.get(n, mx.float32)).astype(mx.float32) for n, v in absolute(best).items()}
            v = validate({n: v / unit[n] if n in unit else v for n, v in rounded.items()})
            if v < state["valid_before"]:
                kept, v_after, final = "trained", v, rounded
    finally:
        restore_codes()
        if saved_call is not None:
            type(student.layers[0]).__call__ = saved_call
    result = E2EResult(out=out, valid_kl_before=state["valid_before"], valid_kl_after=v_after,
                       steps_run=state["step"], best_step=state["best_step"] if kept == "trained" else 0,
                       kept=kept, n_trainable=sum(int(v.size) for v in params.values()),
                       train_tokens=len(train_w) * spec.seq_len, valid_tokens=len(valid_w) * spec.seq_len,
                       seconds=time.perf_counter() - t0, history=state["history"], lr=lr)
    if rank == 0:
        record = {"options": spec.to_dict(), "teacher": t_name, "data": run_data, "processes": size,
                  **{k: v for k, v in result.to_dict().items() if k != "seconds"}}
        inside = (work.name,) if work.parent == pack else ()
        write_refined(pack, out, final, record, skip=inside)
        shutil.rmtree(work, ignore_errors=True)
    elif mine_work != work:
        shutil.rmtree(mine_work, ignore_errors=True)
    if size > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))  # the others wait for rank 0's pack
    return result


def median_scale(trainable: dict[str, mx.array]) -> float:
    """The median ``|scale|`` over every trained ``scales`` entry (the unit of ``lr_per_scale``)."""
    vals = [np.abs(np.asarray(v.astype(mx.float32))).ravel() for n, v in trainable.items() if n.endswith(".scales")]
    if not vals:
        raise DupqError("lr_per_scale needs trained scales; add scales to trainable or drop lr_per_scale")
    return float(np.median(np.concatenate(vals)))


def _units(model: nn.Module, trainable: dict[str, mx.array]) -> dict[str, mx.array]:
    """``{name: unit}`` of the relative parametrisation: a quantized layer's ``scales`` and
    ``biases`` train in units of the group's initial ``|scale|`` (Adam's step is then a fraction of
    a quantization step whatever the layer's magnitude: SmolLM2's folded scales span 30x); norms
    train in absolute units (they start near 1). A layer's scales and biases share one unit array."""
    allp = dict(tree_flatten(model.parameters()))
    out, of_scales = {}, {}
    for n in trainable:
        if n.endswith((".scales", ".biases")):
            key = n[: -len("scales")] + "scales"
            s = allp.get(key)
            if s is not None and s.shape == trainable[n].shape:
                if key not in of_scales:
                    of_scales[key] = mx.maximum(mx.abs(s.astype(mx.float32)), 1e-8)
                out[n] = of_scales[key]
    return out


def _stored_dtypes(pack: Path) -> dict[str, mx.Dtype]:
    """``{tensor name: stored dtype}`` of a pack (the dtype trained arrays are rounded to)."""
    out = {}
    for f in sorted(pack.glob("model*.safetensors")):
        out.update({k: v.dtype for k, v in mx.load(str(f)).items()})
    return out
