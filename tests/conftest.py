"""Session-wide fixtures: a tiny corpus, tiny trained checkpoints and tiny exported bundles.

Everything is built under pytest's temporary directory in seconds, so the suite runs on a fresh
clone. Checkpoints and bundles are cached per (cell, tokenizer) for the whole session. torch is
imported only when a fixture trains, so tests that need no model stay torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.bundle import Bundle, load_bundle

_SUBJECTS = ("the cat", "a dog", "the bird", "my friend", "the old man", "a child")
_VERBS = ("sees", "likes", "follows", "finds", "hears", "calls")
_OBJECTS = ("the ball", "a tree", "the river", "the moon", "a red house", "the small boat")


def tiny_text(lines: int = 240) -> str:
    """A few KB of lines with a fixed grammar: a model learns it in seconds."""
    out = []
    for i in range(lines):
        s = _SUBJECTS[i % len(_SUBJECTS)]
        v = _VERBS[(i // 2) % len(_VERBS)]
        o = _OBJECTS[(i * 5) % len(_OBJECTS)]
        out.append(f"{s} {v} {o} .")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(tiny_text(), encoding="utf-8")
    return path


def _train_checkpoint(corpus: Path, out: Path, cell: str, tokenizer: str) -> Path:
    """Really train a tiny model (about a second) and write its checkpoint directory."""
    import torch

    from training.train import TrainOptions, train

    torch.set_num_threads(1)

    options = TrainOptions(
        corpus=corpus,
        out=out,
        tokenizer=tokenizer,
        vocab_size=300 if tokenizer == "bpe" else None,
        cell=cell,
        layers=2,
        hidden=16,
        embedding=16,
        dropout=0.0,
        tied=cell == "lstm",
        bptt=16,
        batch_size=8,
        epochs=4,
        # ReLU RNNs diverge at 1e-2 on this corpus.
        lr=0.005 if cell == "rnn_relu" else 0.01,
        seed=0,
        threads=1,
        quiet=True,
    )
    return train(options)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(
    tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """`factory(cell, tokenizer="word")` -> a trained checkpoint directory, cached per argument."""
    cache: dict[tuple[str, str], Path] = {}

    def factory(cell: str, tokenizer: str = "word") -> Path:
        key = (cell, tokenizer)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{cell}-{tokenizer}") / "checkpoint"
            cache[key] = _train_checkpoint(tiny_corpus, out, cell, tokenizer)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_bundle_factory(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """`factory(cell, tokenizer="word")` -> an exported bundle directory, cached per argument.

    The bundle is named `tiny-{cell}-{tokenizer}`, version "1".
    """
    from exporter.export import export_bundle

    cache: dict[tuple[str, str], Path] = {}

    def factory(cell: str, tokenizer: str = "word") -> Path:
        key = (cell, tokenizer)
        if key not in cache:
            name = f"tiny-{cell}-{tokenizer}"
            target = tmp_path_factory.mktemp(f"bundle-{cell}-{tokenizer}") / name
            cache[key] = export_bundle(tiny_checkpoint_factory(cell, tokenizer), target, name=name)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def int8_bundle(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny word-level LSTM exported with int8 weights (read only: copy it to change it)."""
    from exporter.export import export_bundle

    target = tmp_path_factory.mktemp("int8") / "tiny-lstm-int8"
    return export_bundle(tiny_checkpoint_factory("lstm"), target, quantize="int8")


@pytest.fixture(scope="session")
def default_bundle(tiny_bundle_factory: Callable[..., Path]) -> Path:
    """A tiny word-level LSTM bundle (name `tiny-lstm-word`, version "1")."""
    return tiny_bundle_factory("lstm", "word")


# The cells of the engine's tests (tests/test_engine.py and the files that run them again).
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


@pytest.fixture(scope="module", params=CELLS)
def bundle(request: pytest.FixtureRequest, tiny_bundle_factory: Callable[..., Path]) -> Bundle:
    """A tiny word-level bundle of each cell, loaded as the server loads it."""
    return load_bundle(tiny_bundle_factory(request.param, "word"))


@pytest.fixture(scope="module")
def lstm(tiny_bundle_factory: Callable[..., Path]) -> Bundle:
    """The tiny word-level LSTM bundle, loaded as the server loads it."""
    return load_bundle(tiny_bundle_factory("lstm", "word"))
