"""A word model's words outside its vocabulary, suggested through `<unk>`, on a real server.

The tiny word model's bundle gets the unknown words of a text with words it lacks
(`exporter.unknown_words`): their probabilities are checked against the model itself, `<unk>`'s
log-prob read from Score (the text's unknown word is scored as `<unk>`), and the words go
through the blocklist, user words, case-insensitive matching and a typing session as the
vocabulary's words do.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_server import LiveServer, config
from tokenizers import Tokenizer

from exporter.export import ExportError, export_bundle
from exporter.unknown_words import UnknownWordsError, add_to_bundle, unknown_words_of
from exporter.unknown_words import main as unknown_words_main
from rnnlm.bundle import add_unknown_words
from rnnlm.cli import main
from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from server import oov_words
from server.bundle import BundleError, load_bundle
from server.text import TextCodec
from server.word_cache import vocab_known
from server.words import Filters, Matcher, Word

WITH, WITHOUT = "tiny-with-unknown", "tiny-without-unknown"
SINGLETONS = "tiny-with-singletons"  # its unknown words list "tree", a vocabulary word, too
CONTEXT = "the cat sees "
# The tiny corpus's words, with three it lacks: "zebra" twice, "zeppelin" and "tiger" once.
TRAINING = "the cat sees the zebra .\na dog likes the zebra .\nthe zeppelin sees a tiger .\n"
COUNTS = {"zebra": 2, "zeppelin": 1, "tiger": 1}
UNK_TOKENS = 4  # the text's <unk> tokens: those four words


@pytest.fixture(scope="module")
def models(
    tiny_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny word model twice: with the unknown words of TRAINING, and without."""
    root = tmp_path_factory.mktemp("oov-models")
    for name in (WITH, WITHOUT, SINGLETONS):
        shutil.copytree(tiny_bundle_factory("lstm", "word"), root / name)
        manifest = json.loads((root / name / "manifest.json").read_text())
        (root / name / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    assert add_to_bundle(root / WITH, TRAINING) == len(COUNTS)
    add_unknown_words(root / SINGLETONS, "tree\t3.5\nzebra\t0.5\n", UNK_TOKENS)
    return root


@pytest.fixture(scope="module")
def live(models: Path) -> Iterator[LiveServer]:
    server = LiveServer(config(models, default_model=WITH))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[Client]:
    with Client(live.target, timeout=60) as c:
        yield c


def _logprob(client: Client, word: str, model: str = WITH) -> float:
    """The model's log-prob of `word`'s token after CONTEXT (`<unk>`'s for a word it lacks)."""
    request = [CONTEXT + word + "\n"]
    (scored,) = client.score(request, return_token_logprobs=True, model=model).results
    return scored.token_logprobs[-2].logprob


def test_the_bundle_lists_the_words_it_learned_as_unk(models: Path) -> None:
    bundle = load_bundle(models / WITH)
    assert bundle.unk_tokens == UNK_TOKENS
    lines = bundle.unknown_words.splitlines()
    assert lines == ["zebra\t2", "tiger\t1", "zeppelin\t1"]  # most frequent first


def test_unknown_words_get_unk_probability_shared_by_their_counts(client: Client) -> None:
    reply = client.predict_next(CONTEXT, k=5, partial_word="z", model=WITH)
    got = {p.token: p for p in reply.predictions}
    assert list(got) == ["zebra", "zeppelin"]  # the tiny vocabulary has no word in "z"
    assert all(p.token_id == -1 for p in got.values())
    unk = math.exp(_logprob(client, "zebra"))
    assert _logprob(client, "zebra") == pytest.approx(_logprob(client, "tiger"))  # both <unk>
    expected = {w: unk * COUNTS[w] / UNK_TOKENS for w in ("zebra", "zeppelin")}
    total = sum(expected.values())  # the matching mass: these two alone
    for word, p in expected.items():
        assert got[word].probability == pytest.approx(p / total, rel=1e-4)


def test_they_share_the_matching_mass_with_the_vocabulary(client: Client) -> None:
    """After "t": the vocabulary's "the" and "tree" and the unknown "tiger", each its own
    probability over the mass of all that match (the vocabulary's and tiger's)."""
    reply = client.predict_next(CONTEXT, k=20, partial_word="t", model=WITH)
    got = {p.token: p.probability for p in reply.predictions}
    assert "tiger" in got
    probs = {w: math.exp(_logprob(client, w)) for w in got if w != "tiger"}
    probs["tiger"] = math.exp(_logprob(client, "tiger")) * COUNTS["tiger"] / UNK_TOKENS
    total = sum(probs.values())
    for word, p in probs.items():
        assert got[word] == pytest.approx(p / total, rel=1e-3)
    plain = client.predict_next(CONTEXT, k=20, partial_word="t", model=WITHOUT)
    assert "tiger" not in {p.token for p in plain.predictions}


def test_a_vocabulary_word_seen_once_adds_its_share_of_unk(client: Client) -> None:
    """ "tree" is the vocabulary's and, in this bundle, was <unk> 3.5 times in training."""
    reply = client.predict_next(CONTEXT, k=20, partial_word="t", model=SINGLETONS)
    got = {p.token: p for p in reply.predictions}
    unk = math.exp(_logprob(client, "zebra", SINGLETONS))
    probs = {w: math.exp(_logprob(client, w, SINGLETONS)) for w in got}
    probs["tree"] += unk * 3.5 / UNK_TOKENS  # about 6 % more than its token's own
    total = sum(probs.values())
    assert got["tree"].token_id != -1  # still the vocabulary's token
    for word, p in probs.items():
        assert got[word].probability == pytest.approx(p / total, rel=1e-3)


def test_without_the_file_nothing_changes(client: Client) -> None:
    assert not client.predict_next(CONTEXT, k=5, partial_word="z", model=WITHOUT).predictions
    with_file = client.predict_next(CONTEXT, k=5, model=WITH)
    without = client.predict_next(CONTEXT, k=5, model=WITHOUT)
    assert [(p.token, p.probability) for p in with_file.predictions] == [
        (p.token, p.probability) for p in without.predictions
    ]


def test_blocked_user_and_folded_unknown_words(client: Client) -> None:
    blocked = client.predict_next(CONTEXT, k=5, partial_word="z", blocked_words=["ZEBRA"])
    assert [p.token for p in blocked.predictions] == ["zeppelin"]
    assert blocked.predictions[0].probability == pytest.approx(1.0)  # the only one left
    boosted = client.predict_next(CONTEXT, k=5, partial_word="z", user_words=["zeppelin"])
    assert [p.token for p in boosted.predictions] == ["zeppelin", "zebra"]
    folded = client.predict_next(CONTEXT, k=5, partial_word="Ze", fold_case=True)
    assert [p.token for p in folded.predictions] == ["Zebra", "Zeppelin"]
    exact = client.predict_next(CONTEXT, k=5, partial_word="Ze", fold_case=False)
    assert not exact.predictions


def test_a_typing_session_suggests_them_without_a_model_step(client: Client) -> None:
    events = [
        pb.TypingEvent(model=WITH, reset=True, text=CONTEXT, k=3),
        pb.TypingEvent(partial_word="z", k=3),
        pb.TypingEvent(partial_word="zep", k=3),
    ]
    replies = list(client.typing_session(events))
    assert [p.token for p in replies[1].predictions] == ["zebra", "zeppelin"]
    assert [p.token for p in replies[2].predictions] == ["zeppelin"]
    assert [r.model_steps for r in replies] == [1, 0, 0]


def test_unknown_words_of_counts_the_words_seen_once_with_unk_replace() -> None:
    tokenizer = Tokenizer.from_str(
        json.dumps(
            {
                "version": "1.0",
                "model": {
                    "type": "WordLevel",
                    "vocab": {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3},
                    "unk_token": "<unk>",
                },
                "normalizer": {
                    "type": "Replace",
                    "pattern": {"String": "\n"},
                    "content": " <eos> ",
                },
                "pre_tokenizer": {
                    "type": "Split",
                    "pattern": {"Regex": r"<eos>|<unk>|\w+|[^\w\s]"},
                    "behavior": "Removed",
                    "invert": True,
                },
            }
        )
    )
    specials = {"unk": 0, "eos": 1}
    text = "a a b c c d\n"  # b seen once (in the vocabulary), c twice and d once (outside)
    assert unknown_words_of(tokenizer, specials, text, 0.0) == ("c\t2\nd\t1\n", 3)
    assert unknown_words_of(tokenizer, specials, text, 1.0) == ("c\t2\nb\t1\nd\t1\n", 4)
    assert unknown_words_of(tokenizer, specials, text, 0.5) == ("c\t2\nd\t1\nb\t0.5\n", 4)
    with pytest.raises(UnknownWordsError, match="no word the model learned as <unk>"):
        unknown_words_of(tokenizer, specials, "a a b b\n", 0.0)


def test_export_writes_them_for_word_models_only(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path
) -> None:
    bundle = export_bundle(
        tiny_checkpoint_factory("lstm"), tmp_path / "word", unknown_words=TRAINING
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["unknown_words"] == {"file": "unknown_words.txt", "unk_tokens": UNK_TOKENS}
    assert load_bundle(bundle).unknown_words.splitlines()[0] == "zebra\t2"
    with pytest.raises(ExportError, match="for word models"):
        export_bundle(
            tiny_checkpoint_factory("gru", "char"), tmp_path / "char", unknown_words=TRAINING
        )
    assert not (tmp_path / "char").exists()


@pytest.mark.parametrize(
    ("text", "unk_tokens", "problem"),
    [
        ("zebra 2\n", 4, "line 1 must be a word, a tab and a positive count"),
        ("zebra\t0\n", 4, "line 1 must be a word, a tab and a positive count"),
        ("zebra\t2\n\nzebra\t1\n", 4, "line 3: 'zebra' is listed twice"),
        ("zebra\t3\ntiger\t2\n", 4, "add up to 5, more than the manifest's"),
        ("x" * 500 + "\tnan\n", 4, r"\.\.\. \(504 characters\)"),
    ],
)
def test_a_bad_unknown_words_file_is_refused_in_one_line(
    default_bundle: Path, tmp_path: Path, text: str, unk_tokens: int, problem: str
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle, bundle)
    add_unknown_words(bundle, text, unk_tokens)
    with pytest.raises(BundleError, match=problem) as caught:
        load_bundle(bundle)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_the_cli_takes_the_training_text(
    tiny_checkpoint_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = tmp_path / "train.txt"
    text.write_text(TRAINING, encoding="utf-8")
    target = tmp_path / "word"
    args = [str(tiny_checkpoint_factory("lstm")), str(target), "--unknown-words", str(text)]
    assert main(["export", *args]) == 0
    assert load_bundle(target).unk_tokens == UNK_TOKENS
    missing = [str(tiny_checkpoint_factory("lstm")), str(tmp_path / "other")]
    assert main(["export", *missing, "--unknown-words", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rnnlm export: error: --unknown-words ") and "\n" not in err
    assert not (tmp_path / "other").exists()


def test_adding_them_to_a_written_bundle_is_for_word_models(
    tiny_bundle_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = tmp_path / "train.txt"
    text.write_text(TRAINING, encoding="utf-8")
    char = tmp_path / "char"
    shutil.copytree(tiny_bundle_factory("gru", "char"), char)
    assert unknown_words_main([str(char), str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"unknown words: error: {char}: unknown words are for word models only"
    assert not (char / "unknown_words.txt").exists()


def test_the_word_cache_finds_unknown_words_with_their_share(models: Path) -> None:
    """A cached word that is not among the candidates is looked up with its share of <unk>."""
    bundle = load_bundle(models / SINGLETONS)
    codec = TextCodec(bundle)
    logprobs = np.full(codec.vocab_size, math.log(1 / codec.vocab_size), dtype=np.float32)
    unk = math.log(0.01)
    logprobs[codec.unk_id] = unk
    unknown = oov_words.after(bundle, codec, logprobs)
    assert unknown is not None
    known = unknown.lookup(vocab_known(codec, logprobs))
    assert known("zebra") == Word("zebra", pytest.approx(unk + math.log(0.5 / UNK_TOKENS)), ())
    tree = codec.tokenizer.token_to_id("tree")
    both = math.log(1 / codec.vocab_size + 0.01 * 3.5 / UNK_TOKENS)
    assert known("tree") == Word("tree", pytest.approx(both), (tree,))
    assert known("moon").logprob == pytest.approx(math.log(1 / codec.vocab_size))
    assert known("tiger").logprob == -math.inf  # not this bundle's


def test_a_vocabulary_word_found_among_the_unknown_keeps_its_token(models: Path) -> None:
    """ "tree" is not among the model's candidates here but ranks through its share of
    <unk>: it joins with its token and its token's probability as well."""
    bundle = load_bundle(models / SINGLETONS)
    codec = TextCodec(bundle)
    logprobs = np.full(codec.vocab_size, math.log(0.001), dtype=np.float32)
    logprobs[codec.unk_id] = math.log(0.5)
    unknown = oov_words.after(bundle, codec, logprobs)
    assert unknown is not None
    known = unknown.lookup(vocab_known(codec, logprobs))
    the = Word("the", math.log(0.1), (codec.tokenizer.token_to_id("the"),))
    words, total = unknown.add([the], math.log(0.1), known, Matcher("t", False), Filters(), 1)
    tree = codec.tokenizer.token_to_id("tree")
    assert words == [the, Word("tree", pytest.approx(math.log(0.001 + 0.5 * 3.5 / 4)), (tree,))]
    assert total == pytest.approx(math.log(0.1 + 0.5 * 3.5 / 4))
