"""Token ids of a text that extends a recently encoded one, at the cost of its new part.

A typing client sends its whole context again, a word longer, on every keystroke; encoding all
of it each time costs time in proportion to the context (about 0.6 ms per 1000 words here).
`PrefixEncoder` remembers recent texts' ids, and for a text that starts with one of them
re-encodes only from the start of that text's third-to-last pre-token ("word") onwards. Long
documents are encoded in pieces spliced the same way, which bounds the tokenizer's memory.

That splice equals encoding the whole text when encoding is local: the normalizer maps
characters one by one and the pre-tokenizer splits with regular expressions, so a pre-token
boundary stays a boundary whatever follows, and only the last words of the shorter text can
change when text is appended ("ca" becoming "cat", "<eos" becoming "<eos>"). Tokenizers this
module cannot vouch for (other normalizers or pre-tokenizers, added tokens, a prefix space) are
encoded whole every time, and a construction-time self-test compares spliced and whole
encodings on awkward text before the cache is used at all.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tokenizers import Encoding, Tokenizer

# Texts shorter than this are encoded whole (it costs microseconds) and not remembered.
MIN_CHARS = 256
# Longer texts (documents to score, not typing contexts: those are capped at
# --max-prompt-tokens) are not remembered, and are encoded this many characters at a time:
# encoding 100,000 words at once holds about 60 MB that the allocator keeps afterwards.
PIECE_CHARS = 1 << 16
# Cached texts tried per lookup, longest first (each costs a slice and a hash of the text).
PROBES = 8
# Pre-tokens re-encoded at the end of the cached text.
RESTART_WORDS = 3
MAX_ENTRIES = 512
MAX_TOKENS = 1 << 18  # ids held over all entries (Python ints: about 9 MB)
# Texts this long are encoded with `encode_batch`, which releases the GIL while it works
# (`encode` holds it): a long text encoded on a worker thread then leaves the event loop free.
RELEASE_GIL_CHARS = 4096

_LOCAL_NORMALIZERS = {"Replace", "NFC", "NFKC", "NFD", "NFKD", "Lowercase"}
_LOCAL_PRE_TOKENIZERS = {"Split", "ByteLevel", "Whitespace", "WhitespaceSplit", "Punctuation"}
_SELF_TEST = "Ab  cd,\nef's <eos> g\n\n hij  \tk. <unk>lm n\u00e9o 12 34 x"


@dataclass(frozen=True, slots=True)
class _Entry:
    ids: list[int]
    restart_token: int  # re-encode from this token ...
    restart_char: int  # ... which starts at this character


@dataclass(frozen=True, slots=True)
class Encoded:
    """A text and its encoding, with where `PrefixEncoder.extend` re-encodes a longer text from
    (a typing session's context: the session keeps its own)."""

    text: str
    entry: _Entry  # its ids are not to be changed: the next `extend` reads them

    @property
    def ids(self) -> list[int]:
        return self.entry.ids


class PrefixEncoder:
    """`encode(text)` as `tokenizer.encode(text).ids`, faster for texts extending recent ones.

    Thread-safe (the servicer encodes long texts off the event loop).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lengths: dict[int, int] = {}  # text length -> entries of that length
        self._sorted_lengths: list[int] = []
        self._tokens = 0
        self._lock = threading.Lock()
        self.enabled = _local(tokenizer) and self._self_test()

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` (a new list)."""
        if not self.enabled or len(text) < MIN_CHARS:
            return list(self._encode(text).ids)
        if len(text) > PIECE_CHARS:
            return self._encode_in_pieces(text)
        with self._lock:
            hit, length = self._find(text)
        if hit is not None and length == len(text):
            return list(hit.ids)
        if hit is None:
            entry = _restart(self._encode(text), [], 0)
        else:
            tail = self._encode(text[hit.restart_char :])
            entry = _restart(tail, hit.ids[: hit.restart_token], hit.restart_char)
        with self._lock:
            self._store(text, entry)
        return list(entry.ids)

    def extend(self, known: Encoded | None, text: str) -> Encoded:
        """`text` encoded. When it extends `known`'s text (what this gave for a text one event
        shorter), only its part from near `known`'s end is encoded, spliced as `encode` splices
        a remembered text; else the whole of it. A typing session keeps its own `Encoded`, so
        it needs no lookup among every session's texts, nor loses its text to theirs when many
        sessions write to the shared memory of `encode`."""
        if known is not None and self._extends(known, text):
            old = known.entry
            head = old.ids[: old.restart_token]
            entry = _restart(self._encode(text[old.restart_char :]), head, old.restart_char)
        elif not self.enabled or len(text) > PIECE_CHARS:  # encoded whole again next time
            entry = _Entry(self.encode(text), 0, 0)
        else:
            entry = _restart(self._encode(text), [], 0)
        return Encoded(text, entry)

    def chars_to_encode(self, known: Encoded | None, text: str) -> int:
        """How many characters `extend(known, text)` encodes (a caller runs a long encoding
        off its event loop)."""
        if known is not None and self._extends(known, text):
            return len(text) - known.entry.restart_char
        return len(text)

    def _extends(self, known: Encoded, text: str) -> bool:
        """Whether `text` is `known`'s text and more, to be spliced in one encoding call."""
        spliced = self.enabled and text.startswith(known.text)
        return spliced and len(text) - known.entry.restart_char <= PIECE_CHARS

    def _encode(self, text: str) -> Encoding:
        if len(text) >= RELEASE_GIL_CHARS:
            return self.tokenizer.encode_batch([text], add_special_tokens=False)[0]
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_in_pieces(self, text: str) -> list[int]:
        """`text` encoded `PIECE_CHARS` at a time, each piece spliced as an extension is."""
        ids: list[int] = []
        start = 0
        while len(text) - start > PIECE_CHARS:
            piece = _restart(self._encode(text[start : start + PIECE_CHARS]), [], start)
            if piece.restart_char <= start:  # one huge word: no place to cut
                break
            ids += piece.ids[: piece.restart_token]
            start = piece.restart_char
        ids += self._encode(text[start:]).ids
        return ids

    def _find(self, text: str) -> tuple[_Entry | None, int]:
        """The longest remembered text that `text` starts with, and its length (lock held)."""
        lengths = self._sorted_lengths
        end = bisect.bisect_right(lengths, len(text))
        for length in reversed(lengths[max(0, end - PROBES) : end]):
            key = text[:length]
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry, length
        return None, 0

    def _store(self, text: str, entry: _Entry) -> None:
        """Remember `text`, evicting the least recently used texts over the bounds (lock held)."""
        old = self._entries.pop(text, None)
        if old is not None:
            self._forget(text, old)
        self._entries[text] = entry
        count = self._lengths.get(len(text), 0)
        if not count:
            bisect.insort(self._sorted_lengths, len(text))
        self._lengths[len(text)] = count + 1
        self._tokens += len(entry.ids)
        while self._entries and (len(self._entries) > MAX_ENTRIES or self._tokens > MAX_TOKENS):
            self._forget(*self._entries.popitem(last=False))

    def _forget(self, text: str, entry: _Entry) -> None:
        self._tokens -= len(entry.ids)
        count = self._lengths[len(text)] - 1
        if count:
            self._lengths[len(text)] = count
        else:
            del self._lengths[len(text)]
            self._sorted_lengths.remove(len(text))

    def _self_test(self) -> bool:
        """Whether spliced encodings equal whole ones on awkward text, at every cut (False when
        the tokenizer cannot encode it: a word-level vocabulary without `<unk>`)."""
        text = _SELF_TEST * (MIN_CHARS // len(_SELF_TEST) + 2)
        try:
            whole = self._encode(text).ids
            for cut in range(MIN_CHARS, len(text)):
                entry = _restart(self._encode(text[:cut]), [], 0)
                tail = self._encode(text[entry.restart_char :]).ids
                if entry.ids[: entry.restart_token] + tail != whole:
                    return False
        except Exception:  # tokenizers raises a bare Exception for a word it has no id for
            return False
        return True


def _restart(enc: Encoding, head: list[int], offset: int) -> _Entry:
    """The entry for ids `head + enc.ids`, where `enc` encodes the text from character `offset`.

    It restarts at the first token of `enc`'s third-to-last word, or where `enc` began.
    """
    tail = enc.ids
    ids = head + tail
    base = len(head)
    last = enc.token_to_word(len(tail) - 1) if tail else None
    if last is not None:
        word = max(0, last - (RESTART_WORDS - 1))
        tokens, chars = enc.word_to_tokens(word), enc.word_to_chars(word)
        if tokens is not None and chars is not None:
            return _Entry(ids, base + tokens[0], offset + chars[0])
    return _Entry(ids, base, offset)


def _local(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's structure is one whose encoding can be spliced (see above)."""
    spec: dict[str, Any] = json.loads(tokenizer.to_str())
    if spec.get("added_tokens"):
        return False
    return _all_of(spec.get("normalizer"), "normalizers", _LOCAL_NORMALIZERS) and _all_of(
        spec.get("pre_tokenizer"), "pretokenizers", _LOCAL_PRE_TOKENIZERS
    )


def _all_of(part: dict[str, Any] | None, members: str, allowed: set[str]) -> bool:
    if part is None:
        return True
    kind = part.get("type")
    if kind == "Sequence":
        return all(_all_of(p, members, allowed) for p in part.get(members, []))
    if kind == "ByteLevel" and part.get("add_prefix_space"):
        return False
    return kind in allowed
