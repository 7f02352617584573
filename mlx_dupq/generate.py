"""Text generation through mlx-lm's ``stream_generate`` (KV cache, sampling) on any MODEL."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
from .io.loader import load


def build_prompt(tokenizer, prompt: str, chat: bool = True) -> str | list[int]:
    """The prompt with the chat template applied when asked for and available."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
    return prompt


def stream_model(model, tokenizer, prompt: str, max_tokens: int = 100, temp: float = 0.0, seed: int = 0,
                 chat: bool = True) -> Iterator[str]:
    """Yield text pieces of a completion from an already loaded model."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    text = build_prompt(tokenizer, prompt, chat)
    for resp in stream_generate(model, tokenizer, text, max_tokens=max_tokens, sampler=make_sampler(temp=temp)):
        yield resp.text


def stream(model: str, prompt: str, max_tokens: int = 100, temp: float = 0.0, seed: int = 0, chat: bool = True,
           compute_dtype: str = "float32") -> Iterator[str]:
    """Load MODEL (pack, directory, .gguf, name) and yield text pieces of a completion."""
    m, tok = load(model, compute_dtype=compute_dtype)
    yield from stream_model(m, tok, prompt, max_tokens=max_tokens, temp=temp, seed=seed, chat=chat)
