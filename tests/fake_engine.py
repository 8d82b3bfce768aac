"""A scripted stand-in for an engine, for the tests of `ServedModel`, the layer between the pure
planner and real engines: it carries plans out (starts, restarts, retirements, replays) the
same way whatever the engine. It is not vLLM, and no test that claims vLLM uses it.

Each engine emits one token per step of `step_s`, the token a function of its position in the
sequence only, so a request continued elsewhere (a replay: prompt plus the tokens so far)
gets the same tokens an undisturbed run would. A test kills (`die`) or stops (`hang`) an engine,
or makes the next starts fail (`FakeRuntime.failing_starts`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from llumnix_backend.plugin import (
    DetokenizedText,
    EngineDead,
    EngineInstance,
    EngineStartFailed,
    KvExport,
    ModelRuntime,
    NotExported,
)
from llumnix_backend.policies.placement import GpuPlacement
from llumnix_backend.requests import GenerationDelta, GenerationRequest
from llumnix_backend.snapshot import InstanceSnapshot, RequestLoad, blocks_for

BLOCK_SIZE = 16


def token_at(position: int) -> int:
    return position % 97 + 3


def text_of(token_ids: Sequence[int]) -> str:
    return "".join(f"<{t}>" for t in token_ids)


class FakeEngine(EngineInstance):
    def __init__(self, instance_id: str, runtime: FakeRuntime) -> None:
        self.instance_id = instance_id
        self._runtime = runtime
        self._started = False
        self._lost: str | None = None  # why its streams end with EngineDead
        self._failure: str | None = None  # set when the "process" died
        self._frozen_at: float | None = None  # stopped (SIGSTOP-like): reports nothing from then
        self._running_freely = asyncio.Event()
        self._running_freely.set()
        self._requests: dict[str, list[int]] = {}  # request id -> [priority, tokens so far]
        self._aborted: set[str] = set()
        self._sequence = 0
        self._snapshot: InstanceSnapshot | None = None
        self.shut_down = False

    # --- what a test does to it --------------------------------------------------------------

    def die(self, why: str = "the engine process was killed by SIGKILL") -> None:
        self._failure = self._lost = why
        self._running_freely.set()

    def hang(self) -> None:
        self._frozen_at = time.monotonic()
        self._running_freely.clear()

    @property
    def request_ids(self) -> set[str]:
        return set(self._requests)

    # --- the engine --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.sleep(self._runtime.start_s)
        if self._runtime.failing_starts > 0:
            self._runtime.failing_starts -= 1
            raise EngineStartFailed("the fake engine was told to fail its start")
        self._started = True
        self._refresh()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self._lost is not None:
            raise EngineDead(self._lost)
        rid = request.request_id
        position = len(request.prompt_token_ids)
        left = request.max_tokens
        self._requests[rid] = [request.priority, position]
        self._refresh()
        try:
            while True:
                await asyncio.sleep(self._runtime.step_s)
                await self._running_freely.wait()
                if self._lost is not None:
                    raise EngineDead(self._lost)
                if rid in self._aborted:
                    yield GenerationDelta((), "", finish_reason="abort")
                    return
                token = token_at(position)
                position += 1
                left = None if left is None else left - 1
                self._requests[rid][1] = position
                self._sequence += 1
                self._refresh()
                yield GenerationDelta((token,), text_of([token]), finish_reason="length" if left == 0 else None)
                if left == 0:
                    return
        finally:
            self._requests.pop(rid, None)
            self._aborted.discard(rid)
            self._refresh()

    def _refresh(self) -> None:
        running = tuple(RequestLoad(rid, priority, tokens, blocks_for(tokens, BLOCK_SIZE), decoding=True)
                        for rid, (priority, tokens) in self._requests.items())
        self._snapshot = InstanceSnapshot(1000, sum(r.num_blocks for r in running), BLOCK_SIZE, running=running,
                                          sequence=self._sequence, timestamp=time.monotonic())

    async def abort(self, request_id: str) -> None:
        if request_id in self._requests:
            self._aborted.add(request_id)

    async def export_kv(self, request_id: str, transfer: Any, first_block: int,
                        max_blocks: int | None = None) -> KvExport | NotExported:
        return NotExported("the fake engine does not migrate")

    async def stop_and_export_kv(self, request_id: str, transfer: Any, first_block: int) -> KvExport | NotExported:
        return NotExported("the fake engine does not migrate")

    async def resume_request(self, request_id: str) -> None:
        pass

    @property
    def latest_snapshot(self) -> InstanceSnapshot | None:
        return self._snapshot if self._started else None

    @property
    def alive(self) -> bool:
        return self._started and self._lost is None

    @property
    def last_report_at(self) -> float | None:
        if not self._started:
            return None
        return self._frozen_at if self._frozen_at is not None else time.monotonic()

    @property
    def failure(self) -> str | None:
        return self._failure

    def abandon(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        self._running_freely.set()

    async def shutdown(self) -> None:
        self.abandon("the engine was shut down")
        self.shut_down = True


class FakeRuntime(ModelRuntime):
    def __init__(self, step_s: float = 0.005, start_s: float = 0.01) -> None:
        self.step_s, self.start_s = step_s, start_s
        self.failing_starts = 0  # the next this many starts fail
        self.engines: dict[str, FakeEngine] = {}  # the newest engine of each instance id

    @property
    def max_model_len(self) -> int:
        return 4096

    @property
    def vocab_size(self) -> int:
        return 100

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [token_at(ord(c)) for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return text_of(token_ids)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [text_of([t]) for t in token_ids]

    def render_chat(self, messages: list[dict[str, Any]], add_special_tokens: bool = False,
                    chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    def new_detokenizer(self, prompt_token_ids: Sequence[int], sampling: Mapping[str, Any]):
        return lambda delta: DetokenizedText(text_of(delta.token_ids), len(delta.token_ids))

    def check_sampling(self, sampling: Mapping[str, Any]) -> None:
        pass

    def create_instance(self, instance_id: str, placement: GpuPlacement = GpuPlacement()) -> FakeEngine:
        engine = self.engines[instance_id] = FakeEngine(instance_id, self)
        return engine

    def create_transfer(self, capacity_blocks, block_bytes, transport, source, destination):
        raise NotImplementedError("the fake engine does not migrate")
