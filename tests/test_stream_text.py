"""A stream's text across a switch of instance (`RequestStream`): with byte-level tokens, a
character split over the switch reaches the client whole, whatever the new instance's
detokenizer makes of it. Each token here is one byte of UTF-8; the detokenizers are a model
of vLLM's (prefix and read offsets)."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.migration import RequestStream
from llumnix_backend.plugin import DetokenizedText
from llumnix_backend.requests import GenerationDelta, GenerationRequest


def decode(token_ids) -> str:
    return bytes(token_ids).decode("utf-8", errors="replace")


def engine_texts(context: list[int], token_ids: list[int]) -> list[str]:
    """What an engine's incremental detokenizer (prefix and read offsets, as vLLM's) writes per
    token of a request whose prompt is `context`: nothing while a character is incomplete. Its
    text starts after the prompt, so a character the prompt ends inside of is lost."""
    ids, texts = list(context), []
    prefix_offset, read_offset = max(0, len(ids) - 5), len(ids)
    for token in token_ids:
        ids.append(token)
        prefix_text, new_text = decode(ids[prefix_offset:read_offset]), decode(ids[prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            texts.append(new_text[len(prefix_text):])
            prefix_offset, read_offset = read_offset, len(ids)
        else:
            texts.append("")
    return texts


def new_detokenizer():
    """The stream's own detokenizer: one that has seen every token from the start."""
    seen: list[int] = []

    def text_of(delta: GenerationDelta) -> DetokenizedText:
        texts = engine_texts([], [*seen, *delta.token_ids])[len(seen):]
        seen.extend(delta.token_ids)
        return DetokenizedText("".join(texts), len(delta.token_ids))

    return text_of


def run(text: str, switch_at: int, switches: int = 1, prepare_at: int | None = None) -> str:
    """The client's text when the stream switches instance after `switch_at` tokens (and, with
    `switches` > 1, again every few tokens): each new engine continues a request whose prompt
    holds every token so far, so its own text is garbled at the switch. With `prepare_at`, the
    stream's own detokenizer is made after that many tokens (as a migration begins) and kept
    up to date until the switch."""
    tokens = list(text.encode())
    stream = RequestStream(GenerationRequest("r", (0,)), "a", new_detokenizer=new_detokenizer)
    before, rest = tokens[:switch_at], tokens[switch_at:]
    delivered = []
    for i, (token, engine_text) in enumerate(zip(before, engine_texts([], before))):
        if i == prepare_at:
            asyncio.run(stream.prepare_switch())
        delivered.append(stream.deliver(GenerationDelta((token,), engine_text)).text)
    if prepare_at == switch_at:
        asyncio.run(stream.prepare_switch())
    stream.switched()
    context = list(before)
    for i, token in enumerate(rest):
        if switches > 1 and i and i % 3 == 0:
            stream.switched()
            context = tokens[:switch_at + i]
        engine_text = engine_texts(context, tokens[len(context):switch_at + i + 1])[-1]
        finished = "length" if i == len(rest) - 1 else None
        delivered.append(stream.deliver(GenerationDelta((token,), engine_text, finish_reason=finished)).text)
    return "".join(delivered)


def test_the_engine_alone_loses_a_character_split_by_the_switch() -> None:
    text = "café au lait"  # é is 2 bytes; switch between them
    before, rest = list(text.encode()[:4]), list(text.encode()[4:])
    assert "".join(engine_texts([], before) + engine_texts(before, rest)) != text


def test_a_character_split_by_the_switch_arrives_whole() -> None:
    text = "naïve café — 東京"
    for switch_at in range(1, len(text.encode())):
        assert run(text, switch_at) == text
        assert run(text, switch_at, prepare_at=switch_at // 2) == text  # made as a migration began


@given(st.text(min_size=2, max_size=40), st.data())
def test_the_client_text_is_the_undisturbed_text(text: str, data) -> None:
    switch_at = data.draw(st.integers(1, len(text.encode()) - 1))
    assert run(text, switch_at) == text
    assert run(text, switch_at, switches=5) == text
    assert run(text, switch_at, prepare_at=data.draw(st.integers(0, switch_at))) == text


def test_without_a_detokenizer_the_engine_text_passes_through() -> None:
    stream = RequestStream(GenerationRequest("r", (0,)), "a")
    stream.switched()
    assert stream.deliver(GenerationDelta((0xA9,), "?")).text == "?"


def test_a_detokenizer_that_cannot_be_made_leaves_the_engine_text() -> None:
    def broken():
        raise RuntimeError("no tokenizer here")

    for prepared in (False, True):  # (at the switch, or as a migration began)
        stream = RequestStream(GenerationRequest("r", (0,)), "a", new_detokenizer=broken)
        if prepared:
            asyncio.run(stream.prepare_switch())
        stream.deliver(GenerationDelta((104,), "h"))
        stream.switched()
        assert stream.deliver(GenerationDelta((105,), "i")).text == "i"
