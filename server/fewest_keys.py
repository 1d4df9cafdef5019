"""Which k words to show a typist: those that save the most keys, not only the likeliest.

A keyboard shows k suggestions. The typist takes the word it wants with one tap once it is
shown, and else types its next letter and sees the suggestions for the longer partial word.
The context does not change while a word's letters are typed, so every later letter's
suggestions come from the same probabilities, filtered to the words that still match. A slot
given now to a word that the next letter would show anyway saves one key; given to a word
that would stay hidden for three more letters, it saves four. So, taking the candidates'
probabilities as the truth, the keys a typist expects to spend are least when every node of
the trie of their letters shows the k words below it with the most

    gain(w) = p(w) * keys(w, after the next letter)

where keys(w, v), the keys left to type w once the letters of node v are typed, is

    1                        when w is shown at v (the tap), or w is v (its separator)
    1 + keys(w, v + next)    else (the letter, then the next node's keys)

worked out from the leaves up (the choice at a node changes no node below it):

    typed "t"        shown at "t": the k of {the, that, thou, thy, this, ...} with most gain
      ├── "th"       shown at "th": the k of {the, that, thou, thy, this, ...}
      │     ├── "tha" ...
      │     └── "the" ... "the" itself is this node's word: its separator ends it, a slot
      │                  gains it nothing
      └── "to" ...

A word that is the letters typed so far gains nothing from a slot (the tap costs what its
separator does), nor does a node's only k words compete: they are all shown.
"""

from __future__ import annotations

from collections.abc import Sequence


def fewest_keys(words: Sequence[tuple[str, float]], typed: int, k: int) -> list[int]:
    """The indices of the at most k of `words` to show now, most gain first.

    `words`: (key, probability) pairs, each key the word as matched (case- and accent-folded
    when matching folds) and starting with the `typed` letters typed so far; keys are unique.
    Fewer than k when fewer words than k are longer than the letters typed; the caller fills
    the rest (with the likeliest)."""
    order = sorted(range(len(words)), key=[key for key, _ in words].__getitem__)
    keys = [words[i][0] for i in order]
    probs = [words[i][1] for i in order]
    keys_left = [1.0] * len(keys)
    shown = _shown(keys, probs, keys_left, 0, len(keys), typed, k)
    return [order[j] for j in shown]


def _shown(
    keys: list[str],
    probs: list[float],
    keys_left: list[float],
    lo: int,
    hi: int,
    depth: int,
    k: int,
) -> list[int]:
    """The words shown at the node of `keys[lo:hi]` (sorted, sharing their first `depth`
    letters), most gain first; `keys_left` updated to each word's keys from this node."""
    while lo < hi and len(keys[lo]) == depth:
        lo += 1  # the node's own word: it sorts first, and never needs a slot
    if hi - lo <= k:
        return list(range(lo, hi))  # all shown: one key (the tap) each, as they start
    child = lo
    while child < hi:  # the children, each a run of words with the same next letter
        letter, end = keys[child][depth], child + 1
        while end < hi and keys[end][depth] == letter:
            end += 1
        if end - child > k:  # else all its words are shown there: their keys stay 1
            _shown(keys, probs, keys_left, child, end, depth + 1, k)
        child = end
    # Most gain, then likeliest, then first in `keys` (a stable sort keeps the order of ties;
    # the gains made first, so that sorting calls no Python function a word).
    gains = [(probs[j] * keys_left[j], probs[j]) for j in range(lo, hi)]
    shown = [lo + j for j in sorted(range(hi - lo), key=gains.__getitem__, reverse=True)[:k]]
    for j in range(lo, hi):
        keys_left[j] += 1.0
    for j in shown:
        keys_left[j] = 1.0
    return shown
