"""What a word search costs with no Python a hypothesis: the measurement behind the character
bundle's next design step (docs/typing.md, "What holds its typists").

At word starts of the held-out text (after each space of the first `--lines` lines), it runs
two searches for the next word from the same model state, with the same width and the same
stopping rule (the `keep` likeliest words found beat every live hypothesis):

- the server's: `server.word_search.search` through the real in-process engine, as a typing
  session at a word start runs it (the context's state cached first, as a session's is);
- a lean one over the bundle's lexicon as a trie: each hypothesis is a trie node, the pieces it
  may grow by are that node's row of a `[nodes, V]` table of children, and a round is the
  step graph's run plus a few whole-array numpy passes (log-softmax, the table lookup, one
  partition), whatever the width.

It prints each one's CPU a search (this thread's), its rounds and rows, and how often the two
agree on the likeliest 3 words. The lean search does not do what the server's also does
(partial words with folding, blocked and user words, bounds kept for later keystrokes): it
bounds what a search over arrays would cost, not a replacement.

    PYTHONPATH=. python scripts/lean_search_probe.py --bundle models/shakespeare-char \\
        --text /work/shared/data/tinyshakespeare/input.txt --lines 40
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.typing import HeldOut, read_text
from server.bundle import Bundle, load_bundle
from server.engine import Engine, EngineConfig
from server.runner import session_options
from server.sampling import log_softmax
from server.text import TextCodec
from server.word_search import PieceTable, piece_table, search
from server.words import Filters, Matcher, WordSettings, logsumexp

WIDTH, DEPTH, KEEP = WordSettings().width, WordSettings().depth, 3


class Trie:
    """The lexicon's words over the model's pieces: `child[node, id]` (-1: no such word)."""

    def __init__(self, table: PieceTable, vocab: int) -> None:
        assert table.lexicon is not None, "the probe needs a bundle with a lexicon"
        ids = {text: i for i, text in table.text.items()}
        child: list[list[int]] = [[-1] * vocab]
        words: list[str | None] = [None]
        for word in sorted(table.lexicon.words):
            node = 0
            for ch in word:
                piece = ids.get(ch)
                if piece is None:
                    break
                if child[node][piece] < 0:
                    child[node][piece] = len(child)
                    child.append([-1] * vocab)
                    words.append(None)
                node = child[node][piece]
            else:
                words[node] = word
        self.child = np.array(child, dtype=np.int32)
        self.words = words


def lean_search(
    session: ort.InferenceSession,
    bundle: Bundle,
    trie: Trie,
    boundary: np.ndarray,
    state: list[np.ndarray],
    first: np.ndarray,
) -> tuple[dict[str, float], int, int, float]:
    """The likeliest words after a context whose state is `state` and whose next-token
    log-probs are `first`; the rounds (runs) and rows it took, and this thread's CPU seconds
    in those runs."""
    names = [s.input for s in bundle.state]
    nodes, lps, logp = np.zeros(1, np.int64), np.zeros(1), first[None, :]
    found: dict[str, float] = {}
    runs = rows = 0
    run_cpu = 0.0
    for depth in range(DEPTH + 1):
        for node, lp, row in zip(nodes.tolist(), lps.tolist(), logp, strict=True):
            word = trie.words[node]
            if word is not None:
                found[word] = lp + logsumexp(row[boundary])
        best = sorted(found.values(), reverse=True)
        bar = best[KEEP - 1] if len(best) >= KEEP else -np.inf
        children = trie.child[nodes]  # [W, V]
        scores = np.where(children >= 0, lps[:, None] + logp, -np.inf).ravel()
        top = (
            np.argpartition(-scores, WIDTH - 1)[:WIDTH]
            if scores.size > WIDTH
            else np.arange(scores.size)
        )
        top = top[scores[top] > bar]
        if not top.size or depth == DEPTH:
            break
        parent, piece = np.divmod(top, logp.shape[1])
        nodes, lps = children[parent, piece].astype(np.int64), scores[top]
        feeds = {"tokens": piece.reshape(-1, 1).astype(np.int64)}
        feeds.update({n: s[:, parent, :] for n, s in zip(names, state, strict=True)})
        began = time.thread_time()
        logits, _, *state = session.run(None, feeds)
        run_cpu += time.thread_time() - began
        logp = log_softmax(logits[:, 0, :])
        runs, rows = runs + 1, rows + len(top)
    return found, runs, rows, run_cpu


def top3(found: dict[str, float]) -> list[str]:
    return sorted(found, key=lambda w: -found[w])[:3]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-char"))
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=40)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    engine = Engine(bundle, EngineConfig())
    await engine.start()
    codec = TextCodec(bundle)
    table = piece_table(codec, False, bundle.lexicon)
    trie = Trie(table, bundle.vocab_size)
    session = bundle.open_session("step", session_options(EngineConfig()), ["CPUExecutionProvider"])
    held = HeldOut.of(read_text(args.text, "--text"), str(args.text), codec.kind, 3)
    before, typed = held.passage(0, args.lines)
    settings = WordSettings(budget_ms=10_000.0)
    match, filters = Matcher("", False), Filters()
    server_cpu, lean_cpu, agree, total = [], [], 0, 0
    server_steps = lean_runs = lean_rows = 0
    lean_run_cpu = 0.0
    for at in [i + 1 for i, ch in enumerate(typed) if ch == " "]:
        context = codec.encode(before + typed[:at])
        [(first, state)] = await engine.next_token_states_many([np.array(context, np.int64)])
        start = time.thread_time()
        result = await search(
            engine.next_token_states_many, context, table, False, match, filters, settings, KEEP
        )
        server_cpu.append(time.thread_time() - start)
        server_steps += result.steps
        stacked = [s[:, None, :] for s in state]
        start = time.thread_time()
        found, runs, rows, run_cpu = lean_search(
            session, bundle, trie, table.boundary, stacked, first
        )
        lean_run_cpu += run_cpu
        lean_cpu.append(time.thread_time() - start)
        lean_runs, lean_rows = lean_runs + runs, lean_rows + rows
        words = {w.text: w.logprob for w in result.words}
        agree += top3(words) == top3(found)
        total += 1
    await engine.close()
    print(f"{total} word starts (width {WIDTH}, keep {KEEP})")
    print(
        f"  the server's search: {statistics.mean(server_cpu) * 1e3:.2f} ms of CPU a search, "
        f"{server_steps / total:.1f} rows"
    )
    print(
        f"  the lean search:     {statistics.mean(lean_cpu) * 1e3:.2f} ms of CPU a search, "
        f"{lean_runs / total:.1f} runs of {lean_rows / max(1, lean_runs):.1f} rows, "
        f"{lean_run_cpu / total * 1e3:.2f} ms of it in onnxruntime's runs"
    )
    print(f"  the same likeliest 3 words, in order: {agree} of {total}")


if __name__ == "__main__":
    asyncio.run(main())
