"""The typing benchmark: simulated typists on `TypingSession`, what a keyboard user gains.

One typist types held-out lines of the bundle's corpus letter by letter through a
`TypingSession` on `rnnlm serve` (a child process), taking a word with one tap as soon as it is
among the k suggestions; the tally gives keystroke savings, next-word accuracy at the word start,
word completion after 1 and 2 letters, model steps per keystroke and latency per keystroke. Then
N typists at once, each typing `KEYS_PER_SECOND`, for a bounded time per N: the largest N whose
p99 per keystroke stays within `P99_LIMIT_MS`, searched by doubling then bisecting within a time
budget. `rnnlm bench --typing` runs only this; docs/typing.md explains the figures.

The keyboard the typist uses: a word is what the model's suggestions are made of (`WORD_KINDS`);
every other character (space, punctuation, the line end) is a key. A tap inserts the word
and, when the text goes on with a space, that space too (phone keyboards add one and take it back
before punctuation), so the session's context is always a prefix of the text. Keys without
suggestions are the text's characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks import echo, report
from benchmarks.process import ChildServer
from benchmarks.server_load import (
    CALL_SLACK_SECONDS,
    PORT_RE,
    READY_SECONDS,
    serve_args,
    wait_serving,
)
from benchmarks.timing import BenchError
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server import config
from server.bundle import Bundle, BundleError, load_bundle

# What the typist takes for a word, by tokenizer kind: a word model's tokens are runs of `\w`
# (its tokenizer splits off everything else, apostrophes too); the server's word search over
# character and BPE pieces also keeps apostrophes inside words (server/words.py).
WORD = re.compile(r"\w+")
# A word model also predicts punctuation, which a keyboard's suggestion strip leaves out: the
# typist asks for this many more and is shown the first k words (character and BPE models'
# suggestions are words only).
EXTRA_ASKED = {"word": 5}
WORD_KINDS = {"word": WORD, "char": re.compile(r"[\w'\u2019]+"), "bpe": re.compile(r"[\w'\u2019]+")}
DEFAULT_K = 3
# The held-out lines: the last 5% of the corpus's lines, the test lines of the trainer's 90/5/5
# split by lines (training/data.py `split_counts`), which also lie in the last 10% of the
# characters that nanoGPT's split (`--split nanogpt`) keeps for validation.
HELD_OUT_FRACTION = 0.05
# The session opens with this much of the text before the typed part as its context.
CONTEXT_CHARS = 300
KEYS_PER_SECOND = 5.0
# The concurrent typists share this many client connections (typist i on connection i mod it):
# keyboards are separate clients, and a server of several processes (`--processes`) spreads
# connections, not calls, over its processes.
CONNECTIONS = 16
P99_LIMIT_MS = 10.0
SAVINGS_TARGET = 0.45
TYPISTS_TARGET = 200
# Held-out lines between the starts of two concurrent typists: more than one types in a
# trial. Each trial's typists start after the last trial's (wrapping at the text's end), so a
# trial does not retype what the one before typed and find it in the server's state cache.
TYPIST_SPACING = 3
# A session that has grown past this many characters opens again at the next line end.
MAX_SESSION_CHARS = 4000
# A deadline on the single typist's session: its line count bounds it, this only ends a hang.
SESSION_DEADLINE_S = 600.0
# Suggestions' field with the model steps an event cost (the server's, when it has one).
STEPS_FIELD = "model_steps"
# The typists' selections (--typing-selection), as TypingEvent.selection.
SELECTIONS = {
    name: pb.Selection.Value("SELECTION_" + name.upper().replace("-", "_"))
    for name in config.SELECTIONS
}

OPEN, LETTER, SEPARATOR, TAP = "open", "letter", "separator", "tap"


class NoText(BenchError):
    """Neither --text nor the bundle's training corpus can be read here."""


@dataclass(frozen=True)
class TypingPlan:
    """Every count and time bound of a typing run."""

    k: int = DEFAULT_K
    lines: int = 120  # held-out lines the single typist types
    warmup_s: float = 1.0  # a concurrency trial's untimed start (sessions opening)
    trial_s: float = 5.0  # one concurrency trial's timed typing
    budget_s: float = 90.0  # the whole concurrency search
    first_n: int = 50
    max_n: int = 1600
    bisections: int = 3
    tries: int = 2  # trials at one N before it counts as over the limit
    # Which words the typists are shown (TypingEvent.selection; SELECTIONS): the figures are
    # this selection's, and the single typist's savings are also measured with the other.
    selection: str = "fewest-keys"

    def asked(self, held: HeldOut) -> int:
        """Suggestions to ask for: a word model's likeliest include punctuation, which the
        keyboard leaves out (`held.ask`); the fewest keys are words only."""
        return held.ask if self.selection == "likeliest" else self.k

    @property
    def other(self) -> TypingPlan:
        """This plan with the other selection."""
        (other,) = (name for name in SELECTIONS if name != self.selection)
        return replace(self, selection=other)

    @classmethod
    def make(
        cls, quick: bool, k: int, lines: int | None, selection: str = "fewest-keys"
    ) -> TypingPlan:
        if k < 1:
            raise BenchError(f"--suggestions {k}: must be at least 1")
        if selection not in SELECTIONS:
            raise BenchError(f"--typing-selection {selection}: not one of {', '.join(SELECTIONS)}")
        if lines is not None and lines < 1:
            raise BenchError(f"--typing-lines {lines}: must be at least 1")
        if quick:
            plan = cls(
                k=k,
                lines=8,
                warmup_s=0.2,
                trial_s=0.6,
                budget_s=6.0,
                first_n=2,
                max_n=4,
                bisections=1,
            )
        else:
            plan = cls(k=k)
        plan = replace(plan, selection=selection)
        return plan if lines is None else replace(plan, lines=lines)


@dataclass(frozen=True)
class Key:
    """One event of the session: `text` appended to its context, `partial` the word so far."""

    text: str
    partial: str
    kind: str  # OPEN (not a keystroke), LETTER, SEPARATOR or TAP


@dataclass
class Tally:
    """What one typist did, keystroke by keystroke."""

    chars: int = 0  # keys without suggestions
    events: int = 0  # events answered, timed or not (sessions opening included)
    letters: int = 0
    separators: int = 0
    taps: int = 0
    free_spaces: int = 0  # spaces a tap inserted
    letters_saved: int = 0  # letters a tap inserted
    words: int = 0
    top1: int = 0
    top3: int = 0
    longer_than_1: int = 0  # words of 2 letters or more
    done_by_1: int = 0  # of those, taken with at most 1 letter typed
    longer_than_2: int = 0
    done_by_2: int = 0
    latency_s: dict[str, list[float]] = field(default_factory=dict)
    steps: dict[str, list[int]] = field(default_factory=dict)

    @property
    def keys(self) -> int:
        return self.letters + self.separators + self.taps

    def record(self, kind: str, seconds: float, steps: int | None) -> None:
        self.latency_s.setdefault(kind, []).append(seconds)
        if steps is not None:
            self.steps.setdefault(kind, []).append(steps)

    def word(self, word: str, shown: Sequence[str], taken_after: int | None) -> None:
        """A word typed: `shown` at its start, taken after `taken_after` letters (None: typed)."""
        self.words += 1
        self.top1 += word in shown[:1]
        self.top3 += word in shown[:3]
        for n in (1, 2):
            if len(word) > n:
                setattr(self, f"longer_than_{n}", getattr(self, f"longer_than_{n}") + 1)
                done = taken_after is not None and taken_after <= n
                setattr(self, f"done_by_{n}", getattr(self, f"done_by_{n}") + done)


def strip(suggestions: list[str], words: re.Pattern[str], k: int) -> list[str]:
    """What the keyboard shows of the server's suggestions: the first k that are words."""
    return [w for w in suggestions if words.fullmatch(w)][:k]


def typist(
    context: str, text: str, k: int, tally: Tally, words: re.Pattern[str] = WORD
) -> Generator[Key, list[str], None]:
    """The keys a typist presses to type `text` after `context`; sent each key's suggestions.

    The first key opens the session (its suggestions are those at the start of `text`), and
    at a line end after MAX_SESSION_CHARS a key opens it again on the text's last lines, as a
    keyboard sends the text before the cursor (a context of a long text would pass the
    server's token limit);
    `words` matches what the typist takes for a word. Suggestions are matched exactly: the
    models learned that verse lines start with a capital (capitalising them where a keyboard's
    shift key turns on by itself was measured: it saved fewer keys, 0.422 against 0.426 on
    shakespeare-word, by merging "And" and "and" into one slot).
    """
    tally.chars += len(text)
    shown = strip((yield Key(context, "", OPEN)), words, k)
    pending = ""  # letters typed in full, not yet in the session's context
    pos = 0
    opened_at, opened_len = 0, len(context)  # where in `text` the session last opened
    for match in words.finditer(text):
        for i in range(pos, match.start()):
            tally.separators += 1
            shown = strip((yield Key(pending + text[i], "", SEPARATOR)), words, k)
            pending = ""
            if text[i] == "\n" and opened_len + i + 1 - opened_at > MAX_SESSION_CHARS:
                again = _context(context + text[: i + 1])
                shown = strip((yield Key(again, "", OPEN)), words, k)
                opened_at, opened_len = i + 1, len(again)
        word, pos = match.group(), match.end()
        start_shown, typed = shown, 0
        while typed < len(word) and word not in shown[:k]:
            typed += 1
            tally.letters += 1
            shown = strip((yield Key("", word[:typed], LETTER)), words, k)
        if typed == len(word):
            tally.word(word, start_shown, None)
            pending = pending + word
            continue
        tally.word(word, start_shown, typed)
        tally.taps += 1
        tally.letters_saved += len(word) - typed
        space = text.startswith(" ", pos)
        tally.free_spaces += space
        pos += space
        shown = strip((yield Key(pending + word + " " * space, "", TAP)), words, k)
        pending = ""
    for ch in text[pos:]:
        tally.separators += 1
        yield Key(pending + ch, "", SEPARATOR)
        pending = ""


# -- the text -------------------------------------------------------------------------------


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"{what} {path}: cannot be read as UTF-8 text ({e})") from e


def corpus_text(bundle: Bundle, text: Path | None) -> tuple[str, str]:
    """`--text`, else the training corpus the bundle's manifest names, read here; its source."""
    if text is not None:
        if not text.is_file():
            raise BenchError(f"--text {text}: no such file")
        return read_text(text, "--text"), str(text)
    args = bundle.manifest.get("provenance", {}).get("train_args") or {}
    name = args.get("corpus")
    if isinstance(name, str) and name and Path(name).is_file():
        return read_text(Path(name), "the bundle's training corpus"), name
    raise NoText(
        f"the typing benchmark needs text: the bundle's training corpus ({name!r} in its "
        "manifest) is not readable here; pass --text FILE (its last 5% of lines are typed)"
    )


@dataclass(frozen=True)
class HeldOut:
    lines: list[str]  # the held-out lines, in order
    before: str  # the text before them, for the first context
    first_line: int  # 1-based line number of the first held-out line
    words: re.Pattern[str]  # what the typist takes for a word
    ask: int  # suggestions to ask for, of which the first k words are shown

    @classmethod
    def of(cls, text: str, source: str, kind: str, k: int) -> HeldOut:
        lines = text.removesuffix("\n").split("\n")
        n = max(1, round(len(lines) * HELD_OUT_FRACTION))
        held = lines[-n:]
        if not any(WORD_KINDS.get(kind, WORD).search(line) for line in held):
            raise BenchError(f"{source}: its last {n} lines (the held-out text) have no words")
        before = "\n".join(lines[:-n]) + "\n" if len(lines) > n else ""
        ask = k + EXTRA_ASKED.get(kind, 0)
        return cls(held, before, len(lines) - n + 1, WORD_KINDS.get(kind, WORD), ask)

    def passage(self, start: int, count: int) -> tuple[str, str]:
        """The context before line `start` (wrapping) and `count` lines from it, joined."""
        start %= len(self.lines)
        typed = [self.lines[(start + i) % len(self.lines)] for i in range(count)]
        before, i = "", start
        while i > 0 and len(before) <= CONTEXT_CHARS:  # enough held-out lines before it
            i -= 1
            before = self.lines[i] + "\n" + before
        if len(before) <= CONTEXT_CHARS:
            before = self.before[-CONTEXT_CHARS - 1 :] + before
        return _context(before), "\n".join(typed) + "\n"


def _context(before: str) -> str:
    """The last CONTEXT_CHARS characters of `before`, from a line start where there is one."""
    tail = before[-CONTEXT_CHARS:]
    cut = tail.find("\n")
    return tail[cut + 1 :] if len(before) > CONTEXT_CHARS and cut >= 0 else tail


# -- sessions -------------------------------------------------------------------------------


def _steps(reply: pb.Suggestions) -> int | None:
    if STEPS_FIELD in reply.DESCRIPTOR.fields_by_name:
        return int(getattr(reply, STEPS_FIELD))
    return None


async def type_passage(
    stub: pb_grpc.LanguageModelStub,
    keys: Generator[Key, list[str], None],
    tally: Tally,
    *,
    k: int,
    selection: str,
    pace_s: float = 0.0,
    window: tuple[float, float] = (0.0, float("inf")),
) -> None:
    """Drive `keys` over one TypingSession: a key every `pace_s`, or each one on the last's reply.

    Paced, a key's latency runs from when it is due (so a slow reply also delays the next key's
    figure); unpaced, from when it is sent. Keys due within `window` (perf_counter times) are
    recorded; the session ends at the window's end or the text's.
    """
    timed_from, until = window
    left = SESSION_DEADLINE_S if until == float("inf") else max(0.0, until - time.perf_counter())
    call = stub.TypingSession(timeout=CALL_SLACK_SECONDS + left)
    key = next(keys)
    due = time.perf_counter()
    try:
        while due < until:
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            start = due if pace_s else time.perf_counter()
            event = pb.TypingEvent(text=key.text, partial_word=key.partial, k=k)
            event.selection = SELECTIONS[selection]  # type: ignore[assignment]
            event.reset = key.kind == OPEN
            await call.write(event)
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise BenchError("the server ended a typing session early")
            end = time.perf_counter()
            tally.events += 1
            if start >= timed_from:
                tally.record(key.kind, end - start, _steps(reply))
            key = keys.send([p.token for p in reply.predictions])
            due = due + pace_s if pace_s else end
    except StopIteration:
        pass
    finally:
        call.cancel()


# -- the measurements -----------------------------------------------------------------------


async def single(stub: pb_grpc.LanguageModelStub, held: HeldOut, plan: TypingPlan) -> Tally:
    """One typist types the first `plan.lines` held-out lines, each key as soon as it can."""
    context, text = held.passage(0, min(plan.lines, len(held.lines)))
    tally = Tally()
    keys = typist(context, text, plan.k, tally, held.words)
    await type_passage(stub, keys, tally, k=plan.asked(held), selection=plan.selection)
    return tally


async def crowd(
    stubs: Sequence[pb_grpc.LanguageModelStub],
    held: HeldOut,
    n: int,
    plan: TypingPlan,
    server_cpu: Callable[[], float | None],
    first_line: int = 0,
) -> dict[str, Any]:
    """`n` typists at KEYS_PER_SECOND each for `plan.trial_s`: keystroke latency and errors,
    and the CPU time an event cost the server (`server_cpu`: its CPU seconds so far) and this
    process (the load generator). Typist i starts at held-out line `first_line` + i *
    TYPIST_SPACING."""
    tally = Tally()
    cpu_before, own_before = server_cpu(), time.process_time()
    pace = 1.0 / KEYS_PER_SECOND
    lines = int((plan.warmup_s + plan.trial_s) * KEYS_PER_SECOND) + 4  # more than is typed
    # Sessions open (untimed) within the first key's time, then type; keys are timed after
    # the warm-up.
    timed_from = time.perf_counter() + plan.warmup_s
    window = (timed_from, timed_from + plan.trial_s)

    async def one(i: int) -> None:
        await asyncio.sleep(pace * i / n)  # spread the typists over one key's time
        context, text = held.passage(first_line + i * TYPIST_SPACING, lines)
        keys = typist(context, text, plan.k, tally, held.words)
        stub = stubs[i % len(stubs)]
        ask, selection = plan.asked(held), plan.selection
        await type_passage(
            stub, keys, tally, k=ask, selection=selection, pace_s=pace, window=window
        )

    outcomes = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    cpu_after, own = server_cpu(), time.process_time() - own_before
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    timed = [s for kind, v in tally.latency_s.items() if kind != OPEN for s in v]
    out: dict[str, Any] = {"typists": n, "keystrokes": len(timed), "failed_typists": len(failed)}
    if failed:
        out["first_error"] = _short(failed[0])
    out.update(_percentiles(timed))
    events = max(tally.events, 1)
    used = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    out["server_cpu_ms_per_event"] = None if used is None else used * 1e3 / events
    out["client_cpu_ms_per_event"] = own * 1e3 / events
    out["within"] = not failed and bool(timed) and out["p99_ms"] <= P99_LIMIT_MS
    return out


async def search(
    stubs: Sequence[pb_grpc.LanguageModelStub],
    held: HeldOut,
    plan: TypingPlan,
    server_cpu: Callable[[], float | None],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The largest N within P99_LIMIT_MS: doubling from `first_n`, then bisecting.

    An N is over the limit when `plan.tries` trials in a row are: on a shared machine a burst
    of other work can fail one trial alone.
    """
    trials: list[dict[str, Any]] = []
    first_line = 0  # where the next trial's typists start in the held-out text
    best, worst = 0, None  # the largest N within, the smallest N over
    end = time.monotonic() + plan.budget_s
    n: int | None = plan.first_n
    bisected = -1  # the N tried after the first one over the limit
    while n is not None and time.monotonic() + plan.warmup_s + plan.trial_s < end:
        within = False
        for attempt in range(1, plan.tries + 1):
            if attempt > 1 and time.monotonic() + plan.warmup_s + plan.trial_s >= end:
                break
            say(f"typing: {n} typists at {KEYS_PER_SECOND:g} keys/s for {plan.trial_s:g} s")
            trial = await crowd(stubs, held, n, plan, server_cpu, first_line)
            trials.append({**trial, "attempt": attempt, "first_line": first_line})
            first_line = (first_line + n * TYPIST_SPACING) % len(held.lines)
            if within := trials[-1]["within"]:
                break
        if within:
            best = max(best, n)
        else:
            worst = n if worst is None else min(worst, n)
        bisected += worst is not None
        n = _next_n(best, worst, plan, bisected)
    edge = worst is not None and _close(best, worst)
    return {
        "keys_per_second_per_typist": KEYS_PER_SECOND,
        "connections": len(stubs),
        "warmup_seconds": plan.warmup_s,
        "trial_seconds": plan.trial_s,
        "tries": plan.tries,
        "p99_limit_ms": P99_LIMIT_MS,
        "trials": trials,
        "largest_within": best,
        "smallest_over": worst,
        "search_ended": "at the edge (within 1/8)" if edge else "on its time or count bound",
        **_cpu_bound(trials),
    }


def _cpu_bound(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The CPU an event cost (median over trials), and how many typists the usable cores
    could serve at that cost: the server alone, and with the load generator beside it."""
    server = [t["server_cpu_ms_per_event"] for t in trials if t["server_cpu_ms_per_event"]]
    client = [t["client_cpu_ms_per_event"] for t in trials]
    if not server or not client:
        return {"server_cpu_ms_per_event": None}
    s, c = float(np.median(server)), float(np.median(client))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return {
        "server_cpu_ms_per_event": s,
        "client_cpu_ms_per_event": c,
        "typists_cpu_allows_server_alone": int(cores * 1e3 / (s * KEYS_PER_SECOND)),
        "typists_cpu_allows_with_client": int(cores * 1e3 / ((s + c) * KEYS_PER_SECOND)),
    }


def _close(best: int, worst: int) -> bool:
    return worst - best <= max(1, best // 8)


def _next_n(best: int, worst: int | None, plan: TypingPlan, bisected: int) -> int | None:
    """The next N to try, or None: double while within, then bisect `plan.bisections` times."""
    if worst is None:
        return None if best >= plan.max_n else min(plan.max_n, 2 * best)
    if _close(best, worst) or bisected > plan.bisections:
        return None
    return (best + worst) // 2


# -- the run --------------------------------------------------------------------------------


async def measure(
    bundle_dir: Path,
    held: HeldOut,
    plan: TypingPlan,
    server: tuple[str, ...],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The single typist, then the concurrency search, on a server of its own.

    `server` is the execution provider, then extra `rnnlm serve` flags.
    """
    args = serve_args(bundle_dir, True, server[1:], server[0])
    child = ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS)
    out: dict[str, Any] = {"server_command": "rnnlm " + " ".join(args)}
    try:
        async with contextlib.AsyncExitStack() as stack:
            stubs = await connect(stack, child)
            say(f"typing: one typist, {min(plan.lines, len(held.lines))} held-out lines")
            out["typist"] = summary(await single(stubs[0], held, plan))
            other = plan.other
            say(f"typing: the same typist shown the {other.selection} (selection)")
            out["other_selection"] = {
                "selection": other.selection,
                **summary(await single(stubs[0], held, other)),
            }
            out["concurrency"] = await search(stubs, held, plan, child.cpu_seconds, say)
            child.check_alive()
    except grpc.aio.AioRpcError as e:
        raise BenchError(
            f"the server failed a typing call: {e.code().name} {_short(e.details())}; "
            f"its log:\n{child.log_tail()}"
        ) from e
    finally:
        child.stop()
    out["echo_session"] = await _transport_floor(out["concurrency"], plan, say)
    return out


async def connect(
    stack: contextlib.AsyncExitStack, child: ChildServer
) -> list[pb_grpc.LanguageModelStub]:
    """Stubs on CONNECTIONS connections of their own to `child` (closed with `stack`), once
    each is served: with `--processes` the kernel spreads connections over the processes, so
    every one must have its process up."""
    channels = [
        await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{child.port}", options=echo.OWN_CONNECTION)
        )
        for _ in range(CONNECTIONS)
    ]
    for channel in channels:
        await wait_serving(channel, child)
    return [pb_grpc.LanguageModelStub(channel) for channel in channels]


async def _transport_floor(
    concurrency: dict[str, Any], plan: TypingPlan, say: Callable[[str], None]
) -> dict[str, Any]:
    """gRPC's own CPU a keystroke: an echo server's, under as many paced sessions as the
    largest N within the limit (at least the search's first N) over the same connections."""
    n = max(concurrency["largest_within"], plan.first_n)
    say(f"typing: a gRPC echo of {n} paced sessions for {plan.trial_s:g} s")
    floor = await echo.measure_session(n, CONNECTIONS, KEYS_PER_SECOND, plan.trial_s)
    server = concurrency.get("server_cpu_ms_per_event")
    if floor and server:
        floor["share_of_server"] = floor["server_cpu_ms_per_message"] / server
    return floor


def summary(t: Tally) -> dict[str, Any]:
    """The typist's figures from its tally."""
    out: dict[str, Any] = {
        "chars": t.chars,
        "keys_used": t.keys,
        "letters": t.letters,
        "separators": t.separators,
        "taps": t.taps,
        "free_spaces": t.free_spaces,
        "letters_saved": t.letters_saved,
        "keystroke_savings": 1 - t.keys / t.chars if t.chars else None,
        "words": t.words,
        "next_word_top1": _ratio(t.top1, t.words),
        "next_word_top3": _ratio(t.top3, t.words),
        "completion_after_1": _ratio(t.done_by_1, t.longer_than_1),
        "completion_after_2": _ratio(t.done_by_2, t.longer_than_2),
        "words_longer_than_1": t.longer_than_1,
        "words_longer_than_2": t.longer_than_2,
    }
    timed = {kind: v for kind, v in t.latency_s.items() if kind != OPEN}
    out["latency_ms"] = {
        "all": _percentiles([s for v in timed.values() for s in v]),
        "extending": _percentiles(timed.get(LETTER, [])),
        "other": _percentiles(timed.get(SEPARATOR, []) + timed.get(TAP, [])),
    }
    out["model_steps"] = _steps_summary(t.steps)
    return out


def _steps_summary(steps: dict[str, list[int]]) -> dict[str, Any] | None:
    if not steps:
        return None  # the server does not report the steps an event cost
    other = steps.get(SEPARATOR, []) + steps.get(TAP, [])
    split = {"extending": steps.get(LETTER, []), "other": other}
    return {
        name: {
            "keystrokes": len(v),
            "steps": sum(v),
            "per_keystroke": sum(v) / len(v) if v else None,
            "keystrokes_with_steps": sum(1 for s in v if s),
        }
        for name, v in split.items()
    }


def _percentiles(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    p50, p99 = (float(v) for v in np.percentile(np.array(samples) * 1e3, [50, 99]))
    return {"n": len(samples), "p50_ms": p50, "p99_ms": p99}


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _short(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def run(
    bundle_dir: Path,
    text: Path | None,
    plan: TypingPlan,
    server: tuple[str, ...],
    command: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The whole typing benchmark on one bundle: results with their targets.

    `server` is the execution provider, then extra `rnnlm serve` flags.
    """
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise BenchError(f"--bundle: {e}") from e
    content, source = corpus_text(bundle, text)
    kind = bundle.manifest.get("tokenizer", {}).get("kind")
    held = HeldOut.of(content, source, str(kind), plan.k)
    typed = min(plan.lines, len(held.lines))
    a = bundle.manifest.get("architecture", {})
    results: dict[str, Any] = {
        "machine": report.machine(),
        "command": command,
        "bundle": {
            "path": str(bundle_dir),
            "name": bundle.name,
            "version": bundle.version,
            "tokenizer": bundle.manifest.get("tokenizer", {}).get("kind"),
            "summary": f"{bundle.name} v{bundle.version}, {a.get('cell')} {a.get('layers')}x"
            f"{a.get('hidden')}, {bundle.manifest.get('tokenizer', {}).get('kind')} tokenizer, "
            f"vocabulary {bundle.vocab_size}, {bundle.precision}",
        },
        "k": plan.k,
        "k_asked": plan.asked(held),
        "selection": plan.selection,
        "plan": asdict(plan),
        "text": {
            "source": source,
            "held_out_lines": len(held.lines),
            "typed": f"{source} lines {held.first_line}-{held.first_line + typed - 1} "
            f"(the first {typed} of its last {len(held.lines)}, the held-out 5%)",
        },
    }
    results.update(asyncio.run(measure(bundle_dir.resolve(), held, plan, server, say)))
    results["machine"]["load_average_at_end"] = report.load_average()
    results["targets"] = targets(results)
    return results


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """typing.json and typing.md in `out`."""
    paths = [out / "typing.json", out / "typing.md"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(results) + "\n", encoding="utf-8")
    return paths


# -- targets and the report ------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for one bundle, each PASS, FAIL or n/a (no figure)."""
    typist, crowd_ = results["typist"], results["concurrency"]
    steps = typist["model_steps"]
    extending = None if steps is None else steps["extending"]["steps"]
    other = results.get("other_selection") or {}
    rows = [
        (
            f"keystroke savings ({results['selection']})",
            typist["keystroke_savings"],
            ">=",
            SAVINGS_TARGET,
        ),
        (
            f"keystroke savings ({other.get('selection')})",
            other.get("keystroke_savings"),
            ">=",
            SAVINGS_TARGET,
        ),
        ("model steps on extending keystrokes", extending, "==", 0),
        (f"typists within p99 {P99_LIMIT_MS:g} ms", crowd_["largest_within"], ">=", TYPISTS_TARGET),
    ]
    out = []
    for name, value, op, threshold in rows:
        if value is None:
            status = "n/a"
        else:
            met = value >= threshold if op == ">=" else value == threshold
            status = "PASS" if met else "FAIL"
        out.append(
            {"target": name, "value": value, "op": op, "threshold": threshold, "status": status}
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    """results as the Markdown page `typing.md`."""
    t, c, m = results["typist"], results["concurrency"], results["machine"]
    lines = [
        f"# Typing benchmark: {results['bundle']['summary']}",
        "",
        f"`{results['command']}`",
        "",
        f"{m['cpu']}, {m['usable_cores']} usable cores; load average at start "
        f"{m['load_average_at_start']}, at end {m['load_average_at_end']}; {m['date_utc']}, "
        f"commit {m['git_commit']}. Text: {results['text']['typed']}; "
        f"{results['k']} suggestions, the {results['selection']} (TypingEvent.selection; "
        "docs/typing.md#fewest-keys).",
        "",
        "## Targets",
        "",
        *report._table(
            ["target", "value", "rule", "status"],
            [
                [r["target"], report._f(r["value"]), f"{r['op']} {r['threshold']}", r["status"]]
                for r in results["targets"]
            ],
        ),
        "## One typist",
        "",
        *report._table(["figure", "value"], _typist_rows(t)),
        *_other_selection_lines(results.get("other_selection")),
        "## Concurrent typists",
        "",
        f"Each typist types {c['keys_per_second_per_typist']:g} keys/s "
        f"(the typists over {c.get('connections', 1)} client connections) for "
        f"{c['trial_seconds']:g} s (an N is over the limit after {c['tries']} trials over it in "
        f"a row); largest N with p99 within {c['p99_limit_ms']:g} ms: "
        f"**{c['largest_within']}** (smallest over: {c['smallest_over']}; the search ended "
        f"{c['search_ended']}). Under other load on the machine, this is a lower bound.",
        "",
        *_cpu_lines(c, results.get("echo_session") or {}),
        *report._table(
            [
                "typists",
                "trial",
                "keystrokes",
                "p50 ms",
                "p99 ms",
                "failed typists",
                "within",
                "CPU ms per event: server / load generator",
            ],
            [
                [
                    r["typists"],
                    r["attempt"],
                    r["keystrokes"],
                    report._f(r["p50_ms"]),
                    report._f(r["p99_ms"]),
                    r["failed_typists"],
                    "yes" if r["within"] else "no",
                    f"{report._f(r['server_cpu_ms_per_event'])} / "
                    f"{report._f(r['client_cpu_ms_per_event'])}",
                ]
                for r in c["trials"]
            ],
        ),
    ]
    return "\n".join(lines)


def _other_selection_lines(other: dict[str, Any] | None) -> list[str]:
    if not other:
        return []
    return [
        f"The same typist on the same text shown the {other['selection']}: keystroke "
        f"savings **{report._f(other['keystroke_savings'])}**, next word top-1 / top-3 "
        f"{report._f(other['next_word_top1'])} / {report._f(other['next_word_top3'])}, "
        f"word completed after 1 / 2 letters {report._f(other['completion_after_1'])} / "
        f"{report._f(other['completion_after_2'])}.",
        "",
    ]


def _cpu_lines(c: dict[str, Any], floor: dict[str, Any]) -> list[str]:
    if c.get("server_cpu_ms_per_event") is None:
        return []
    transport = []
    if floor.get("share_of_server") is not None:
        transport = [
            f"gRPC alone (`benchmarks/echo.py`: a bidirectional echo server under "
            f"{floor['sessions']} sessions at the typists' pace over the same connections) "
            f"costs {floor['server_cpu_ms_per_message']:.3g} ms of its CPU a keystroke, "
            f"{floor['share_of_server']:.2f} of the server's, and "
            f"{floor['client_cpu_ms_per_message']:.3g} ms of the load generator's.",
            "",
        ]
    return [
        f"CPU per event (median over trials): the server {c['server_cpu_ms_per_event']:.3g} ms, "
        f"the load generator {c['client_cpu_ms_per_event']:.3g} ms. At that cost the usable "
        f"cores could serve {c['typists_cpu_allows_server_alone']} typists with the server "
        f"alone on them, {c['typists_cpu_allows_with_client']} with the load generator beside "
        "it (a CPU bound, not a latency one). Each trial's figures are in the table: an event "
        "costs more with fewer typists, whose events share less of the event loop's work.",
        "",
        *transport,
    ]


def _typist_rows(t: dict[str, Any]) -> list[list[Any]]:
    lat, steps = t["latency_ms"], t["model_steps"]
    rows: list[list[Any]] = [
        ["characters typed (keys without suggestions)", t["chars"]],
        [
            "keys used (letters + separators + taps)",
            f"{t['keys_used']:,} ({t['letters']:,} + {t['separators']:,} + {t['taps']:,})",
        ],
        ["**keystroke savings**", report._f(t["keystroke_savings"])],
        ["words", t["words"]],
        ["next word top-1 at the word start", report._f(t["next_word_top1"])],
        ["next word top-3 at the word start", report._f(t["next_word_top3"])],
        ["word completed after 1 letter", report._f(t["completion_after_1"])],
        ["word completed after 2 letters", report._f(t["completion_after_2"])],
    ]
    for name in ("extending", "other"):
        rows.append(
            [
                f"p50 / p99 ms, {name} keystrokes ({lat[name]['n']})",
                f"{report._f(lat[name]['p50_ms'])} / {report._f(lat[name]['p99_ms'])}",
            ]
        )
        if steps is not None:
            s = steps[name]
            rows.append(
                [
                    f"model steps per {name} keystroke",
                    f"{report._f(s['per_keystroke'])} "
                    f"({s['keystrokes_with_steps']} of {s['keystrokes']} keystrokes ran any)",
                ]
            )
    if steps is None:
        rows.append(["model steps per keystroke", "not reported by this server"])
    return rows
