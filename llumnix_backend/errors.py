"""Refusals the core raises, by kind; the server maps each kind to an HTTP status (the core
knows nothing of HTTP)."""

from __future__ import annotations

from enum import Enum


class Refusal(str, Enum):
    INVALID = "invalid"  # it cannot be carried out as asked
    NOT_FOUND = "not_found"  # it names something that does not exist
    CONFLICT = "conflict"  # it clashes with what is under way now


class Refused(Exception):
    """An operation refused before anything changed; `refusal` says what kind."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class Overloaded(Exception):
    """The model queues as many requests as it may; try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimedOut(Exception):
    """The request ran past its model's `scheduler.admission.request_timeout_s`; it was aborted."""


class ShuttingDown(Exception):
    """The server is stopping: it takes no new requests, and ends those still running once the
    shutdown grace period is over."""
