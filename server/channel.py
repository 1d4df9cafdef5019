"""The channel between the gRPC front end and the engine core process: frames on a socket.

A frame is a 4-byte little-endian length and a pickle (protocol 5, so numpy arrays travel as
raw bytes). Each side sends at most one frame per turn of its event loop: `Outbox` collects
what a turn produced (the core: every reply of a step; the front end: every call that arrived)
and writes it as one frame, so the cost of the channel is per step, not per token.

Front end -> core, a frame is a list of messages:
    ("call", id, method, args)            a one-result call of `Engine` (see CALLS)
    ("generate", id, ids, max_tokens, params, stops)
    ("cancel", id)                         the caller went away: drop the request
Core -> front end, a frame is (active, replies, metric events):
    replies: (id, OK | TOKEN | END | ERROR, payload)
    metric events: (recorder, method, args), replayed on the front end's `EngineMetrics`
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

HEADER = struct.Struct("<I")
# A frame larger than this is refused as corrupt (a score of a long text is the largest).
MAX_FRAME = 1 << 31

# The one-result methods of `Engine` the front end calls through the channel.
CALLS = ("next_token_logprobs", "next_token_logprobs_many", "score", "embed")

# Kinds of reply.
OK = 0
TOKEN = 1
END = 2
ERROR = 3


class ChannelClosed(Exception):
    """The other end of the channel went away."""


def encode(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's message; ChannelClosed at the end of the stream."""
    try:
        header = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ChannelClosed(f"a frame of {size} bytes is over the channel's bound")
        payload = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise ChannelClosed("the other end of the engine channel closed") from e
    return pickle.loads(payload)


class Outbox:
    """Messages of one event-loop turn, written as one frame at the end of the turn.

    For the event loop's thread only.
    """

    def __init__(self, writer: asyncio.StreamWriter, frame: Any) -> None:
        self._writer = writer
        self._frame = frame  # (the items added this turn) -> the frame to send
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        self.items.append(item)
        self.touch()

    def touch(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._writer.is_closing():
            self.items = []
            return
        items, self.items = self.items, []
        self._writer.write(encode(self._frame(items)))
