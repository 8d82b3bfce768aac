"""Stop strings across a switch of instance (a migration's, a replay's), with vLLM's own
detokenizer and the tiny model's tokenizer (no engine is started).

The new instance checks stop strings only in the text it writes itself, which starts at the
switch: a stop string split by the switch would be missed there. The stream's own detokenizer
has seen every token, so it finds the stop string where an undisturbed engine would, and the
client gets the same text, tokens and finish as without the switch."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config, write_model

from llumnix_backend.migration import RequestStream
from llumnix_backend.repository import load_model_source
from llumnix_backend.requests import GenerationDelta, GenerationRequest

PROMPT = (1, 2, 3)
STOP = "brown fox"


@pytest.fixture(scope="module")
def runtime(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from llumnix_vllm.backend import VllmBackend

    folder = write_model(tmp_path_factory.mktemp("stop-strings"), "tiny", tiny_config(str(tiny_model)))
    return VllmBackend().load_model("tiny", load_model_source(folder))


@pytest.fixture(scope="module")
def tokens(runtime) -> list[int]:
    ids = runtime.encode("the quick brown fox jumps over the lazy dog", add_special_tokens=False)
    assert STOP in runtime.decode(ids)
    return ids


def engine_deltas(runtime, context: tuple[int, ...], token_ids: list[int], sampling: dict) -> list[GenerationDelta]:
    """What an engine streams, one token per step, for a request whose prompt is `context`:
    its own text, and its stop at a stop string inside that text."""
    detokenize = runtime.new_detokenizer(context, sampling)
    deltas = []
    for token in token_ids:
        written = detokenize(GenerationDelta((token,), ""))
        if written.stop is not None:
            deltas.append(GenerationDelta((token,)[:written.kept], written.text, "stop", written.stop))
            break
        deltas.append(GenerationDelta((token,), written.text))
    return deltas


def client_view(deltas: list[GenerationDelta]) -> tuple[str, list[int], str | None, str | int | None]:
    return ("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
            deltas[-1].finish_reason, deltas[-1].stop_reason)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_split_by_the_switch_ends_the_stream_as_without_it(runtime, tokens, include) -> None:
    sampling = {"stop": [STOP], "include_stop_str_in_output": include}
    undisturbed = client_view(engine_deltas(runtime, PROMPT, tokens, sampling))
    assert undisturbed[2:] == ("stop", STOP)
    ends = [len(runtime.decode(tokens[:n])) for n in range(len(tokens) + 1)]
    start = runtime.decode(tokens).index(STOP)
    split = [n for n in range(1, len(tokens)) if start < ends[n] < start + len(STOP)]
    assert split, "no switch point falls inside the stop string"
    for switch_at in split:
        before, after = tokens[:switch_at], tokens[switch_at:]
        # The new instance alone does not see the stop string: it starts inside it.
        alone = engine_deltas(runtime, PROMPT + tuple(before), after, sampling)
        assert alone[-1].finish_reason is None
        stream = RequestStream(GenerationRequest("r", PROMPT, sampling),
                               "a", new_detokenizer=lambda: runtime.new_detokenizer(PROMPT, sampling))
        delivered = [stream.deliver(d) for d in engine_deltas(runtime, PROMPT, before, sampling)]
        stream.switched()
        for delta in alone:
            delivered.append(stream.deliver(delta))
            if delivered[-1].finished:
                break
        assert client_view(delivered) == undisturbed, switch_at
        assert stream.generated == undisturbed[1]
