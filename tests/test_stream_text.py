"""A stream's text across a switch of instance (`RequestStream`): with byte-level tokens, a
character split over the switch reaches the client whole, whatever the new instance's
detokenizer makes of it. Each token here is one byte of UTF-8."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llumnix_backend.migration import RequestStream
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


def run(text: str, switch_at: int) -> str:
    """The client's text when the stream switches instance after `switch_at` tokens: the new
    engine continues a request whose prompt holds every token so far."""
    tokens = list(text.encode())
    stream = RequestStream(GenerationRequest("r", (0,)), "a", decode=decode)
    before, rest = tokens[:switch_at], tokens[switch_at:]
    delivered = [stream.deliver(GenerationDelta((t,), s)).text for t, s in zip(before, engine_texts([], before))]
    stream.switched()
    for i, (token, engine_text) in enumerate(zip(rest, engine_texts(before, rest))):
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


@given(st.text(min_size=2, max_size=40), st.data())
def test_the_client_text_is_the_undisturbed_text(text: str, data) -> None:
    switch_at = data.draw(st.integers(1, len(text.encode()) - 1))
    assert run(text, switch_at) == text


def test_without_a_decoder_the_engine_text_passes_through() -> None:
    stream = RequestStream(GenerationRequest("r", (0,)), "a")
    stream.switched()
    assert stream.deliver(GenerationDelta((0xA9,), "?")).text == "?"
