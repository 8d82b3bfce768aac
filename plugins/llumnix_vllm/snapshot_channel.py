"""The one-way channel that carries load snapshots from an engine process to the front end.

ZeroMQ PUB/SUB over a Unix socket with CONFLATE on both ends: only the newest snapshot is
kept, so a slow reader never works through a backlog of stale ones. The front end binds (it
outlives engine restarts), the engine connects.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import uuid

import zmq
import zmq.asyncio

from llumnix_backend.snapshot import InstanceSnapshot


def new_instance_token() -> str:
    """A token naming one engine start: the starting server's pid, then random characters."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def is_instance_token(value: str) -> bool:
    """Whether `value` was made by `new_instance_token` (vLLM fills instance_id in otherwise)."""
    return re.fullmatch(r"\d+-[0-9a-f]{12}", value) is not None


def server_pid(instance_token: str) -> int:
    """The pid of the server that started the engine named by `instance_token`."""
    return int(instance_token.split("-", 1)[0])


def snapshot_address(instance_token: str) -> str:
    """Where the engine started with `instance_token` publishes."""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'llumnix-{instance_token}.snap')}"


class SnapshotPublisher:
    """Engine side."""

    def __init__(self, address: str) -> None:
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.CONFLATE, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)

    def send(self, snapshot: InstanceSnapshot) -> None:
        self._socket.send(pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL), zmq.NOBLOCK)

    def close(self) -> None:
        self._socket.close(linger=0)


class SnapshotSubscriber:
    """Front-end side: `await receive()` returns the newest snapshot."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._context = zmq.asyncio.Context.instance()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.CONFLATE, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.bind(address)

    async def receive(self) -> InstanceSnapshot:
        return pickle.loads(await self._socket.recv())

    def close(self) -> None:
        self._socket.close(linger=0)
        path = self._address.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)
