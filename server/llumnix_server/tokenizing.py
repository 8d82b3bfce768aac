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

T = TypeVar("T")

_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llumnix-tokenizer")


async def tokenize(work: Callable[..., T], *args) -> T:
    """`work(*args)` (a runtime's `encode` or `render_chat`) on the tokenizer thread."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, work, *args)
