"""vLLM's repeated warnings are folded across processes (the vLLM plugin's log filter): here two
filters over one marker folder stand for two engine processes of one server."""

from __future__ import annotations

import logging

from llumnix_vllm.log_folding import FoldRepeatedWarnings


def record(message: str, level: int = logging.WARNING, name: str = "vllm.config") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_each_warning_passes_once_over_all_processes(tmp_path) -> None:
    first_engine, second_engine = FoldRepeatedWarnings(str(tmp_path)), FoldRepeatedWarnings(str(tmp_path))
    assert first_engine.filter(record("the connector API is experimental"))
    assert not second_engine.filter(record("the connector API is experimental"))
    assert not first_engine.filter(record("the connector API is experimental"))
    # Another text, or the same text from another logger, is another warning.
    assert second_engine.filter(record("the hybrid KV cache manager is off"))
    assert second_engine.filter(record("the connector API is experimental", name="vllm.worker"))


def test_other_levels_always_pass(tmp_path) -> None:
    fold = FoldRepeatedWarnings(str(tmp_path))
    for level in (logging.INFO, logging.ERROR, logging.ERROR):
        assert fold.filter(record("engine core died", level))


def test_a_warning_is_never_lost_once_the_markers_are_gone(tmp_path) -> None:
    fold = FoldRepeatedWarnings(str(tmp_path / "removed at the server's exit"))
    assert fold.filter(record("workers still running after the grace period"))
    assert fold.filter(record("workers still running after the grace period"))
