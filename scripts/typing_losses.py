"""Where the typing benchmark's typist loses keys, word by word, per category.

Runs the benchmark's typist (benchmarks/typing.py) on one `rnnlm serve` of a bundle, records
for every word how many letters were typed before it was taken (or that it was typed in full),
and splits the keys lost against a perfect keyboard (every word taken with one tap before its
first letter) by what kind of word it was: outside the word model's vocabulary or the character
model's lexicon (it can never be suggested), capitalised at a sentence start or elsewhere, one
letter long, and how many letters the rest needed. Separators (spaces, punctuation, line ends)
are keys no suggestion saves, apart from the space a tap adds: they bound savings from above.

    python scripts/typing_losses.py --bundle models/shakespeare-word \\
        --text /work/shared/data/tinyshakespeare/input.txt --lines 500

`--valid` types the validation lines (the last 5 % of those before the held-out ones, as
scripts/tune_word_cache.py), for tuning; `--flags` passes `rnnlm serve` flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, serve_args, wait_serving
from benchmarks.typing import (
    SELECTIONS,
    HeldOut,
    Tally,
    TypingPlan,
    read_text,
    summary,
    type_passage,
    typist,
)
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import Bundle, load_bundle

# A word starts a sentence after the text's start or a line end, or after these and a space.
SENTENCE_END = re.compile(r"(^|[.!?:;]\s+|\n)$")


@dataclass
class Recording(Tally):
    """A tally that also keeps each word and the letters typed before it was taken."""

    taken: list[tuple[str, int | None]] = field(default_factory=list)

    def word(self, word: str, shown: Sequence[str], taken_after: int | None) -> None:
        super().word(word, shown, taken_after)
        self.taken.append((word, taken_after))


def known_words(bundle: Bundle) -> frozenset[str] | None:
    """The words the bundle can suggest at all: a word model's vocabulary, a lexicon's words."""
    if bundle.tokenizer_kind == "word":
        return frozenset(bundle.tokenizer.get_vocab())
    return frozenset(bundle.lexicon.split()) if bundle.lexicon else None


def category(word: str, before: str, known: frozenset[str] | None) -> str:
    """The first category `word` falls in, typed after `before`."""
    if known is not None and word not in known:
        return "unknown to the bundle"
    if len(word) == 1:
        return "one letter"
    if word[0].isupper():
        return "capital, sentence start" if SENTENCE_END.search(before) else "capital, inside"
    return "lower case"


def breakdown(
    text: str,
    taken: list[tuple[str, int | None]],
    words: re.Pattern[str],
    known: frozenset[str] | None,
) -> dict[str, Any]:
    """Keys lost against a perfect keyboard, by category and by letters typed."""
    lost: Counter[str] = Counter()
    count: Counter[str] = Counter()
    after: Counter[str] = Counter()
    matches = list(words.finditer(text))
    assert len(matches) == len(taken), "the typist's words and the text's differ"
    for m, (word, typed) in zip(matches, taken, strict=True):
        space = text.startswith(" ", m.end())
        ideal = len(word) - 1 + space  # one tap, and the space it adds
        got = len(word) - typed - 1 + space if typed is not None else 0
        cat = category(word, text[: m.start()], known)
        lost[cat] += ideal - got
        count[cat] += 1
        after["typed in full" if typed is None else f"after {min(typed, 3)}"] += 1
    chars = len(text)
    letters = sum(len(m.group()) for m in matches)
    free = sum(text.startswith(" ", m.end()) for m in matches)
    return {
        "chars": chars,
        "perfect_savings": round((letters + free - len(matches)) / chars, 4),
        "separators": chars - letters,
        "lost_keys": {c: [count[c], lost[c], round(lost[c] / chars, 4)] for c in sorted(lost)},
        "taken": dict(sorted(after.items())),
    }


async def measure(bundle_dir: Path, held: HeldOut, plan: TypingPlan, flags: list[str]) -> dict:
    bundle = load_bundle(bundle_dir)
    child = ChildServer(
        "rnnlm", serve_args(bundle_dir, True, tuple(flags)), PORT_RE, start_seconds=READY_SECONDS
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel:
            await wait_serving(channel, child)
            cpu = child.cpu_seconds()
            context, text = held.passage(0, min(plan.lines, len(held.lines)))
            tally = Recording()
            keys = typist(context, text, plan.k, tally, held.words)
            await type_passage(
                pb_grpc.LanguageModelStub(channel),
                keys,
                tally,
                k=plan.asked(held),
                selection=plan.selection,
            )
            after = child.cpu_seconds()
    finally:
        child.stop()
    out: dict[str, Any] = {"savings": round(summary(tally)["keystroke_savings"], 4)}
    if cpu is not None and after is not None:
        out["server_cpu_ms_per_event"] = round(1000 * (after - cpu) / tally.events, 3)
    starts = [m.start() for m in held.words.finditer(text)]
    words = [[at, w, typed] for at, (w, typed) in zip(starts, tally.taken, strict=True)]
    return out | breakdown(text, tally.taken, held.words, known_words(bundle)) | {"words": words}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--valid", action="store_true", help="type the validation lines")
    parser.add_argument("--words", type=Path, help="write each word's [offset, word, letters]")
    parser.add_argument("--flags", default="", help="more `rnnlm serve` flags")
    parser.add_argument(
        "--selection", choices=tuple(SELECTIONS), default="fewest-keys", help="shown words"
    )
    args = parser.parse_args()
    text = read_text(args.text, "--text")
    if args.valid:
        from scripts.tune_word_cache import validation_text

        text = validation_text(text)
    kind = load_bundle(args.bundle).tokenizer_kind
    plan = TypingPlan.make(False, 3, args.lines, args.selection)
    held = HeldOut.of(text, str(args.text), kind, plan.k)
    result = asyncio.run(measure(args.bundle.resolve(), held, plan, args.flags.split()))
    words = result.pop("words")
    if args.words is not None:
        args.words.write_text(json.dumps(words))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
