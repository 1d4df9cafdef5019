"""Typing sessions' contexts encoded through the shared memory of `PrefixEncoder.encode`, or
each session from its own last encoding (`PrefixEncoder.extend`), with many sessions at once.

Each session types into a context of 300 to 3,000 characters of the corpus, a word and its
space at a time. The next word comes after 0.2 to 1.2 s, as a typist takes a word after a few
letters. The events of every session are merged in time order, as a server sees them. For each
number of sessions, the script prints how many encodes missed the shared memory, and the mean
CPU time an encode took either way:

    PYTHONPATH=. python scripts/session_encoding.py --bundle models/shakespeare-word \\
        --text /work/shared/data/tinyshakespeare/input.txt --sessions 50 200 400
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from pathlib import Path

from server.bundle import load_bundle
from server.prefix_encoder import Encoded, PrefixEncoder

SECONDS = 20.0  # simulated typing time
GAPS = (0.2, 0.2, 0.4, 0.4, 0.6, 0.8, 1.0, 1.2)  # seconds to a session's next word


def events(corpus: str, sessions: int, seed: int) -> list[tuple[int, int, int]]:
    """(session, start, end) of every session's context after each word, in time order."""
    rng = random.Random(seed)
    ends = {}
    starts = {}
    for i in range(sessions):
        starts[i] = rng.randrange(0, len(corpus) - 20_000)
        ends[i] = starts[i] + rng.randrange(300, 3_000)
    queue = [(rng.random(), i) for i in range(sessions)]
    heapq.heapify(queue)
    out = []
    while queue:
        at, i = heapq.heappop(queue)
        if at > SECONDS:
            break
        ends[i] = corpus.find(" ", ends[i] + 1) + 1
        out.append((i, starts[i], ends[i]))
        heapq.heappush(queue, (at + rng.choice(GAPS), i))
    return out


def shared(encoder: PrefixEncoder, corpus: str, stream: list[tuple[int, int, int]]) -> str:
    """Every context through `encode`: the misses of its shared memory and the time an encode."""
    misses = 0
    spent = 0.0
    for _, start, end in stream:
        text = corpus[start:end]
        misses += encoder._find(text)[0] is None  # what `encode` is about to look up
        began = time.process_time()
        encoder.encode(text)
        spent += time.process_time() - began
    return f"{misses / len(stream):6.1%} missed, {1e6 * spent / len(stream):5.0f} us an encode"


def own(encoder: PrefixEncoder, corpus: str, stream: list[tuple[int, int, int]]) -> str:
    """Every context through `extend` from its session's last encoding: the time an encode."""
    known: dict[int, Encoded] = {}
    spent = 0.0
    for session, start, end in stream:
        began = time.process_time()
        known[session] = encoder.extend(known.get(session), corpus[start:end])
        spent += time.process_time() - began
    return f"{1e6 * spent / len(stream):5.0f} us an encode"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--text", type=Path, required=True, help="the corpus typed")
    parser.add_argument("--sessions", type=int, nargs="+", default=[50, 200, 400])
    args = parser.parse_args()
    tokenizer = load_bundle(args.bundle).tokenizer
    corpus = args.text.read_text(encoding="utf-8")
    for n in args.sessions:
        stream = events(corpus, n, seed=n)
        print(
            f"{n:4d} sessions, {len(stream)} encodes: shared memory "
            f"{shared(PrefixEncoder(tokenizer), corpus, stream)}; each session its own "
            f"{own(PrefixEncoder(tokenizer), corpus, stream)}"
        )


if __name__ == "__main__":
    main()
