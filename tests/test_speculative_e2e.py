"""Speculative decoding on real vLLM CPU instances (vLLM's ngram drafter, two instances): a
greedy stream migrated while it speculates is token-identical to an unmigrated one, its KV
crosses (one token recomputed), and both instances' draft counters count.

Migration copies the KV, so the stream goes on exactly. A replay (after an engine dies)
recomputes the whole context in batch shapes other than those that first computed it, and
under speculation that changes the numerics enough for a greedy stream to take another token
at a near-tie (with the recovery tests' model speculating, 2 of their 3 runs here differed
from the undisturbed run, one at token 1,462 of 1,500): a replayed speculating request goes on
validly but not necessarily identically, so the recovery tests run without speculation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ready_server, tiny_config, write_model
from llumnix_client import StreamedCompletion, migrate, other, running_on

from llumnix_server.launcher import ServerProcess

pytestmark = pytest.mark.engine

MODEL = "speculating"
# Long, since speculation decodes several tokens a step: the migration must commit before the
# request ends, also on a loaded machine.
TOKENS = 3500


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("speculating")
    config = tiny_config(str(tiny_model), instances=2, max_model_len=4096)
    config["engine"]["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 3,
                                              "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    config["scheduler"]["migration"] = {"rescheduling": False}  # only the test migrates
    write_model(repository, MODEL, config)
    with ready_server(repository, "speculating-server.log", [MODEL, MODEL]) as server:
        yield server


def drafts_by_instance(server: ServerProcess) -> dict[str, float]:
    pattern = re.compile(rf'^vllm:spec_decode_num_drafts_total\{{engine="(\w+)",model_name="{MODEL}"\}} (\S+)$')
    return {m[1]: float(m[2]) for line in httpx.get(f"{server.url}/metrics").text.splitlines()
            if (m := pattern.match(line))}


def test_a_speculating_stream_migrates_token_identically(server: ServerProcess) -> None:
    baseline = StreamedCompletion(server, MODEL, max_tokens=TOKENS).result()
    drafted_before = drafts_by_instance(server)
    run = StreamedCompletion(server, MODEL, max_tokens=TOKENS).wait_for_tokens(20)
    source = running_on(server, run.request_id, MODEL)
    response = migrate(server, run.request_id, other(source), MODEL)
    assert response.status_code == 200, response.text
    report = response.json()
    run.result()
    assert report["committed"], report["reason"]
    assert report["recomputed_tokens"] == 1, report
    assert run.token_ids == baseline.token_ids
    assert "".join(run.text) == "".join(baseline.text)
    drafted = drafts_by_instance(server)
    for instance in (source, other(source)):  # it speculated on both sides of the switch
        assert drafted.get(instance, 0) > drafted_before.get(instance, 0), (drafted_before, drafted)
