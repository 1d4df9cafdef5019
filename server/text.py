"""Text and token ids for one model: encoding, incremental decoding, and per-token texts.

The engine works on token ids only; the servicer turns requests' text into ids here and the
generated ids back into text. Decoding relies on the bundle's tokenizer decoder (word-level joins
words with spaces and turns the eos token into a newline; byte-level BPE and characters decode
exactly), so no tokenizer kind needs code of its own.
"""

from __future__ import annotations

import bisect

import numpy as np

from server.bundle import Bundle
from server.prefix_encoder import PrefixEncoder

# Tokens of context decoded in front of each new token, so that the new piece carries the
# spacing the tokenizer's decoder puts between it and what came before.
_CONTEXT_TOKENS = 4
# Highest code point: `prefix + _MAX_CHAR` sorts after every string that starts with `prefix`.
_MAX_CHAR = "\U0010ffff"


class TextCodec:
    """One bundle's tokenizer, with the lookups the servicer needs precomputed."""

    def __init__(self, bundle: Bundle) -> None:
        self.tokenizer = bundle.tokenizer
        self.kind = bundle.tokenizer_kind
        self.vocab_size = bundle.vocab_size
        self.eos_id = bundle.eos_id
        self.unk_id: int | None = bundle.special_tokens.get("unk")
        self.special_ids = frozenset(bundle.special_tokens.values())
        # Each token decoded on its own: "the" (word), " the" (bpe), "\n" (eos).
        self.token_texts: list[str] = self.tokenizer.decode_batch(
            [[i] for i in range(self.vocab_size)], skip_special_tokens=False
        )
        # (text without leading whitespace, id) of every ordinary token, sorted, for prefix search.
        keyed = sorted(
            (text.lstrip(), i)
            for i, text in enumerate(self.token_texts)
            if i not in self.special_ids and text.strip()
        )
        self._sorted_texts = [text for text, _ in keyed]
        self._sorted_ids = np.array([i for _, i in keyed], dtype=np.int64)
        self.special_id_array = np.array(sorted(self.special_ids), dtype=np.int64)
        # A context that extends a recent one is encoded from near its end (typing clients;
        # a typing session through `encoder.extend`, keeping its own `Encoded`).
        self.encoder = PrefixEncoder(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a "\\n" is the eos token; unknown words become `<unk>`."""
        return self.encoder.encode(text)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def ids_with_prefix(self, prefix: str) -> np.ndarray:
        """Ids of the ordinary tokens whose text (leading whitespace aside) starts with `prefix`."""
        lo = bisect.bisect_left(self._sorted_texts, prefix)
        hi = bisect.bisect_left(self._sorted_texts, prefix + _MAX_CHAR)
        return self._sorted_ids[lo:hi]

    def detokenizer(self, context_ids: list[int]) -> Detokenizer:
        """An incremental decoder for tokens that follow eos + `context_ids`."""
        return Detokenizer(self, [self.eos_id, *context_ids][-_CONTEXT_TOKENS:])


class Detokenizer:
    """Turns generated tokens into text pieces one token at a time.

    Each piece is the text that decoding gains by the new token, decoded together with a few
    tokens before it (so word-level spacing and newlines come out right). Bytes of an incomplete
    UTF-8 character (byte-level BPE) are held back until the character is complete.
    """

    def __init__(self, codec: TextCodec, context: list[int]) -> None:
        self._codec = codec
        self._ids = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes; "" while a character is still incomplete."""
        self._ids.append(token_id)
        done = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        # Keep only the tokens the next decode needs.
        del self._ids[: self._prefix]
        self._read -= self._prefix
        self._prefix = 0
        return text[len(done) :]

    def push_many(self, token_ids: list[int]) -> str:
        """The new text `token_ids` complete, decoded together: the text `push` gives them one
        by one, for two decodes instead of two a token (a generation's tokens arrive several
        to a message under load). Where they end inside a character, they go one by one, so
        the complete characters before it are not held back."""
        if len(token_ids) == 1:
            return self.push(token_ids[0])
        mark = len(self._ids)
        self._ids.extend(token_ids)
        done = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        if text.endswith("\ufffd"):
            del self._ids[mark:]
            return "".join([self.push(i) for i in token_ids])
        if len(text) <= len(done):
            return ""
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters decoded as U+FFFD."""
        done = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]
