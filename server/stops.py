"""How a generation's tokens become the text a client is sent, and where it stops.

`detokenize` turns the tokens of one `GenerateResponse` into their text, through the
request's `Detokenizer` (server/text.py) and its `StopMatcher`, which holds back text that
may begin a stop string and ends the generation at the first one reached.
"""

from __future__ import annotations

from server.sampling import GeneratedToken
from server.text import Detokenizer


def detokenize(
    tokens: list[GeneratedToken], detokenizer: Detokenizer, stopper: StopMatcher
) -> tuple[str, list[int], bool]:
    """One response's text and token ids, and whether a stop string ended it (then the
    tokens after the one that completed it are dropped). Without stop strings the tokens
    are decoded together."""
    if not stopper.stops:
        ids = [t.token_id for t in tokens]
        return detokenizer.push_many(ids), ids, False
    pieces: list[str] = []
    ids = []
    for token in tokens:
        text, stopped = stopper.push(detokenizer.push(token.token_id))
        pieces.append(text)
        ids.append(token.token_id)
        if stopped:
            return "".join(pieces), ids, True
    return "".join(pieces), ids, False


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return piece, False
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        keep = max(_overlap(text, s) for s in self.stops)
        self._pending = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
