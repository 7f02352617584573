"""Packs for other runtimes: :mod:`.gguf` (llama.cpp), with :mod:`.blocks` (exact GGUF blocks),
:mod:`.ggml` (llama.cpp's k-quant quantizers) and :mod:`.verify` (running a GGUF with llama.cpp)."""
