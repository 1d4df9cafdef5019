"""The parts of a `PredictNext` request or a `TypingSession` event the servicer checks and
builds with: k, the word lists (blocked words and user words, bounded), the suggestions'
selection, the blocklists that apply, and the reply.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeVar

from rnnlm.v1 import language_model_pb2 as pb
from server.limits import RpcError, check_partial_word, invalid
from server.repository import LoadedModel
from server.typing import Memory, Predicted
from server.words import Filters, WordSettings, fold, read_word_list

R = TypeVar("R", pb.PredictNextResponse, pb.Suggestions)

DEFAULT_TYPING_K = 5
# The most words a request's (or a session's) blocked_words or user_words may hold (each word
# is bounded as a partial word is: `check_partial_word`).
MAX_LIST_WORDS = 1024


def check_k(k: int, model: LoadedModel, field: str) -> None:
    vocab = model.codec.vocab_size
    if not 1 <= k <= vocab:
        raise invalid(f"{field} must be in [1, {vocab}] (the vocabulary size), not {k}")


def request_words(values: Sequence[str], field: str) -> list[str]:
    """A request's list of words, checked: bounded, one word each; empty entries dropped."""
    if not values:
        return []
    if len(values) > MAX_LIST_WORDS:
        raise invalid(f"{field} has {len(values)} words; at most {MAX_LIST_WORDS}")
    for i, word in enumerate(values):
        try:
            check_partial_word(word)
        except RpcError as e:
            raise invalid(f"{field}[{i}]: {e.message.removeprefix('partial_word ')}") from e
    return [w for w in values if w]


def remember(memory: Memory, event: pb.TypingEvent) -> None:
    """Add an event's blocked and user words to its session's lists (bounded)."""
    if not event.blocked_words and not event.user_words:
        return  # most keystrokes add none
    blocked = request_words(event.blocked_words, "blocked_words")
    users = request_words(event.user_words, "user_words")
    memory.blocked |= {fold(w) for w in blocked}
    memory.user_words.extend(w for w in users if w not in memory.user_words)
    sizes = (("blocked_words", len(memory.blocked)), ("user_words", len(memory.user_words)))
    for name, size in sizes:
        if size > MAX_LIST_WORDS:
            raise invalid(f"the session's {name} would hold {size} words; at most {MAX_LIST_WORDS}")


def asks_fewest_keys(
    request: pb.PredictNextRequest | pb.TypingEvent, settings: WordSettings
) -> bool:
    """Whether `request` asks for the words that save the most keys (its `selection`; unset,
    the server's default for typing sessions, the likeliest for PredictNext)."""
    selection = request.selection
    if selection == pb.SELECTION_UNSPECIFIED:
        return isinstance(request, pb.TypingEvent) and settings.typing_fewest_keys
    if selection not in (pb.SELECTION_LIKELIEST, pb.SELECTION_FEWEST_KEYS):
        raise invalid(
            f"selection {selection} is not one of "
            + ", ".join(f"{pb.Selection.Name(v)} ({v})" for v in pb.Selection.values())
        )
    return selection == pb.SELECTION_FEWEST_KEYS


@functools.lru_cache(maxsize=64)
def blocklists(server: frozenset[str], bundle_text: str) -> frozenset[str]:
    """The server's blocked words and the bundle's blocklist file, folded: made once per
    model and server list, not on every request and keystroke."""
    return server | read_word_list(bundle_text)


@functools.lru_cache(maxsize=64)
def unfiltered(base: frozenset[str]) -> Filters:
    """The filters of a call that adds no blocked words and no user words to `base`: made
    once per blocklist, not on every call (they are immutable)."""
    return Filters(base)


def suggested(kind: type[R], predicted: Predicted, context_tokens: int) -> R:
    """A reply (`PredictNextResponse` or `Suggestions`) with `predicted`'s suggestions, added
    in place: predictions built apart and passed in are each copied (2 to 4 times the work)."""
    reply = kind(context_tokens=context_tokens, words=predicted.words, model_steps=predicted.steps)
    add = reply.predictions.add
    for s in predicted.suggestions:
        token_id = s.ids[0] if len(s.ids) == 1 else -1
        if predicted.words:  # searched words list their pieces; a token's id says it all
            add(token=s.text, token_id=token_id, probability=s.probability, token_ids=s.ids)
        else:
            add(token=s.text, token_id=token_id, probability=s.probability)
    return reply
