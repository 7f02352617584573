"""Evaluation of packs and float models: text corpora (:mod:`.data`, also the calibration input),
perplexity (:mod:`.ppl`), generation agreement (:mod:`.agree`), tasks (:mod:`.tasks`, lm-eval in
:mod:`.lmeval`), speed (:mod:`.speed`) and memory (:mod:`.memory`). See docs/quality.md."""
