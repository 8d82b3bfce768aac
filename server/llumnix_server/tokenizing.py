"""Tokenising off the event loop, one prompt at a time.

Tokenising a long prompt takes CPU for a while and holds the GIL for part of it. On one thread
of its own it never takes more than that thread's share from the event loop (other streams,
health checks), and heavy requests queue behind each other instead of in front of everyone
else; vLLM's API server tokenises on a single thread too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from llumnix_backend.requests import RequestError
from llumnix_backend.served_model import ServedModel

T = TypeVar("T")

_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llumnix-tokenizer")


async def tokenize(work: Callable[..., T], *args) -> T:
    """`work(*args)` (a runtime's `encode` or `render_chat`) on the tokenizer thread."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, work, *args)


async def tokenize_prompts(model: ServedModel, prompt: str | list[int] | list[str] | list[list[int]],
                           add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt of a completion (or embeddings input): text, token ids, or a
    list of either, each checked against the model as it comes."""
    if isinstance(prompt, str):
        return [await tokenize(model.runtime.encode, prompt, add_special_tokens)]
    if not prompt:
        raise RequestError("the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    most = model.config.frontend.limits.max_prompts  # (each prompt is its own engine request)
    if len(prompt) > most:
        raise RequestError(f"{len(prompt)} prompts in one request; at most {most} are allowed "
                           "(frontend.limits.max_prompts)", "prompt")
    prompts = []
    for p in prompt:
        prompts.append(await tokenize(model.runtime.encode, p, add_special_tokens)
                       if isinstance(p, str) else list(p))  # type: ignore[union-attr]
        model.check_prompt(prompts[-1])  # a bad one ends the work on the rest
    return prompts
