"""A generation's tokens decoded several at a time give the text they give one at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server.bundle import load_bundle
from server.text import TextCodec


@pytest.mark.parametrize("tokenizer", ["word", "char", "bpe"])
def test_tokens_decoded_together_give_the_same_text(
    tiny_bundle_factory: Callable[..., Path], tokenizer: str
) -> None:
    codec = TextCodec(load_bundle(tiny_bundle_factory("lstm", tokenizer)))
    rng = np.random.default_rng(0)
    grouped_texts = 0
    for _ in range(60):
        context = rng.integers(0, codec.vocab_size, 5).tolist()
        ids = rng.integers(0, codec.vocab_size, 40)
        ids[rng.random(40) < 0.15] = codec.eos_id  # newlines among the words
        alone = codec.detokenizer(context)
        together = codec.detokenizer(context)
        start = 0
        while start < len(ids):
            group = ids[start : start + int(rng.integers(1, 17))].tolist()
            start += len(group)
            expected = "".join(alone.push(i) for i in group)
            assert together.push_many(group) == expected, (context, ids.tolist())
            grouped_texts += len(group) > 1 and expected != ""
        assert together.flush() == alone.flush()
    assert grouped_texts > 100
