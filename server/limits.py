"""The bounds on what a request may carry and on what a reply may be, and how errors quote values.

Every field a client controls is bounded before any work is done on it: text in characters
(`--max-text-chars`, for a request's text in all), names and words in characters, stop strings
in number and length, state tokens in bytes, and the reply a request asks for in bytes
(`--max-message-bytes`, what gRPC would refuse to send). Too much of something the server could
do given a larger limit is RESOURCE_EXHAUSTED; a value no request should carry (a model name of
a thousand characters) is INVALID_ARGUMENT. Each message names the field and the limit, and
quotes a value only through `quote`, so an error never grows with the request (gRPC refuses to
send status messages beyond its metadata limit, and the client would see that instead).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from rnnlm import bundle

Code = grpc.StatusCode

# Characters of a value an error message quotes; the rest is summarised by its length.
QUOTE_CHARS = 40
# Model names and versions (model, model_version, GetModel's name and version).
MAX_NAME_CHARS = 128
# partial_word: the letters of one word.
MAX_WORD_CHARS = 128
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# A state token carries the context as UTF-8 (at most 4 bytes a character) and a few fields.
_TOKEN_OVERHEAD_BYTES = 1024
# A reply's protobuf framing per repeated element, bounded from above (tags, lengths, varints).
_ELEMENT_OVERHEAD_BYTES = 24
_REPLY_OVERHEAD_BYTES = 1024


class RpcError(Exception):
    """A request answered with a status code other than OK; the message names the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcError:
    return RpcError(Code.INVALID_ARGUMENT, message)


def quote(value: str | bytes, limit: int = QUOTE_CHARS) -> str:
    """A request's field quoted for an error message (`rnnlm.bundle.quote`, a shorter bound)."""
    return bundle.quote(value, limit)


@dataclass(frozen=True)
class Limits:
    """The server's caps on requests and replies (from its flags)."""

    max_tokens: int
    max_prompt_tokens: int
    max_text_chars: int
    max_message_bytes: int

    def text(self, value: str, field: str) -> str:
        """`value` if it is within --max-text-chars."""
        if len(value) > self.max_text_chars:
            raise self._too_long(field, len(value))
        return value

    def texts(self, values: Sequence[str], field: str) -> list[str]:
        """`values` if their characters in all are within --max-text-chars."""
        total = sum(map(len, values))
        if total > self.max_text_chars:
            raise self._too_long(f"{field} (in all)", total)
        return list(values)

    def state_token(self, token: bytes, field: str = "state_token") -> bytes:
        """`token` if it is no longer than a token of the longest allowed context."""
        most = 4 * self.max_text_chars + _TOKEN_OVERHEAD_BYTES
        if len(token) > most:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"{field} has {len(token)} bytes; a token of the longest context this server "
                f"takes (--max-text-chars {self.max_text_chars}) has at most {most}",
            )
        return token

    def reply(self, size: int, what: str = "") -> None:
        """Refuse a call whose reply would be `size` bytes, more than gRPC may send; `what`
        says what makes it so large."""
        if size > self.max_message_bytes:
            why = f" ({what})" if what else ""
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"the reply would be {size} bytes{why}; this server sends at most "
                f"{self.max_message_bytes} (--max-message-bytes)",
            )

    def state_token_reply(self, text: str) -> None:
        """Refuse a call whose state token for the context `text` cannot be sent."""
        size = len(text.encode()) + _TOKEN_OVERHEAD_BYTES
        self.reply(size, f"a state token of a {len(text)}-character context")

    def embeddings_reply(self, count: int, dimension: int) -> None:
        """Refuse an Embed call whose `count` vectors of `dimension` floats cannot be sent."""
        size = count * (4 * dimension + _ELEMENT_OVERHEAD_BYTES) + _REPLY_OVERHEAD_BYTES
        self.reply(size, f"{count} embeddings of {dimension} floats: send fewer texts per call")

    def scores_reply(self, count: int, token_bytes: Sequence[int] | None) -> None:
        """Refuse a Score call whose `count` results cannot be sent. `token_bytes`: the UTF-8
        length of every scored token's text when token logprobs are asked for, else None."""
        size = count * _ELEMENT_OVERHEAD_BYTES + _REPLY_OVERHEAD_BYTES
        if token_bytes is not None:
            size += sum(token_bytes) + len(token_bytes) * _ELEMENT_OVERHEAD_BYTES
        self.reply(size, f"{count} results: send fewer or shorter texts per call")

    def _too_long(self, field: str, chars: int) -> RpcError:
        return RpcError(
            Code.RESOURCE_EXHAUSTED,
            f"{field} has {chars} characters; this server's limit (--max-text-chars) is "
            f"{self.max_text_chars}",
        )


def check_name(value: str, field: str) -> str:
    """A model name or version: at most MAX_NAME_CHARS characters."""
    if len(value) > MAX_NAME_CHARS:
        raise invalid(
            f"{field} has {len(value)} characters, more than any name ({MAX_NAME_CHARS}): "
            f"{quote(value)}"
        )
    return value


def check_partial_word(partial_word: str) -> str:
    """The letters of one word: no whitespace or control characters, at most MAX_WORD_CHARS
    characters."""
    if len(partial_word) > MAX_WORD_CHARS:
        raise invalid(
            f"partial_word has {len(partial_word)} characters; at most {MAX_WORD_CHARS}: "
            f"{quote(partial_word)}"
        )
    if any(c.isspace() for c in partial_word):
        raise invalid(
            "partial_word must be the letters of one word, without spaces, not "
            f"{quote(partial_word)}"
        )
    # A control character (NUL, ESC...) is in no word: refused by name rather than matching
    # nothing. Format characters stay (a zero-width non-joiner is part of Persian words).
    for i, c in enumerate(partial_word):
        if unicodedata.category(c) == "Cc":
            raise invalid(
                f"partial_word has a control character (U+{ord(c):04X}) at position {i}: "
                f"{quote(partial_word)}"
            )
    return partial_word


def check_stops(stops: Sequence[str]) -> list[str]:
    """Generate's stop strings: at most MAX_STOPS, none empty or over MAX_STOP_CHARS."""
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop has {len(stops)} strings; at most {MAX_STOPS}")
    for i, stop in enumerate(stops):
        if not stop:
            raise invalid(f"stop[{i}] is empty; stop strings must have at least one character")
        if len(stop) > MAX_STOP_CHARS:
            raise invalid(
                f"stop[{i}] has {len(stop)} characters; at most {MAX_STOP_CHARS}: {quote(stop)}"
            )
    return list(stops)
