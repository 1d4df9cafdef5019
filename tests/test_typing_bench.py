"""The typing benchmark's accounting: a scripted typist, then `rnnlm bench --typing` on tiny
bundles through a real server. Timings are never checked; counts and their consistency are.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.typing import (
    CONTEXT_CHARS,
    LETTER,
    OPEN,
    SEPARATOR,
    TAP,
    TYPIST_SPACING,
    HeldOut,
    Key,
    Tally,
    summary,
    typist,
)
from rnnlm.cli import main
from rnnlm.v1 import language_model_pb2 as pb
from tests.conftest import tiny_text

# The scripted keyboard's vocabulary, most likely first: it suggests the first k that start
# with what was typed of the word.
VOCABULARY = ("the", "cat", "sun", "sees", "moon")


def scripted(text: str, k: int) -> tuple[list[Key], Tally]:
    """Type `text` against the scripted keyboard: every key sent, and the tally."""
    tally = Tally()
    keys = typist("a context\n", text, k, tally)
    sent = [next(keys)]
    try:
        while True:
            shown = [w for w in VOCABULARY if w.startswith(sent[-1].partial)][:k]
            sent.append(keys.send(shown))
    except StopIteration:
        return sent, tally


def test_scripted_typist_counts_every_key() -> None:
    text = "the cat sees the zoo moon.\n"
    sent, tally = scripted(text, k=3)
    # the, cat: taken at once (with their spaces); sees: after "s"; the: at once; zoo: typed in
    # full (never suggested) and sent with the space after it; moon: after "m", no space follows
    # (the keyboard's space would be taken back before "."); then "." and the line end.
    assert [(key.text, key.partial, key.kind) for key in sent] == [
        ("a context\n", "", OPEN),
        ("the ", "", TAP),
        ("cat ", "", TAP),
        ("", "s", LETTER),
        ("sees ", "", TAP),
        ("the ", "", TAP),
        ("", "z", LETTER),
        ("", "zo", LETTER),
        ("", "zoo", LETTER),
        ("zoo ", "", SEPARATOR),
        ("", "m", LETTER),
        ("moon", "", TAP),
        (".", "", SEPARATOR),
        ("\n", "", SEPARATOR),
    ]
    # The session's context is always a prefix of the text; at the end, the text.
    assert "".join(key.text for key in sent[1:]) == text
    figures = summary(tally)
    assert (figures["chars"], figures["keys_used"]) == (27, 13)
    assert (figures["letters"], figures["separators"], figures["taps"]) == (5, 3, 5)
    assert figures["keystroke_savings"] == pytest.approx(1 - 13 / 27)
    # Taken: the, cat, sees, the, moon (17 letters), "s" and "m" of them typed.
    assert (figures["free_spaces"], figures["letters_saved"]) == (4, 17 - 2)
    # At the word start the, cat, sun are shown: "the" twice first, "cat" among three.
    assert figures["words"] == 6
    assert figures["next_word_top1"] == pytest.approx(2 / 6)
    assert figures["next_word_top3"] == pytest.approx(3 / 6)
    # All six have 3 letters or more; all but "zoo" were taken with at most one letter typed.
    assert figures["completion_after_1"] == pytest.approx(5 / 6)
    assert figures["completion_after_2"] == pytest.approx(5 / 6)


def test_one_suggestion_saves_less() -> None:
    _, three = scripted("the cat sees the moon.\n", k=3)
    _, one = scripted("the cat sees the moon.\n", k=1)
    assert one.keys > three.keys
    assert one.chars == three.chars


def _held_out_typed(lines: int) -> str:
    """What the quick run types of the tiny corpus: the first `lines` of its last 5%."""
    corpus = tiny_text().removesuffix("\n").split("\n")
    held = corpus[-round(len(corpus) * 0.05) :]
    return "\n".join(held[:lines]) + "\n"


@pytest.fixture(scope="module", params=["word", "char"])
def typing_run(
    request: pytest.FixtureRequest,
    tiny_bundle_factory: Callable[..., Path],
    tiny_corpus: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    bundle = tiny_bundle_factory("lstm", request.param)
    out = tmp_path_factory.mktemp(f"typing-{request.param}")
    argv = ["bench", "--typing", "--quick", "--bundle", str(bundle), "--text", str(tiny_corpus)]
    assert main([*argv, "--typing-lines", "4", "--out", str(out)]) == 0
    assert (out / "typing.md").read_text(encoding="utf-8").startswith("# Typing benchmark")
    result: dict[str, Any] = json.loads((out / "typing.json").read_text(encoding="utf-8"))
    return result


def test_the_typist_types_the_held_out_lines(typing_run: dict[str, Any]) -> None:
    t = typing_run["typist"]
    assert t["chars"] == len(_held_out_typed(4))
    assert t["keys_used"] == t["letters"] + t["separators"] + t["taps"]
    # Every character is a key typed, or inserted by a tap.
    assert t["chars"] == t["letters"] + t["letters_saved"] + t["separators"] + t["free_spaces"]
    assert t["keystroke_savings"] == pytest.approx(1 - t["keys_used"] / t["chars"])
    assert t["taps"] <= t["words"]
    assert 0 <= t["next_word_top1"] <= t["next_word_top3"] <= 1
    # Each over its own words (longer than 1, longer than 2 letters): no order between them.
    assert 0 <= t["completion_after_1"] <= 1 and 0 <= t["completion_after_2"] <= 1
    # One latency per keystroke, split into the keys that only extend the word and the rest.
    lat = t["latency_ms"]
    assert lat["extending"]["n"] == t["letters"]
    assert lat["other"]["n"] == t["separators"] + t["taps"]
    assert lat["all"]["n"] == t["keys_used"]
    assert "--typing" in typing_run["command"] and "--text" in typing_run["command"]


def test_the_typist_is_shown_the_fewest_keys_and_the_likeliest(typing_run: dict[str, Any]) -> None:
    """The typists are shown the words that save the most keys (the default selection); the
    single typist's text is typed again shown the likeliest, for its savings beside."""
    assert typing_run["selection"] == "fewest-keys" and typing_run["k_asked"] == typing_run["k"]
    t, other = typing_run["typist"], typing_run["other_selection"]
    assert other["selection"] == "likeliest" and other["chars"] == t["chars"]
    assert other["keystroke_savings"] == pytest.approx(1 - other["keys_used"] / other["chars"])
    assert "--typing-selection fewest-keys" in typing_run["command"]


@pytest.mark.skipif(
    "model_steps" not in pb.Suggestions.DESCRIPTOR.fields_by_name,
    reason="this API has no Suggestions.model_steps yet",
)
def test_model_steps_are_counted_per_keystroke(typing_run: dict[str, Any]) -> None:
    t = typing_run["typist"]
    steps = t["model_steps"]
    assert steps is not None, "the server reports Suggestions.model_steps"
    assert steps["extending"]["keystrokes"] == t["letters"]
    assert steps["other"]["keystrokes"] == t["separators"] + t["taps"]
    # A keystroke that changes the context runs the model at least once.
    assert steps["other"]["keystrokes_with_steps"] >= 1


def test_the_concurrency_search_is_consistent(typing_run: dict[str, Any]) -> None:
    c = typing_run["concurrency"]
    assert c["trials"], "at least one concurrency trial ran"
    within = [trial["typists"] for trial in c["trials"] if trial["within"]]
    assert c["largest_within"] == max(within, default=0)
    for trial in c["trials"]:
        assert trial["failed_typists"] == 0
        assert trial["keystrokes"] > 0
    # Each trial's typists start where the last trial's ended: none retypes an earlier text.
    held = typing_run["text"]["held_out_lines"]
    assert c["trials"][0]["first_line"] == 0
    for before, after in itertools.pairwise(c["trials"]):
        step = before["typists"] * TYPIST_SPACING
        assert after["first_line"] == (before["first_line"] + step) % held
    statuses = {r["target"]: r["status"] for r in typing_run["targets"]}
    assert set(statuses.values()) <= {"PASS", "FAIL", "n/a"}
    assert len(statuses) == 4  # savings with each selection, the steps, the typists


def test_the_transport_floor_is_measured_beside_the_server(typing_run: dict[str, Any]) -> None:
    """gRPC's own CPU a keystroke (a bidirectional echo at the typists' pace) is reported with
    its share of the server's CPU an event."""
    floor, c = typing_run["echo_session"], typing_run["concurrency"]
    assert floor["sessions"] == max(c["largest_within"], typing_run["plan"]["first_n"])
    assert floor["messages"] > 0
    # /proc counts CPU in clock ticks (10 ms): a quick run's few messages may read as 0.
    assert floor["server_cpu_ms_per_message"] >= 0 and floor["client_cpu_ms_per_message"] > 0
    if c["server_cpu_ms_per_event"]:
        assert floor["share_of_server"] == pytest.approx(
            floor["server_cpu_ms_per_message"] / c["server_cpu_ms_per_event"]
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--text", "none.txt"], "--text none.txt: no such file"),
        (["--suggestions", "0"], "--suggestions 0: must be at least 1"),
        (["--typing-lines", "0"], "--typing-lines 0: must be at least 1"),
        (["--checkpoint", "runs/x"], "does not use --checkpoint: leave it out"),
    ],
)
def test_bad_typing_options_are_refused(
    default_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--typing", "--bundle", str(default_bundle), *extra, "--out", "out"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err) < 300


def test_the_held_out_lines_and_their_contexts() -> None:
    text = "".join(f"line {i} of the text\n" for i in range(100))
    held = HeldOut.of(text, "test", "word", 3)
    assert held.lines == [f"line {i} of the text" for i in range(95, 100)]
    assert held.first_line == 96
    context, typed = held.passage(1, 6)  # wraps around the held-out lines
    assert typed == "".join(f"line {i} of the text\n" for i in (96, 97, 98, 99, 95, 96))
    # The context is the text just before, from a line start, at most CONTEXT_CHARS long.
    assert text[: text.index("line 96 ")].endswith(context)
    assert context.startswith("line ") and len(context) <= CONTEXT_CHARS
    assert held.ask == 3 + 5  # a word model also predicts punctuation
    assert HeldOut.of(text, "test", "char", 3).ask == 3


def test_a_long_text_opens_the_session_again_at_a_line_end() -> None:
    text = "".join(f"the cat sees line {i}\n" for i in range(400))  # 8,690 characters
    sent, tally = scripted(text, k=3)
    opens = [i for i, key in enumerate(sent) if key.kind == OPEN]
    assert len(opens) == 3  # at the start, then past 4,000 characters, twice
    typed = ""
    for i, key in enumerate(sent[1:], start=1):
        if key.kind == OPEN:
            # It opens on the text typed so far, from a line start, at most CONTEXT_CHARS.
            assert typed.endswith(key.text) and key.text.startswith("the cat")
            assert len(key.text) <= CONTEXT_CHARS and sent[i - 1].text.endswith("\n")
        else:
            typed += key.text
    assert typed == text
    assert tally.chars == len(text)
