"""When a generation's consumer is woken under load (`server.delivery.TokenStream`).

The engine's own tests run real generations through it; here the tokens are put by hand, as
the engine's dispatch does, so that the order of puts and wake-ups is exact.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from server.delivery import COALESCE_ACTIVE, TokenStream
from server.requests import END
from server.sampling import GeneratedToken


@dataclass
class Load:
    """How many requests the engine holds (`delivery.Busy`)."""

    active: int


@dataclass
class Queued:
    """The request a stream started (`delivery.Cancellable`)."""

    cancelled: bool = False


def token(i: int) -> GeneratedToken:
    return GeneratedToken(i, -1.0, ())


async def wake_ups(stream: TokenStream, puts: list[list[object]]) -> list[list[int]]:
    """The token ids each wake-up of the consumer takes, when `puts[k]` arrive together
    (one step's dispatch) and the consumer runs between steps."""
    taken: list[list[int]] = []

    async def consume() -> None:
        async for first in stream:
            taken.append([first.token_id, *(t.token_id for t in stream.take_ready())])

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0)  # the consumer starts its request and waits
    for step in puts:
        for item in step:
            stream.put(item)
        for _ in range(3):  # let a woken consumer take what is there
            await asyncio.sleep(0)
    await task
    return taken


def run(stream_tokens: int, stream_ms: float, active: int, steps: int) -> list[list[int]]:
    async def body() -> list[list[int]]:
        stream = TokenStream(Load(active), lambda _: Queued(), stream_tokens, stream_ms)
        puts: list[list[object]] = [[token(i)] for i in range(steps)]
        puts[-1].append(END)
        return await wake_ups(stream, puts)

    return asyncio.run(body())


def test_under_load_tokens_wait_for_company_up_to_stream_tokens() -> None:
    groups = run(stream_tokens=4, stream_ms=1e9, active=COALESCE_ACTIVE, steps=11)
    assert groups == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_a_token_waits_at_most_stream_ms() -> None:
    # No wait allowed: every step's token wakes the consumer, however many could share.
    assert run(stream_tokens=1000, stream_ms=0.0, active=64, steps=6) == [[i] for i in range(6)]
    # No bound: the first token alone, the rest when the generation ends.
    assert run(stream_tokens=1000, stream_ms=1e9, active=64, steps=6) == [[0], [1, 2, 3, 4, 5]]


def test_lightly_loaded_streams_get_every_token_alone() -> None:
    groups = run(stream_tokens=4, stream_ms=1e9, active=COALESCE_ACTIVE - 1, steps=5)
    assert groups == [[i] for i in range(5)]
