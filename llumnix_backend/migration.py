"""Live migration of a running request between two instances of a model (Llumnix, OSDI '24).

While the request keeps decoding on the source, its full KV blocks are handed to the
destination stage by stage (the destination keeps them in its prefix cache); once few are
left, the source stops the request and copies the rest in one go between two engine steps,
and the destination admits the request with every token it has so far, computing only the
last one. Stopped, the request keeps its blocks on the source (and the source's share of a
GPU goes to the destination); the client's stream switches to the destination when that
produces its first token. A failure before that point resumes the request on the source.
After the switch the destination owns the request and the source aborts it.

`migrate_request` drives the stages; `relay` is the request's own side: it delivers the
stream and makes the switch, so no token is lost, repeated or reordered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from llumnix_backend.config import MigrationSettings
from llumnix_backend.errors import Refusal, Refused
from llumnix_backend.plugin import Detokenizer, EngineInstance, KvExport, ModelRuntime, NotExported
from llumnix_backend.requests import GenerationDelta, GenerationRequest
from llumnix_backend.snapshot import InstanceSnapshot, InstanceView, blocks_for

logger = logging.getLogger(__name__)


class MigrationRejected(Refused):
    """The migration (or drain, or resume) cannot start; nothing was moved."""


class MigrationAborted(Exception):
    """The migration stopped before the switch; the request goes on on its source."""


@dataclass
class MigrationReport:
    request_id: str
    source: str
    destination: str
    route: str = ""  # the path the KV blocks took (`KvTransfer.route`)
    committed: bool = False
    reason: str = ""  # why it was aborted
    stages: int = 0  # copies made while the request kept running (the final one not counted)
    copies: int = 0  # source engine steps spent copying (stages go a chunk per step), final included
    blocks: int = 0  # KV blocks copied, all stages
    bytes: int = 0
    recomputed_tokens: int | None = None  # tokens the destination computed again on admission
    switched_at_token: int | None = None  # generated tokens before the destination's first one
    downtime_s: float | None = None  # the stream's pause at the switch, as the client sees it
    final_copy_s: float | None = None  # of the downtime: the last copy, on the source
    duration_s: float = 0.0


# How a switch ended, as the request's relay saw it.
COMMITTED = "committed"
SOURCE_FINISHED = "the request finished on the source"
SOURCE_AHEAD = "the source's output ran past the copied state"
CLIENT_GONE = "the client went away"


def _future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


def _abort_handover(handover: Handover, why: MigrationAborted) -> None:
    """Tell the relay the destination will not take over (unless it knows already). The relay
    may have concluded meanwhile (the request finished) and never read it: mark it read."""
    if not handover.destination_ready.done():
        handover.destination_ready.set_exception(why)
        handover.destination_ready.exception()


@dataclass
class Handover:
    """A migration of one request's stream to a destination, from its first stage to the switch.

    The relay resolves `watched` once it reads the source in a way that also notices the
    destination (only then may the source stop the request). The migration sets
    `generated_at_copy` after the final copy and resolves `destination_ready` with the
    destination's first delta and its stream (or an exception); the relay decides and
    resolves `outcome`.
    """

    destination_id: str
    generated_at_copy: int | None = None  # generated tokens the final copy covers
    watched: asyncio.Future = field(default_factory=_future)
    destination_ready: asyncio.Future = field(default_factory=_future)
    outcome: asyncio.Future = field(default_factory=_future)
    held: list[GenerationDelta] = field(default_factory=list)  # source output past the copy
    downtime_s: float | None = None
    recomputed_tokens: int | None = None

    def conclude(self, outcome: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    def copied_past(self, generated: int) -> bool:
        """Whether the final copy covers the first `generated` generated tokens."""
        return self.generated_at_copy is None or generated <= self.generated_at_copy


@dataclass
class RequestStream:
    """A request's stream as its relay delivers it, and where it currently runs.

    Text across a switch of instance (a migration's, a replay's): the new instance's
    detokenizer starts after every token so far, so text the old one held back (a character
    whose bytes are split over tokens, the start of a possible stop string) is lost, what
    follows can come out garbled, and a stop string that spans the switch is not found. From
    the first switch on, the stream's text is therefore written by its own detokenizer
    (`new_detokenizer`), fed every token from the start as an undisturbed engine would have
    been; the engines' text is no longer used, and a stop string it finds ends the stream.
    """

    request: GenerationRequest
    instance_id: str
    generated: list[int] = field(default_factory=list)  # token ids delivered to the client
    last_delivery: float = 0.0  # time.monotonic()
    handover: Handover | None = None
    # Why the server ended the request (it ran past its timeout, the server is shutting down):
    # raised to the client once the engine confirms the abort.
    ended_by: Exception | None = None
    # Makes a detokenizer for this request: token ids in, the text they add out. None: the
    # engines' text is used even after a switch.
    new_detokenizer: Callable[[], Detokenizer] | None = None
    _delivered_text: list[str] = field(default_factory=list)  # (kept only for a switch to compare with)
    # The stream's own detokenizer, made by `prepare_switch` or at the first switch, fed every
    # token delivered since; its text is the stream's once `_own_text_out` is set.
    _detokenize: Detokenizer | None = None
    _own_text: list[str] = field(default_factory=list)  # its text of the tokens so far, until then
    _own_text_out: bool = False
    _owed: str = ""  # text of tokens delivered before the switch that the client still lacks

    async def prepare_switch(self) -> None:
        """Make the stream's own detokenizer ahead of a switch, feeding it every token so far in
        a worker thread (one token at a time: milliseconds for a long output), so that neither
        the switch's pause nor the event loop pays for it."""
        if self.new_detokenizer is None or self._detokenize is not None:
            return
        upto = len(self.generated)
        made = await asyncio.to_thread(self._own_detokenizer, tuple(self.generated[:upto]))
        if made is not None and self._detokenize is None:  # (the switch may have come first)
            self._detokenize, text = made
            self._own_text = [text]
            self._keep_own_text(GenerationDelta(tuple(self.generated[upto:]), ""))  # delivered meanwhile

    def _own_detokenizer(self, so_far: tuple[int, ...]) -> tuple[Detokenizer, str] | None:
        try:
            detokenize = self.new_detokenizer()
            return detokenize, detokenize(GenerationDelta(so_far, "")).text
        except Exception:  # noqa: BLE001 - a text repair must never cost the stream itself
            self._give_up_own_text("no detokenizer of its own")
            return None

    def _keep_own_text(self, delta: GenerationDelta) -> None:
        """Feed the prepared detokenizer a delivered delta (the engine's text still goes out)."""
        try:
            self._own_text.append(self._detokenize(delta).text)
        except Exception:  # noqa: BLE001 - as in `_own_detokenizer`
            self._give_up_own_text("its own detokenizer failed")

    def _give_up_own_text(self, why: str) -> None:
        logger.exception("request %s: %s; the engines' text is used", self.request.request_id, why)
        self.new_detokenizer = self._detokenize = None

    def switched(self) -> None:
        """The stream now comes from another instance."""
        if self._own_text_out:
            return  # (after a first switch the stream writes its own text already)
        if self._detokenize is None and self.new_detokenizer is not None:  # (not prepared: a replay)
            made = self._own_detokenizer(tuple(self.generated))
            if made is not None:
                self._detokenize, text = made
                self._own_text = [text]
        if self._detokenize is None:
            return
        so_far, delivered = "".join(self._own_text), "".join(self._delivered_text)
        self._owed = so_far[len(delivered):] if so_far.startswith(delivered) else ""
        self._own_text_out, self._own_text, self._delivered_text = True, [], []  # no longer needed

    def deliver(self, delta: GenerationDelta) -> GenerationDelta:
        """The delta as the client gets it; one that ends the output is `finished`."""
        self.last_delivery = time.monotonic()
        if self._own_text_out:
            written = self._detokenize(delta)
            delta = replace(delta, text=self._owed + written.text)
            self._owed = ""
            if written.stop is not None:  # the tokens past the stop string are not output
                kept = written.kept
                delta = replace(delta, token_ids=delta.token_ids[:kept], finish_reason="stop", stop_reason=written.stop,
                                logprobs=delta.logprobs and delta.logprobs[:kept])
        elif self.new_detokenizer is not None:
            self._delivered_text.append(delta.text)
            if self._detokenize is not None:  # prepared: kept up to date
                self._keep_own_text(delta)
        self.generated.extend(delta.token_ids)
        return delta


async def _stop(source: AsyncIterator[GenerationDelta], pending: asyncio.Future | None) -> None:
    """Stop reading a stream; the backend aborts its request (frees its KV blocks)."""
    if pending is not None:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    await source.aclose()


def _deliver_until_finished(stream: RequestStream, deltas: list[GenerationDelta]) -> list[GenerationDelta]:
    """Deliver deltas in order, up to the one that ends the output (the stream's own
    detokenizer can end it early, at a stop string that spans a switch)."""
    delivered: list[GenerationDelta] = []
    for delta in deltas:
        delivered.append(stream.deliver(delta))
        if delivered[-1].finished:
            break
    return delivered


async def relay(stream: RequestStream, source: AsyncIterator[GenerationDelta],
                on_switch=None) -> AsyncIterator[GenerationDelta]:
    """Deliver the request's output from `source`, switching to a destination when a pending
    handover's destination is ready. While a handover is pending the source is read so that
    the switch is noticed even once the source has stopped the request. Source output up to
    the copied state is delivered while the destination starts; output past it (from a source
    that did not stop) is held back, and dropped on a switch (the destination produces those
    tokens again) or delivered if the switch is abandoned.
    `on_switch(old_instance_id, new_instance_id)` runs when the destination takes over."""
    pending: asyncio.Future | None = None  # a source read in flight during a handover
    switched: Handover | None = None  # just committed: its pause ends as the first delta leaves
    try:
        while True:
            handover = stream.handover
            if handover is None:
                delta = await (pending if pending is not None else anext(source, None))
                pending = None
            else:
                if pending is None:
                    pending = asyncio.ensure_future(anext(source, None))
                if not handover.watched.done():
                    handover.watched.set_result(None)
                await asyncio.wait({pending, handover.destination_ready}, return_when=asyncio.FIRST_COMPLETED)
                if handover.destination_ready.done():
                    stream.handover = None
                    if handover.destination_ready.exception() is not None:
                        out = _deliver_until_finished(stream, handover.held)  # the source simply goes on
                        for held in out:
                            yield held
                        if out and out[-1].finished:
                            return
                        continue
                    first, destination = handover.destination_ready.result()
                    await _stop(source, pending)
                    source, pending, switched = destination, None, handover
                    if first.num_cached_tokens is not None:
                        total = len(stream.request.prompt_token_ids) + len(stream.generated)
                        handover.recomputed_tokens = total - first.num_cached_tokens
                    old, stream.instance_id = stream.instance_id, handover.destination_id
                    stream.switched()
                    handover.conclude(COMMITTED)
                    if on_switch is not None:
                        on_switch(old, stream.instance_id)
                    delta = first
                else:
                    delta, pending = pending.result(), None

            # Route the delta under the handover pending now (one may have begun meanwhile).
            handover = stream.handover
            if handover is None:
                if delta is None:
                    return
                paused_since = stream.last_delivery
                delta = stream.deliver(delta)
                if switched is not None:  # (read by the migration once this generator yields)
                    switched.downtime_s, switched = time.monotonic() - paused_since, None
                yield delta
                if delta.finished:  # (the engine's, or a stop string across a switch: the engine is stopped)
                    return
            elif delta is None or delta.finished:
                handover.conclude(SOURCE_FINISHED)
                stream.handover = None
                for held in _deliver_until_finished(stream, handover.held + ([delta] if delta else [])):
                    yield held
                return
            elif not handover.held and handover.copied_past(len(stream.generated) + len(delta.token_ids)):
                delta = stream.deliver(delta)  # produced before the copy: the destination goes on after it
                yield delta
                if delta.finished:
                    handover.conclude(SOURCE_FINISHED)
                    stream.handover = None
                    return
            elif not handover.held and handover.copied_past(len(stream.generated) + 1):
                handover.conclude(SOURCE_AHEAD)  # it spans the copy point: its text cannot be split
                stream.handover = None
                delta = stream.deliver(delta)
                yield delta
                if delta.finished:
                    return
            else:
                handover.held.append(delta)
    finally:
        if stream.handover is not None:
            stream.handover.conclude(CLIENT_GONE)
        await _stop(source, pending)


def check_destination(views: dict[str, InstanceView], source_id: str, destination_id: str, num_tokens: int) -> None:
    """Raise `MigrationRejected` unless `destination_id` can take over a request of
    `num_tokens` tokens from `source_id` now. Pure: decided from snapshots alone."""
    if destination_id == source_id:
        raise MigrationRejected(Refusal.INVALID, f"the request already runs on instance {destination_id!r}")
    if destination_id not in views:
        raise MigrationRejected(Refusal.NOT_FOUND,
                                f"no instance {destination_id!r} (instances: {', '.join(sorted(views))})")
    view = views[destination_id]
    if not view.accepting or view.draining:
        raise MigrationRejected(Refusal.INVALID, f"instance {destination_id!r} does not accept requests now")
    shortage = _shortage(view.snapshot, num_tokens)
    if shortage:
        raise MigrationRejected(Refusal.INVALID, f"instance {destination_id!r} has no room: {shortage}")


def _shortage(snapshot: InstanceSnapshot, num_tokens: int) -> str:
    """Why an instance cannot take a request of `num_tokens` tokens (and its next one), or "".
    Free blocks include the prefix-cache blocks a migration's stages left there."""
    needed = blocks_for(num_tokens + 1, snapshot.block_size)
    room = snapshot.free_blocks - sum(r.demand_blocks for r in snapshot.waiting)
    return f"the request needs {needed} KV blocks, {max(0, room)} are free" if needed > room else ""


async def migrate_request(
    stream: RequestStream,
    source: EngineInstance,
    destination: EngineInstance,
    runtime: ModelRuntime,
    settings: MigrationSettings,
    block_size: int,
    block_bytes: int,
) -> MigrationReport:
    """Move a decoding request from `source` to `destination`; see the module docstring."""
    request = stream.request
    report = MigrationReport(request.request_id, stream.instance_id, destination.instance_id)
    began = time.monotonic()
    max_tokens = request.sampling.get("max_tokens") or runtime.max_model_len
    capacity = blocks_for(min(runtime.max_model_len, len(request.prompt_token_ids) + max_tokens), block_size)
    transfer = runtime.create_transfer(capacity, block_bytes, settings.transport, source, destination)
    report.route = transfer.route
    sent = 0
    handed: set[str] = set()  # ids of the destination requests that read the transfer

    def copied(result: KvExport | NotExported) -> KvExport:
        nonlocal sent
        report.copies += 1
        if isinstance(result, NotExported):
            raise MigrationAborted(f"the request is not decoding on the source: {result.reason}")
        report.blocks += result.blocks - sent
        sent = result.blocks
        return result

    def ensure_destination_room() -> None:
        """Each stage, and the switch, needs room on the destination: give up at once without."""
        snapshot = destination.latest_snapshot
        shortage = snapshot and _shortage(snapshot, len(request.prompt_token_ids) + len(stream.generated))
        if shortage:
            raise MigrationAborted(f"the destination ran out of room: {shortage}")

    async def export(max_blocks: int) -> KvExport:
        return copied(await asyncio.wait_for(
            source.export_kv(request.request_id, transfer, sent, max_blocks), settings.stage_timeout_s
        ))

    handover = stream.handover = Handover(destination.instance_id)
    stopped = False  # the request is stopped on the source for the final stage
    try:
        await stream.prepare_switch()
        if runtime.caches_prefixes:
            chunk_mib = settings.stage_chunk_mib or transfer.default_stage_chunk_mib
            chunk = max(1, int(chunk_mib * 2**20) // max(1, block_bytes))
            preloaded = 0
            for _ in range(settings.max_stages):
                # A stage: every block filled so far, a chunk per source step...
                exported = await export(chunk)
                while exported.blocks < (len(exported.token_ids) - 1) // block_size:
                    exported = await export(chunk)
                report.stages += 1
                # ...taken into the destination's prefix cache a chunk per destination step.
                while preloaded < exported.blocks:
                    ensure_destination_room()
                    preloaded = min(exported.blocks, preloaded + chunk)
                    handed.add(preload_id := f"{request.request_id}-preload-{preloaded}")
                    await _preload(destination, preload_id, request, exported.token_ids, preloaded, block_size,
                                   transfer, settings)
                # The request grew while this stage ran: count what is left from its stream now.
                left = blocks_for(len(request.prompt_token_ids) + len(stream.generated) - 1, block_size) - sent
                if left <= settings.final_stage_blocks:
                    break
        # Stopped, the source sends nothing more: the relay must be listening for the switch.
        await asyncio.wait_for(asyncio.wait({handover.watched, handover.outcome}, return_when=asyncio.FIRST_COMPLETED),
                               settings.stage_timeout_s)
        if handover.outcome.done():
            raise MigrationAborted(handover.outcome.result())
        ensure_destination_room()
        final_began = time.monotonic()
        final = await _stop_and_export(source, request.request_id, transfer, sent, settings.stage_timeout_s)
        stopped = isinstance(final, KvExport)
        final = copied(final)
        report.final_copy_s = time.monotonic() - final_began
        handover.generated_at_copy = len(final.token_ids) - len(request.prompt_token_ids)
        handed.add(request.request_id)
        await _start_destination(destination, request.continued(final.token_ids, transfer), handover, settings)
        outcome = await handover.outcome
        if outcome != COMMITTED:
            raise MigrationAborted(outcome)
        report.committed = True
        report.downtime_s = handover.downtime_s
        report.recomputed_tokens = handover.recomputed_tokens
        report.switched_at_token = handover.generated_at_copy
    except (TimeoutError, MigrationAborted) as exc:
        report.reason = str(exc) or "a stage timed out"
    except Exception as exc:  # noqa: BLE001 - any failure before the switch only aborts it
        report.reason = f"{type(exc).__name__}: {exc}"
    finally:
        _abort_handover(handover, MigrationAborted(report.reason))
        if stopped and not report.committed:
            await _resume(source, request.request_id)
        if report.committed or not handed:
            transfer.close()
        else:
            _close_once_released(transfer, destination, frozenset(handed), settings.stage_timeout_s)
        report.bytes = report.blocks * block_bytes
        report.duration_s = time.monotonic() - began
    return report


async def _resume(source: EngineInstance, request_id: str) -> None:
    """Let the source decode a request it stopped for a final stage that came to nothing."""
    try:
        await source.resume_request(request_id)
    except Exception:  # noqa: BLE001 - a dead source has nothing left to resume
        logger.warning("could not resume request %s on instance %s", request_id, source.instance_id, exc_info=True)


_background_tasks: set[asyncio.Task] = set()  # background tasks, referenced until done as asyncio asks


def _close_once_released(transfer, destination: EngineInstance, request_ids: frozenset[str], timeout_s: float) -> None:
    """Remove an abandoned migration's transfer once the destination holds none of the requests
    that read it. Their aborts are on the way, but one may still be queued there and get
    scheduled first: its KV load must find the transfer (what it loads is the request's own,
    correct KV), or the engine fails. A dead destination loads nothing."""
    async def close_when_released() -> None:
        deadline = time.monotonic() + timeout_s
        seen = destination.latest_snapshot
        try:
            while destination.alive and time.monotonic() < deadline:
                snapshot = destination.latest_snapshot
                # A snapshot newer than the aborts' (higher sequence), without the requests.
                if snapshot is not None and (seen is None or snapshot.sequence > seen.sequence) \
                        and not request_ids & snapshot.request_ids:
                    return
                await asyncio.sleep(0.05)
        finally:
            transfer.close()

    task = asyncio.ensure_future(close_when_released())
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


async def _stop_and_export(source: EngineInstance, request_id: str, transfer, first_block: int,
                           timeout_s: float) -> KvExport | NotExported:
    """The final copy. If it is not answered in time, the source may still stop the request
    later; it resumes it then."""
    stopping = asyncio.ensure_future(source.stop_and_export_kv(request_id, transfer, first_block))
    try:
        return await asyncio.wait_for(asyncio.shield(stopping), timeout_s)
    except BaseException:
        def resume_if_stopped(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None and isinstance(done.result(), KvExport):
                task = asyncio.ensure_future(_resume(source, request_id))
                _background_tasks.add(task)
                task.add_done_callback(_background_tasks.discard)

        stopping.add_done_callback(resume_if_stopped)
        raise


async def _preload(destination: EngineInstance, preload_id: str, request: GenerationRequest,
                   token_ids: tuple[int, ...], blocks: int, block_size: int, transfer,
                   settings: MigrationSettings) -> None:
    """Have the destination take the request's first `blocks` blocks (all full, all copied) into
    its prefix cache: a one-token request whose prompt ends one token past them loads those it
    does not hold yet and computes only that token."""
    preload = GenerationRequest(
        preload_id, token_ids[: blocks * block_size + 1],
        {"max_tokens": 1, "temperature": 0.0}, request.priority, kv_transfer=transfer,
    )

    async def run() -> None:
        async for _ in destination.generate(preload):
            pass

    await asyncio.wait_for(run(), settings.stage_timeout_s)


async def _start_destination(destination: EngineInstance, continuation: GenerationRequest, handover: Handover,
                             settings: MigrationSettings) -> None:
    """Admit the request on the destination and hand its first output to the relay. If the
    relay does not take it (the request finished meanwhile), the destination request is closed."""
    stream = destination.generate(continuation)
    try:
        first = await asyncio.wait_for(anext(stream), settings.stage_timeout_s)
    except BaseException as exc:
        await stream.aclose()
        _abort_handover(handover, MigrationAborted(f"the destination failed: {exc!r}"))
        raise MigrationAborted(f"the destination failed: {exc!r}") from exc
    if handover.outcome.done():  # the relay already moved on (request finished, client gone)
        await stream.aclose()
        return
    handover.destination_ready.set_result((first, stream))
