"""What a run measures: the counts (`Plan`) and the token stream the requests are cut from.

The stream is the bundle's training corpus when it can be read (the text the model knows),
else `--corpus`, else lines of random vocabulary words. It is tokenized with the bundle's own
tokenizer, one line at a time with the eos token between lines, and repeated in shuffled line
order when the corpus is shorter than the run needs. Every context a server measurement sends
is cut from a part of the stream no earlier measurement used, so no call is answered from a
state-cache entry that another measurement left behind.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from benchmarks.timing import BenchError
from server.app import engine_config
from server.bundle import Bundle
from server.config import ConfigError, add_arguments, config_from_args
from server.engine import EngineConfig

CONCURRENCY = (1, 8, 64, 256)
CONTEXT_LENGTHS = (10, 100, 1000)
LARGE_BATCH = 64
# Streams the in-process engine is measured at (bare steps are measured at these batches too).
ENGINE_STREAMS = (1, 64, 256)
# Generate calls this long keep a stream busy through a whole under-load measurement (the
# server's default --max-tokens).
LONG_TOKENS = 1024
# PredictNext at concurrency 1 follows the typing pattern on sentences of this many tokens:
# the first token is sent untimed, then each timed call adds one token.
SENTENCE_TOKENS = 10
# Random-word lines (no corpus available) have this many words.
RANDOM_LINE_WORDS = 12


def served_engine(server_args: tuple[str, ...], provider: str) -> EngineConfig:
    """The engine configuration `rnnlm serve --provider PROVIDER SERVER_ARGS` runs, read the way
    the server reads its flags (without `RNNLM_*` variables, which the bench does not pass on);
    BenchError naming a flag the server would refuse."""
    parser = argparse.ArgumentParser(prog="rnnlm serve", add_help=False, exit_on_error=False)
    add_arguments(parser)
    try:
        args, unknown = parser.parse_known_args(
            ["--models", ".", "--provider", provider, *server_args]
        )
        if unknown:
            raise BenchError(f"--server-arg: not a flag of rnnlm serve: {' '.join(unknown)}")
        return engine_config(config_from_args(args, environ={}))
    except (argparse.ArgumentError, ConfigError) as e:
        raise BenchError(f"--server-arg: {e}") from e


def generate_seed(trial: int, stream: int, call: int) -> int:
    """The seed of one Generate call: distinct for every trial, stream and call, so no two
    generations of a load repeat each other (the server and the in-process engine use it)."""
    return (trial * 1_000_003 + stream) * 10_007 + call


@dataclass(frozen=True)
class Plan:
    """Counts and time bounds of every measurement; every loop stops at whichever comes first."""

    trials: int = 3
    duration_s: float = 3.0  # one Generate trial at one concurrency
    warmup_s: float = 1.0  # untimed Generate load before each concurrency's trials
    budget_s: float = 10.0  # the most one latency trial may take
    score_budget_s: float = 60.0  # in-process scoring stops early after this (see `tokens`)
    step_calls: int = 500  # bare/eager batch-1 steps per trial
    large_step_calls: int = 100  # bare/eager batch-64 steps per trial
    echo_calls: int = 500
    echo_stream_s: float = 1.5  # each load of the streaming echo (two loads a trial)
    predict_calls: int = 200  # timed PredictNext calls per trial at concurrency 1
    context_calls: int = 100  # timed extensions per trial at each context length
    fresh_calls: int = 20  # timed PredictNext calls per trial on a fresh longest context
    score_tokens: int = 100_000
    score_chunk: int = 128  # tokens per onnxruntime/eager scoring run (the engine's default)
    generate_max_tokens: int = 64  # tokens per Generate call; streams issue calls back to back
    concurrency: tuple[int, ...] = CONCURRENCY
    context_lengths: tuple[int, ...] = CONTEXT_LENGTHS
    large_batch: int = LARGE_BATCH
    engine_streams: tuple[int, ...] = ENGINE_STREAMS
    under_load_calls: int = 20  # timed PredictNext calls and first tokens per trial under load
    server_args: tuple[str, ...] = field(default_factory=tuple)
    # The servers' engine settings (their defaults, `server_args` and the provider), which the
    # in-process engine and bare onnxruntime's sessions copy.
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def provider(self) -> str:
        """The execution provider of bare onnxruntime, the engine and the servers."""
        return self.engine.provider

    @classmethod
    def make(
        cls,
        *,
        quick: bool = False,
        trials: int | None = None,
        duration: float | None = None,
        score_tokens: int | None = None,
        server_args: tuple[str, ...] = (),
        provider: str = "cpu",
    ) -> Plan:
        """The default plan (a few minutes), or the quick one (seconds), with overrides."""
        plan = cls(server_args=server_args, engine=served_engine(server_args, provider))
        if quick:
            plan = replace(
                plan,
                trials=2,
                duration_s=0.5,
                warmup_s=0.2,
                budget_s=2.0,
                score_budget_s=10.0,
                step_calls=50,
                large_step_calls=10,
                echo_calls=50,
                echo_stream_s=0.5,
                predict_calls=20,
                context_calls=10,
                fresh_calls=3,
                score_tokens=2000,
                generate_max_tokens=16,
                under_load_calls=5,
            )
        if trials is not None:
            if trials < 1:
                raise BenchError(f"--trials must be at least 1, not {trials}")
            plan = replace(plan, trials=trials)
        if duration is not None:
            if not duration > 0:
                raise BenchError(f"--duration must be a number of seconds > 0, not {duration}")
            plan = replace(plan, duration_s=duration, warmup_s=min(plan.warmup_s, duration))
        if score_tokens is not None:
            if score_tokens < 2:
                raise BenchError(f"--score-tokens must be at least 2, not {score_tokens}")
            plan = replace(plan, score_tokens=score_tokens)
        return plan

    def context_tokens_needed(self) -> int:
        """Stream tokens the PredictNext measurements consume (each context fresh)."""
        sentences = -(-self.predict_calls // (SENTENCE_TOKENS - 1))
        longest = max(self.context_lengths, default=0)
        per_trial = sentences * SENTENCE_TOKENS + sum(
            length + self.context_calls for length in self.context_lengths
        )
        per_trial += self.fresh_calls * longest
        return self.trials * per_trial


class Workload:
    """The token stream (int64 ids), its text, and fresh slices of it handed out in order."""

    def __init__(self, bundle: Bundle, ids: np.ndarray, source: str) -> None:
        self.bundle = bundle
        self.ids = ids
        self.source = source
        self._cursor = 0

    def text(self, ids: np.ndarray) -> str:
        """The text the server is sent for `ids` (the tokenizer's decoding; eos is a newline)."""
        return str(self.bundle.tokenizer.decode(ids.tolist(), skip_special_tokens=False))

    def score_ids(self, n: int) -> np.ndarray:
        """The document every scorer scores: the first `n` tokens of the stream."""
        return self.ids[:n]

    def fresh(self, n: int) -> np.ndarray:
        """`n` tokens no earlier call of `fresh` returned (the stream wraps if it must)."""
        if n > len(self.ids):
            raise BenchError(f"a context of {n} tokens is longer than the stream ({len(self.ids)})")
        if self._cursor + n > len(self.ids):
            self._cursor = 0
        out = self.ids[self._cursor : self._cursor + n]
        self._cursor += n
        return out


def build_workload(bundle: Bundle, plan: Plan, corpus: Path | None, seed: int = 0) -> Workload:
    """The stream for `plan`: long enough for the scoring document and every fresh context."""
    needed = max(plan.score_tokens, plan.context_tokens_needed()) + SENTENCE_TOKENS
    text, source = _corpus_text(bundle, corpus)
    rng = np.random.default_rng(seed)
    eos = bundle.eos_id
    if text is None:
        lines = _random_lines(bundle, rng, needed)
    else:
        encodings = bundle.tokenizer.encode_batch(
            [line for line in text.splitlines() if line.strip()], add_special_tokens=False
        )
        lines = [np.array(e.ids, dtype=np.int64) for e in encodings if e.ids]
        if not lines:
            raise BenchError(f"{source}: the corpus has no tokens for this bundle's tokenizer")
    pieces: list[np.ndarray] = []
    total, order = 0, np.arange(len(lines))
    while total < needed:
        for i in order:
            pieces.append(np.append(lines[i], eos))
            total += len(pieces[-1])
            if total >= needed:
                break
        order = rng.permutation(len(lines))
    return Workload(bundle, np.concatenate(pieces)[:needed], source)


def _corpus_text(bundle: Bundle, corpus: Path | None) -> tuple[str | None, str]:
    """`--corpus`, else the training corpus the manifest names (if readable here), else None."""
    if corpus is not None:
        if not corpus.is_file():
            raise BenchError(f"--corpus {corpus}: no such file")
        return _read(corpus, "--corpus"), str(corpus)
    args = bundle.manifest.get("provenance", {}).get("train_args") or {}
    for key in ("corpus", "train"):
        name = args.get(key)
        if isinstance(name, str) and name and Path(name).is_file():
            return _read(Path(name), "the bundle's training corpus"), name
    return None, "random vocabulary words (the bundle's training corpus is not readable here)"


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"{what} {path}: cannot be read as UTF-8 text ({e})") from e


def _random_lines(bundle: Bundle, rng: np.random.Generator, needed: int) -> list[np.ndarray]:
    special = set(bundle.special_tokens.values())
    ordinary = np.array([i for i in range(bundle.vocab_size) if i not in special], dtype=np.int64)
    if len(ordinary) == 0:
        raise BenchError(f"{bundle.path}: the vocabulary has no ordinary tokens to make text from")
    count = needed // RANDOM_LINE_WORDS + 1
    return list(rng.choice(ordinary, size=(count, RANDOM_LINE_WORDS)))
