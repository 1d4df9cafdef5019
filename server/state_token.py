"""Portable state tokens: a predictive-typing context, signed, resumable on any replica.

A token is what a replica needs to continue a typing session it has never seen: the model name
and version, the context, and an HMAC-SHA256 with a key all replicas share
(`--state-token-key-file`). Layout of format version 1, integers big-endian:

    u8                  format version (1)
    u16 + bytes         model name, UTF-8
    u16 + bytes         model version, UTF-8
    u32                 tokens in the context (checked against the tokenizer on resume)
    u32 + bytes         the context text, UTF-8
    32 bytes            HMAC-SHA256(key, DOMAIN + everything above)

The context travels as text, not as token ids or state tensors: a session re-tokenizes its
whole context at each event (so text added in pieces is tokenized as PredictNext would tokenize
it; with BPE, ids of the pieces would differ from ids of the whole), and the engine resumes
from token ids through its state cache, so the replica that resumes pays one prefill of the
context, a few microseconds per token for a recurrent network, and the next event is cached.
The token is signed, not encrypted: the client that holds it typed that text.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.config import ConfigError
from server.security import read_secret_file, secret_lines

FORMAT_VERSION = 1
DOMAIN = b"rnnlm.v1 state token\x00"
MAC_BYTES = 32
MIN_KEY_CHARS = 32
_FLAG = "--state-token-key-file"


class StateTokenError(ValueError):
    """A state token that cannot be resumed; the message names `state_token` and why."""


@dataclass(frozen=True)
class SessionContext:
    """What a state token carries."""

    model: str
    version: str
    num_tokens: int
    text: str


class StateTokens:
    """Seals contexts into tokens with the first key; opens tokens signed with any key."""

    def __init__(self, keys: Sequence[bytes], path: Path | None = None) -> None:
        if not keys:
            raise ValueError("state tokens need at least one key")
        self.keys = tuple(keys)
        self.path = path

    @classmethod
    def from_file(cls, path: Path) -> StateTokens:
        """The keys of a key file, one per line; ConfigError naming the file when it is bad."""
        keys = []
        for number, key in secret_lines(read_secret_file(path, _FLAG), path, _FLAG):
            if len(key) < MIN_KEY_CHARS:
                raise ConfigError(
                    f"{_FLAG} {path} line {number}: the key has {len(key)} characters; use at "
                    f"least {MIN_KEY_CHARS} (e.g. `openssl rand -hex 32`)"
                )
            keys.append(key.encode())
        return cls(keys, path)

    def seal(self, context: SessionContext) -> bytes:
        name, version, text = (s.encode() for s in (context.model, context.version, context.text))
        body = b"".join(
            (
                struct.pack(">BH", FORMAT_VERSION, len(name)),
                name,
                struct.pack(">H", len(version)),
                version,
                struct.pack(">II", context.num_tokens, len(text)),
                text,
            )
        )
        return body + _mac(self.keys[0], body)

    def open(self, token: bytes) -> SessionContext:
        """The context in a token this server's keys signed; StateTokenError otherwise."""
        if not token:
            raise StateTokenError("state_token is empty")
        if token[0] != FORMAT_VERSION:
            raise StateTokenError(
                f"state_token has format version {token[0]}, which this server does not read "
                f"(it reads version {FORMAT_VERSION})"
            )
        if len(token) <= 1 + MAC_BYTES:
            raise StateTokenError(f"state_token is truncated ({len(token)} bytes)")
        body, mac = token[:-MAC_BYTES], token[-MAC_BYTES:]
        valid = False
        for key in self.keys:  # every key is tried, in constant time
            valid |= hmac.compare_digest(mac, _mac(key, body))
        if not valid:
            raise StateTokenError(
                "state_token is not valid: it was altered or truncated, or signed with a key "
                "this server does not have"
            )
        try:
            return _parse(body)
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            raise StateTokenError(f"state_token is signed but malformed ({e})") from e


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, DOMAIN + body, hashlib.sha256).digest()


def _parse(body: bytes) -> SessionContext:
    pos = 1

    def take(size_format: str) -> bytes:
        nonlocal pos
        (size,) = struct.unpack_from(size_format, body, pos)
        pos += struct.calcsize(size_format)
        if pos + size > len(body):
            raise ValueError("a field runs past the end")
        pos += size
        return body[pos - size : pos]

    name = take(">H").decode()
    version = take(">H").decode()
    (num_tokens,) = struct.unpack_from(">I", body, pos)
    pos += 4
    text = take(">I").decode()
    if pos != len(body):
        raise ValueError(f"{len(body) - pos} bytes after the last field")
    return SessionContext(name, version, num_tokens, text)
