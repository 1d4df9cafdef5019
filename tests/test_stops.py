"""Stop strings in streamed text (server/stops.py): text that may begin a stop string is held
back, the text stops before the first one reached, and how the text is split into pieces
never changes what comes out."""

from __future__ import annotations

import numpy as np
import pytest

from server.stops import StopMatcher


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """What a client is sent for each piece, then the held-back rest; and whether it stopped."""
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return out, True
    return [*out, matcher.flush()], False


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    assert stream(["the lor", "d said"], ["lord"]) == (["the ", ""], True)
    assert stream(["the lo", "ng day"], ["lord"]) == (["the ", "long day", ""], False)
    assert stream(["END"], ["END"]) == ([""], True)
    assert stream(["a", "b"], []) == (["a", "b", ""], False)


def test_the_earliest_stop_string_ends_the_text() -> None:
    out, stopped = stream(["xx ab cd"], ["cd", "ab"])
    assert stopped and out == ["xx "]


@pytest.mark.parametrize("seed", range(20))
def test_how_the_text_is_split_does_not_change_what_comes_out(seed: int) -> None:
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(list("ab c\n"), 60))
    stops = ["".join(rng.choice(list("abc"), int(rng.integers(2, 4)))) for _ in range(2)]
    cuts = sorted(set(rng.integers(0, len(text), 12).tolist()))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    whole, stopped_whole = stream([text], stops)
    split, stopped_split = stream(pieces, stops)
    assert "".join(split) == "".join(whole) and stopped_split == stopped_whole
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert "".join(whole) == (text[: min(hits)] if hits else text)
