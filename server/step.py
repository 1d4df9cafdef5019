"""One step of a batch: `step(batch, runner, config, sampler) -> StepResult`.

The step asks every row for its pending work (a decode token, a prompt or document chunk),
groups the work into as few onnxruntime runs as the padding rules allow, runs them, hands each
row its outputs (`Request.absorb`), finishes the rows whose next-token logits are ready (their
log-probs in one vectorised pass, every sampled row's token in one sampler call) and returns
what happened: the batch with its new states, the replies to deliver, and the prefix states
for the state cache. It changes no argument but progress: the requests' own (tokens fed,
done), and the sampled rows' random-stream positions, last tokens (and seen tokens) in the
batch's sampling rows.

Grouping never changes a result. Work that must carry its final state on (a prompt chunk, a
decode step, a document chunk before the last) runs only with work of exactly its length, so
it is never padded. Work whose final state is thrown away (the last chunk of a document being
scored or embedded) may be right-padded up to a power-of-two length: a recurrent network is
causal, so outputs at the real positions do not see the padding after them.

Which graph serves which work: prompts go through the prefill graph (the step graph without
its output layer) but their last token, which runs on the step graph for the logits, in the
same step (see `Request.work`); scoring goes through the score graph, embedding through the
prefill graph. A step runs every decode token but at most one run's worth of prompt and
document tokens (`run_elements`, rows taking turns), so long documents cannot stall streams.
Generations past their prompt (the hot path under load) lead the one-token run as a block:
their tokens are gathered and their rows sampled straight from the run's output; the sampler
treats rows independently (each has its own counter-based random stream), so what shares a
step never changes a token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from server.batch import Batch
from server.requests import (
    END,
    PREFILL,
    READY,
    SCORE,
    STEP,
    Failure,
    GenerateRequest,
    Request,
    RowOutput,
    State,
    Work,
)
from server.row_sampler import Logits, RowSampler
from server.runner import DeviceStates, Runner
from server.sampler import SampledRows
from server.sampling import log_softmax

# The most float32 values a run may hold per [B, T, V] tensor (16 MiB): bigger groups are
# split. Batching rows of long chunks gains little, and onnxruntime keeps the memory of its
# largest run for good (its arena), so this bounds what scoring adds to the server's memory.
RUN_ELEMENTS = 1 << 22


class Sampled:
    """The tokens one sampler call chose for its requests, handed over as one reply
    (`(Sampled, None)`, server/delivery.py's `dispatch`): `deliver` gives each request its
    `GeneratedToken`, made there, on the event loop as the replies go out. The batching thread
    then spends no Python a row on them (in place about 1 us a row at 256 rows: the ints,
    floats and tuples of a row's token), and the event loop makes them where they are read."""

    __slots__ = ("requests", "samples")

    def __init__(self, requests: Sequence[Request], samples: SampledRows) -> None:
        self.requests = requests
        self.samples = samples

    def deliver(self, payload: object) -> None:
        for request, token in zip(self.requests, self.samples.generated(), strict=True):
            request.deliver(token)


Reply = tuple[Request | Sampled, object]
# A step's states so far: the batch's host arrays (copied before a run writes rows of them),
# or, between decode runs of all its rows on the device, `DeviceStates`.
_States = list[np.ndarray] | DeviceStates
# The rows that feed tokens of their own this step (prompt and document chunks; every row
# when batching is off), each with its work; decoding rows otherwise run as one block.
Works = dict[int, Work]


@dataclass(frozen=True, slots=True)
class StepConfig:
    """How steps run: the engine's settings and the model's sizes."""

    vocab_size: int
    hidden: int
    chunk: int = 128  # tokens of a prompt/document fed per step per request
    batching: bool = True  # False: one run per request
    prefill_split: int | None = None  # see `Request.work`
    run_elements: int = RUN_ELEMENTS
    caching: bool = True  # return the prefix states reached, for the state cache
    # Runs of decoding rows only leave their logits on the device (`Runner.decode`), for the
    # sampler graph to take where they are, and their new states, for the next step's run
    # when it is of the same rows; on for CUDA with the sampler graph.
    device_logits: bool = False


@dataclass(frozen=True, slots=True)
class Prefix:
    """A context's state and next-token log-probs, for the state cache."""

    tokens: np.ndarray
    state: State
    logprobs: np.ndarray
    key: int | None


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did."""

    batch: Batch  # the same rows with their new states (finished ones still in it)
    replies: list[Reply]  # payloads to deliver, in order
    prefixes: list[Prefix]  # for the state cache, before the replies go out
    held: int = 0  # rows whose chunk the step's token budget held back for a later step
    # Seconds in onnxruntime's runs and the sampler (the model's work), by the step's clock
    # (0 without one). The rest of a step is the engine's own (its Python), which should not
    # grow with rows.
    model_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Run:
    graph: str
    length: int
    rows: list[int]
    lead: int  # the first `lead` rows are decoding generations
    # Every row of the batch, in order: the run takes and returns the batch's own state
    # arrays, nothing gathered (decoding rows alone: their tokens are the batch's last tokens).
    full: bool = False


@dataclass(slots=True)
class _Ran:
    """One run's outcome."""

    replies: list[Reply] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)  # rows whose next-token logits are ready
    block: tuple[list[int], Logits] | None = None  # decoding rows and their logits
    model_s: float = 0.0  # seconds in the run, by the step's clock


def step(
    batch: Batch,
    runner: Runner,
    config: StepConfig,
    sampler: RowSampler,
    clock: Callable[[], float] | None = None,
) -> StepResult:
    """Run one step of every row's pending work (resting rows excepted); see the docstring.
    With `clock` (the batching threads pass `time.thread_time`), the time spent in the model
    is measured (`StepResult.model_s`; a call of that clock costs about 0.6 us here, which a
    lone next-token call on the event loop does not pay)."""
    requests = batch.requests
    decoding, others = _rows(batch)
    decoders, works = _plan(batch, decoding, others, config)
    held = 0
    if len(works) > 1:  # one chunk always runs
        works, held = _take_turns(works, batch.turn, len(requests), config)
    now = batch.states
    states: _States = now if isinstance(now, DeviceStates) else list(now)
    outcomes: list[_Ran] = []
    # Work that needs no logits runs first; a request whose prefill left only its last few
    # tokens feeds them on the step graph in this step, beside the decoding rows.
    early = {row: w for row, w in works.items() if w.graph != STEP}
    if early:
        for run in _groups(early, [], config, len(requests)):
            states, ran = _run(runner, states, batch, run, early, False, clock)
            outcomes.append(ran)
        works = _after_early(works, early, requests, config)
    for run in _groups(works, decoders, config, len(requests)):
        device = config.device_logits and run.lead == len(run.rows)
        states, ran = _run(runner, states, batch, run, works, device, clock)
        outcomes.append(ran)
    after = batch.stepped(states)
    replies = [reply for ran in outcomes for reply in ran.replies]
    ready = [row for ran in outcomes for row in ran.ready]
    ready += [
        row
        for row in others
        if row not in works and requests[row].logits is not None and row not in batch.resting
    ]  # logits known before the step (a generation from a cached prompt)
    blocks = [ran.block for ran in outcomes]
    answers, prefixes, sample_s = _finish(after, sorted(set(ready)), blocks, sampler, config, clock)
    model_s = sample_s + sum(ran.model_s for ran in outcomes)
    return StepResult(after, replies + answers, prefixes, held, model_s)


def _rows(batch: Batch) -> tuple[list[int], list[int]]:
    """The batch's decoding rows and the others, in order (one array pass when all rows are
    of one kind, as in a step under load or a lone next-token call)."""
    decoding = batch.decoding()
    rows = decoding.nonzero()[0].tolist()
    if len(rows) == len(batch):
        return rows, []
    if not rows:
        return [], list(range(len(batch)))
    return rows, (~decoding).nonzero()[0].tolist()


def _plan(
    batch: Batch, decoding: list[int], others: list[int], config: StepConfig
) -> tuple[list[int], Works]:
    """The decoding rows (a block, with batching) and the other rows' work.

    Rows that rest sit the step out, and so do done or cancelled ones that do not decode. A
    decoding row is not asked: the scheduler drops done and cancelled rows (`Batch.live`)
    just before each step, so one cancelled since then is stepped once more at most, as it
    would be had the cancellation come a moment later, and its token goes to nobody. That
    keeps the hot path's Python per step, not per row."""
    resting, requests = batch.resting, batch.requests
    decoders = [row for row in decoding if row not in resting] if resting else decoding
    works: Works = {}
    if not config.batching:  # each decoding row a run of its own, on its last token
        last = batch.sampling.last_token
        works = {row: Work(STEP, last[row : row + 1], None, True) for row in decoders}
        decoders = []
    for row in others:
        r = requests[row]
        if row in resting or r.done or r.cancelled:
            continue
        w = r.work(config.chunk, config.prefill_split)
        if w is not None:
            works[row] = w
    return decoders, works


def _after_early(
    works: Works, early: Works, requests: Sequence[Request], config: StepConfig
) -> Works:
    """The step-graph work left after the early runs: a prefilled prompt's last tokens."""
    out = {row: w for row, w in works.items() if row not in early}
    for row, w in early.items():
        r = requests[row]
        after = None if w.graph != PREFILL or r.done else r.work(config.chunk, config.prefill_split)
        if after is not None and after.graph == STEP:
            out[row] = after
    return out


def _groups(works: Works, decoders: list[int], config: StepConfig, count: int) -> list[_Run]:
    """`works` and the `decoders` rows (ascending) in as few runs as the padding rules allow
    (`count`: the batch's rows)."""
    # (graph, run length, the row when each request runs alone else -1) -> rows
    groups: dict[tuple[str, int, int], list[int]] = {}
    if decoders:
        groups[(STEP, 1, -1)] = list(decoders)
    for row in sorted(works):
        w = works[row]
        n = len(w.tokens)
        if not config.batching:
            key = (w.graph, n, row)
        elif w.keeps_state:
            key = (w.graph, n, -1)
        else:
            key = (w.graph, _padded(n, config.chunk), -1)
        groups.setdefault(key, []).append(row)
    widths = {
        STEP: config.vocab_size + config.hidden,
        SCORE: config.vocab_size,
        PREFILL: config.hidden,
    }
    runs = []
    for key, rows in groups.items():
        graph, length, _ = key
        per_run = max(1, config.run_elements // (length * widths[graph]))
        leading = len(decoders) if key == (STEP, 1, -1) else 0  # the decoders lead their group
        for start in range(0, len(rows), per_run):
            part = rows[start : start + per_run]
            lead = max(0, min(len(part), leading - start))
            # Decoding rows alone are ascending, so as many as the batch has are all, in order.
            full = len(part) == count and (lead == count or part == list(range(count)))
            runs.append(_Run(graph, length, part, lead, full))
    return runs


def _take_turns(works: Works, turn: int, count: int, config: StepConfig) -> tuple[Works, int]:
    """Hold back chunks beyond one full run of tokens this step, in turns (`count`: the
    batch's rows); the works kept and how many were held.

    Decode steps always run; prompt and document chunks share a budget of one run's worth of
    tokens per step, so a flood of long documents cannot stall every stream's next token for
    many runs (nor grow memory), and each request gets its turn first.
    """
    budget = config.run_elements // (config.vocab_size + config.hidden)
    kept = dict(works)
    used = held = 0
    for row in sorted(works, key=lambda row: (row - turn) % count):
        n = len(works[row].tokens)
        if n == 1:
            continue
        if used and used + n > budget:
            del kept[row]
            held += 1
        else:
            used += n
    return kept, held


def _run(
    runner: Runner,
    states: _States,
    batch: Batch,
    run: _Run,
    works: Works,
    device: bool,
    clock: Callable[[], float] | None,
) -> tuple[_States, _Ran]:
    """One onnxruntime run of `run.rows` from `states` (the step's so far; `batch.states`
    before it): the states after it, and what it gave the rows. With `device` (decoding rows
    only), the logits stay on the device, as an `OrtValue`, and so do the new states when the
    run is of every row in order (the hot path under load: the next step's run takes them
    there)."""
    rows, lead = run.rows, run.lead
    requests = batch.requests
    tokens, targets = _inputs(run, works, batch.sampling.last_token)
    if device and run.full:
        return _decode_all(runner, states, tokens, requests, rows, clock)
    host = list(states.host()) if isinstance(states, DeviceStates) else states
    idx = None if run.full else np.array(rows, dtype=np.intp)
    inputs = host if idx is None else [s[:, idx, :] for s in host]
    logits: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    features: np.ndarray | None = None
    start = clock() if clock else 0.0
    try:
        if device:
            on_device, kept = runner.decode(tokens, inputs)
            new = list(kept.host())
        elif targets is not None:
            logprobs, features, new = runner.score(tokens, targets, inputs)
        elif run.graph == PREFILL:
            features, new = runner.prefill(tokens, inputs)
        else:
            logits, features, new = runner.step(tokens, inputs)
    except Exception as e:  # onnxruntime raises several types; the requests must end
        return host, _failed(requests, rows, e)
    ran = _Ran(model_s=clock() - start if clock else 0.0)
    host = list(new) if idx is None else _scatter(host, batch.host_states(), idx, new)
    if device:
        ran.block = (rows, on_device)
        return host, ran
    if lead:
        assert logits is not None
        ran.block = (rows[:lead], logits[:lead, 0, :])
    if lead < len(rows):
        new = _read_only_views(new)  # the rows' own outputs read them (RowOutput.states)
    for i in range(lead, len(rows)):
        r = requests[rows[i]]
        n = len(works[rows[i]].tokens)
        out = RowOutput(
            None if features is None else features[i, :n],
            None if logits is None else logits[i, :n],
            None if logprobs is None else logprobs[i, :n],
            new,
            i,
        )
        answer = r.absorb(out)
        if answer is READY:
            ran.ready.append(rows[i])
        elif answer is not None:
            r.done = True
            ran.replies.append((r, answer))
    return host, ran


def _read_only_views(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Read-only views of `arrays` (views of them are read-only too: no flag to set a row)."""
    return _freeze_all([a.view() for a in arrays])


def _freeze_all(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`arrays`, each made read-only in place."""
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _decode_all(
    runner: Runner,
    states: _States,
    tokens: np.ndarray,
    requests: Sequence[Request],
    rows: list[int],
    clock: Callable[[], float] | None,
) -> tuple[_States, _Ran]:
    """A decode run of every row of the batch (`rows`, in order), whose logits and new states
    stay on the device (`Runner.decode`)."""
    start = clock() if clock else 0.0
    try:
        on_device, kept = runner.decode(tokens, states)
    except Exception as e:  # onnxruntime raises several types; the requests must end
        return states, _failed(requests, rows, e)
    return kept, _Ran(model_s=clock() - start if clock else 0.0, block=(rows, on_device))


def _failed(requests: Sequence[Request], rows: list[int], error: Exception) -> _Ran:
    """A failed run's rows, ended with the error."""
    failure = Failure(f"onnxruntime run failed: {error}")
    for row in rows:
        requests[row].done = True
    return _Ran(replies=[(requests[row], failure) for row in rows])


def _inputs(
    run: _Run, works: Works, last_token: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """The run's tokens [k, length] (and targets, on the score graph); the decoding rows
    leading it feed their last tokens (`last_token`: the batch's, by row)."""
    k, lead = len(run.rows), run.lead
    if lead == k:  # decoding rows alone: the hot path under load
        return (last_token if run.full else last_token[run.rows]).reshape(k, 1), None
    tokens = np.zeros((k, run.length), dtype=np.int64)
    targets = np.zeros((k, run.length), dtype=np.int64) if run.graph == SCORE else None
    if lead:
        tokens[:lead, 0] = last_token[run.rows[:lead]]
    for i in range(lead, k):
        w = works[run.rows[i]]
        tokens[i, : len(w.tokens)] = w.tokens
        if targets is not None:
            assert w.targets is not None
            targets[i, : len(w.targets)] = w.targets
    return tokens, targets


def _scatter(
    states: list[np.ndarray],
    original: Sequence[np.ndarray],
    idx: np.ndarray,
    new: Sequence[np.ndarray],
) -> list[np.ndarray]:
    """`states` with rows `idx` replaced by `new`; the batch's own arrays (and read-only ones,
    as from the device) are copied first."""
    out = []
    for s, o, fresh in zip(states, original, new, strict=True):
        target = s if s.flags.writeable and s is not o else s.copy()
        target[:, idx, :] = fresh
        out.append(target)
    return out


def _finish(
    batch: Batch,
    ready: list[int],
    blocks: list[tuple[list[int], Logits] | None],
    sampler: RowSampler,
    config: StepConfig,
    clock: Callable[[], float] | None,
) -> tuple[list[Reply], list[Prefix], float]:
    """Answer the rows whose next-token logits are ready: log-probs, or samples (every
    generating row of the step in one sampler call); and the time in the sampler, by `clock`
    (0 without one)."""
    requests = batch.requests
    replies: list[Reply] = []
    prefixes: list[Prefix] = []
    nexts = [row for row in ready if not requests[row].samples]
    if nexts:
        rows_logits = [requests[row].logits for row in nexts]
        # The state cache keeps no empty context (a word search's extensions have none).
        cached = [config.caching and len(requests[row].context) > 0 for row in nexts]  # type: ignore[attr-defined]
        lps = _logprobs(rows_logits, own=any(cached))  # type: ignore[arg-type]
        for row, lp, caches in zip(nexts, lps, cached, strict=True):
            r = requests[row]
            if caches:
                prefixes.append(Prefix(r.context, batch.row_state(row), lp, r.key))  # type: ignore[attr-defined]
            r.logits = None
            r.done = True
            replies.append((r, lp))
    # Each part is sampled where its logits are (a run's decoding block, the rows whose
    # first token is due): joining them would copy a [B, V] block whenever a stream starts,
    # about every step under load; the sampler treats rows independently.
    parts = [b for b in blocks if b is not None]
    firsts = [row for row in ready if requests[row].samples]
    if firsts:
        parts.append((firsts, np.array([requests[row].logits for row in firsts])))  # type: ignore[misc]
        for row in firsts:
            requests[row].logits = None
    sample_s = 0.0
    for rows, logits in parts:
        sampled = _sample(batch, rows, logits, sampler, config, clock)
        replies += sampled[0]
        prefixes += sampled[1]
        sample_s += sampled[2]
    return replies, prefixes, sample_s


def _logprobs(logits: list[np.ndarray], own: bool) -> list[np.ndarray]:
    """Each row's read-only next-token log-probs, in one vectorised pass when there are
    several; with `own`, each an array of its own (for the state cache, which should not keep
    the others' alive), else rows of one array."""
    if len(logits) == 1:
        return _freeze_all([log_softmax(logits[0])])
    block = log_softmax(np.array(logits))  # rows of one shape
    if own:
        return _freeze_all([row.copy() for row in block])
    return list(_freeze_all([block])[0])  # its rows are views, read-only as it is


def _sample(
    batch: Batch,
    rows: list[int],
    logits: Logits,
    sampler: RowSampler,
    config: StepConfig,
    clock: Callable[[], float] | None,
) -> tuple[list[Reply], list[Prefix], float]:
    """Sample each row's next token from its row of `logits` in one sampler call, and move
    the rows' random streams on; the time in the sampler, by `clock` (0 without one)."""
    # `rows` ascend (a run's decoding rows, or the rows whose first token is due), so as many
    # as the batch has are all of them, in order.
    every = len(rows) == len(batch)
    requests = cast(
        Sequence[GenerateRequest],
        batch.requests if every else [batch.requests[row] for row in rows],
    )
    idx = None if every else np.asarray(rows, dtype=np.intp)
    part = batch.sampling if idx is None else batch.sampling.filter(idx)
    start = clock() if clock else 0.0
    samples = sampler.sample(logits, part, requests)
    sample_s = clock() - start if clock else 0.0
    ended = part.advance(samples.tokens)
    if idx is not None:  # the rows' positions, last and seen tokens, back into the batch's rows
        batch.sampling.position[idx] = part.position
        batch.sampling.last_token[idx] = part.last_token
        for row, seen in zip(rows, part.seen, strict=True):
            batch.sampling.seen[row] = seen
    # No Python per row here: the tokens go out as one reply, and the rest is for the few
    # rows that started or ended (each request's END after its token: replies go out in
    # order).
    replies: list[Reply] = [(Sampled(requests, samples), None)]
    prefixes: list[Prefix] = []
    for j in (part.position == 1).nonzero()[0].tolist():  # first tokens: now decoding
        r = requests[j]
        if len(r.feed) and config.caching:
            # The prompt's state, for a later request on the same prompt (first tokens come
            # from host logits: only decoding rows leave theirs on the device).
            assert isinstance(logits, np.ndarray)
            prompt_lp = logits[j] - samples.lse[j]
            prompt_lp.setflags(write=False)
            prefixes.append(Prefix(r.prompt, batch.row_state(rows[j]), prompt_lp, r.key))
    for j in ended.nonzero()[0].tolist():
        requests[j].done = True
        replies.append((requests[j], END))
    return replies, prefixes, sample_s


def _padded(n: int, chunk: int) -> int:
    """The run length a discard-state chunk of `n` tokens is padded to."""
    return min(1 << (n - 1).bit_length(), max(chunk, n))
