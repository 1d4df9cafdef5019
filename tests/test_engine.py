"""The engine on real tiny trained bundles and real onnxruntime sessions.

References are computed straight from the bundle's step graph (eos + tokens in one run from the
zero state), so the engine's chunking, batching, padding and caching are all checked against
the plainest possible use of the model.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from server.batch import Batch
from server.bundle import Bundle, load_bundle
from server.delivery import dispatch
from server.engine import Engine, EngineConfig, EngineError, Overloaded, SamplingParams
from server.metrics import Metrics
from server.requests import END, EmbedRequest, GenerateRequest, NextRequest, Request, ScoreRequest
from server.row_sampler import GraphRowSampler, NumpyRowSampler
from server.runner import DeviceStates, Sessions
from server.sampling import log_softmax
from server.step import StepConfig, step

# Always feed the tokens before a request's last on the prefill graph, or never: the measured
# choice of a tiny model could be either.
SPLITS = (1, 10**6)


def close(actual: Any, expected: Any) -> None:
    """Equal within float tolerance (batching and chunking may reorder float arithmetic)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


class Direct:
    """The bundle's step graph run plainly: eos + tokens in one run from the zero state."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.session = bundle.open_session("step")
        self.names = [s.input for s in bundle.state]

    def run(
        self, tokens: list[int], state: tuple[np.ndarray, ...] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        feeds: dict[str, np.ndarray] = {"tokens": np.array([tokens], dtype=np.int64)}
        feeds.update(zip(self.names, state or self.bundle.zero_state(1), strict=True))
        logits, features, *new = self.session.run(None, feeds)
        return logits[0], features[0], new

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """[len(ids) + 1, V]: the next-token log-probs after eos, eos + ids[0], ..."""
        return log_softmax(self.run([self.bundle.eos_id, *ids])[0])


def run_engine(
    bundle: Bundle,
    body: Callable[[Engine], Awaitable[Any]],
    metrics: Metrics | None = None,
    **config: Any,
) -> Any:
    async def main() -> Any:
        recorder = metrics.engine_metrics(bundle.name, bundle.version) if metrics else None
        engine = Engine(bundle, EngineConfig(**config), recorder)
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.close()

    return asyncio.run(main())


async def collect(engine: Engine, prompt: list[int], max_tokens: int, params: SamplingParams):
    return [
        (t.token_id, t.logprob, t.top) async for t in engine.generate(prompt, max_tokens, params)
    ]


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def runs(metrics: Metrics, bundle: Bundle) -> tuple[float, float]:
    """(onnxruntime runs, requests summed over those runs) recorded so far."""
    labels = {"model": bundle.name}
    count = metrics.registry.get_sample_value("rnnlm_batch_size_count", labels) or 0.0
    total = metrics.registry.get_sample_value("rnnlm_batch_size_sum", labels) or 0.0
    return count, total


# ---- results against the plain model ---------------------------------------------------------


def test_next_token_logprobs_match_the_model(bundle: Bundle) -> None:
    direct = Direct(bundle)
    rng = np.random.default_rng(0)
    contexts = [[], [3], rng.integers(0, bundle.vocab_size, 7).tolist()]
    contexts.append(rng.integers(0, bundle.vocab_size, 45).tolist())  # several chunks of 8

    async def body(engine: Engine) -> list[np.ndarray]:
        return [await engine.next_token_logprobs(c) for c in contexts]

    for split in SPLITS:
        got = run_engine(bundle, body, prefill_chunk=8, state_cache_bytes=0, prefill_split=split)
        for context, lp in zip(contexts, got, strict=True):
            assert lp.shape == (bundle.vocab_size,) and lp.dtype == np.float32
            close(lp, direct.logprobs(context)[-1])


def test_score_matches_the_step_graph_across_chunks(bundle: Bundle) -> None:
    direct = Direct(bundle)
    ids = np.random.default_rng(1).integers(0, bundle.vocab_size, 150).tolist()
    expected = direct.logprobs(ids)[np.arange(len(ids)), ids]

    async def body(engine: Engine) -> list[np.ndarray]:
        return [await engine.score(ids), await engine.score(ids[:1]), await engine.score([])]

    full, one, empty = run_engine(bundle, body, prefill_chunk=16)
    close(full, expected)
    close(one, expected[:1])
    assert empty.shape == (0,)


def test_embed_pools_the_last_layer_features(bundle: Bundle) -> None:
    direct = Direct(bundle)
    ids = np.random.default_rng(2).integers(0, bundle.vocab_size, 21).tolist()
    features = direct.run([bundle.eos_id, *ids])[1][1:]
    expected = {"last": features[-1], "mean": features.mean(axis=0), "max": features.max(axis=0)}

    async def body(engine: Engine) -> dict[str, np.ndarray]:
        return {p: await engine.embed(ids, p) for p in expected}

    got = run_engine(bundle, body, prefill_chunk=8)
    for pooling, vec in got.items():
        assert vec.shape == (bundle.hidden,)
        close(vec, expected[pooling])


def test_greedy_generation_is_the_argmax_of_the_model(bundle: Bundle) -> None:
    direct = Direct(bundle)
    prompt = np.random.default_rng(3).integers(0, bundle.vocab_size, 6).tolist()
    logits, _, state = direct.run([bundle.eos_id, *prompt])
    expected = []
    for _ in range(15):
        lp = log_softmax(logits[-1])
        token = int(lp.argmax())
        expected.append((token, float(lp[token])))
        logits, _, state = direct.run([token], tuple(state))

    async def body(engine: Engine) -> list:
        return await collect(engine, prompt, 15, SamplingParams(temperature=0))

    got = run_engine(bundle, body, prefill_chunk=4)
    assert [t for t, _, _ in got] == [t for t, _ in expected]
    close([lp for _, lp, _ in got], [lp for _, lp in expected])


# ---- batching never changes a result --------------------------------------------------------

GEN_PARAMS = (
    SamplingParams(seed=1),
    SamplingParams(seed=2, temperature=0.7, top_k=5),
    SamplingParams(seed=3, top_p=0.8, min_p=0.05),
    SamplingParams(seed=4, repetition_penalty=1.3, top_logprobs=3),
    SamplingParams(temperature=0, banned_ids=frozenset({1})),
)


def mixed_workload(vocab: int) -> list[Callable[[Engine], Coroutine[Any, Any, Any]]]:
    """Requests of every kind and of mixed lengths, as engine calls."""
    rng = np.random.default_rng(4)

    def toks(n: int) -> list[int]:
        return rng.integers(0, vocab, n).tolist()

    calls: list[Callable[[Engine], Coroutine[Any, Any, Any]]] = []
    for n in (0, 1, 3, 8, 17, 40):
        calls.append(functools.partial(Engine.next_token_logprobs, context_ids=toks(n)))
    for n in (1, 2, 9, 33, 70):
        calls.append(functools.partial(Engine.score, token_ids=toks(n)))
    for n, pooling in ((5, "last"), (16, "mean"), (23, "max"), (7, "mean")):
        calls.append(functools.partial(Engine.embed, token_ids=toks(n), pooling=pooling))
    for n, params in zip((0, 2, 9, 20, 5), GEN_PARAMS, strict=True):
        calls.append(functools.partial(collect, prompt=toks(n), max_tokens=12, params=params))
    return calls


def assert_same(a: list[Any], b: list[Any]) -> None:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            close(x, y)
        else:  # a generation: the same tokens, the same log-probs and alternatives
            assert [t for t, _, _ in x] == [t for t, _, _ in y]
            close([lp for _, lp, _ in x], [lp for _, lp, _ in y])
            assert [[i for i, _ in top] for _, _, top in x] == [
                [i for i, _ in top] for _, _, top in y
            ]


Body = Callable[[Engine], Coroutine[Any, Any, list[Any]]]


def batched_workload(bundle: Bundle) -> tuple[Body, Body, list[Any]]:
    """The mixed workload's two engine bodies, all its calls at once and one after the other,
    and the first's results on the default engine (some of whose runs held several requests)."""
    calls = mixed_workload(bundle.vocab_size)

    async def together(engine: Engine) -> list[Any]:
        return list(await asyncio.gather(*(call(engine) for call in calls)))

    async def alone(engine: Engine) -> list[Any]:
        return [await call(engine) for call in calls]

    metrics = Metrics()
    batched = run_engine(bundle, together, metrics, prefill_chunk=8)
    count, total = runs(metrics, bundle)
    assert total > count  # some runs really held several requests
    return together, alone, batched


def test_batching_on_and_off_give_the_same_results(bundle: Bundle) -> None:
    together, alone, batched = batched_workload(bundle)
    small = run_engine(bundle, together, prefill_chunk=8, max_batch_size=5)
    two_threads = run_engine(bundle, together, prefill_chunk=8, batch_threads=2)
    three_threads = run_engine(bundle, together, prefill_chunk=8, batch_threads=3)
    off_metrics = Metrics()
    unbatched = run_engine(bundle, together, off_metrics, prefill_chunk=8, batching=False)
    count, total = runs(off_metrics, bundle)
    assert total == count  # one request per run
    sequential = run_engine(bundle, alone, prefill_chunk=8, state_cache_bytes=0)
    for other in (small, two_threads, three_threads, unbatched, sequential):
        assert_same(batched, other)
    for split in SPLITS:
        assert_same(batched, run_engine(bundle, together, prefill_chunk=8, prefill_split=split))


def test_batching_threads_share_the_requests_evenly(lstm: Bundle) -> None:
    """Each thread's batch takes an even share, so their runs are alike and overlap."""

    async def body(engine: Engine) -> list[int]:
        streams = [engine.generate([1], 10**9, SamplingParams(seed=i)) for i in range(13)]
        for stream in streams:
            await anext(stream)
        scheduler = engine._scheduler
        assert scheduler is not None
        # A first token can come before its stream joins a batch (started on the event loop).
        await wait_until(lambda: sum(scheduler.sizes) == 13)
        sizes = sorted(scheduler.sizes)
        for stream in streams:
            await stream.aclose()
        return sizes

    sizes = run_engine(lstm, body, batch_threads=3)
    assert sum(sizes) == 13 and max(sizes) <= 5  # none holds more than a third, rounded up


def test_seeded_generation_ignores_its_companions(lstm: Bundle) -> None:
    prompt = [2, 3, 4]
    params = SamplingParams(seed=123, temperature=1.2, top_k=10)

    async def alone(engine: Engine) -> list:
        return await collect(engine, prompt, 30, params)

    async def crowded(engine: Engine) -> list:
        others = [
            collect(engine, [5, i], 20 + i, SamplingParams(temperature=0.9 + i / 10))
            for i in range(20)
        ]
        results = await asyncio.gather(collect(engine, prompt, 30, params), *others)
        return results[0]

    first = run_engine(lstm, alone)
    assert first == run_engine(lstm, alone)
    assert first == run_engine(lstm, crowded)
    other_seed = run_engine(
        lstm, lambda e: collect(e, prompt, 30, SamplingParams(seed=7, temperature=1.2, top_k=10))
    )
    assert [t for t, _, _ in other_seed] != [t for t, _, _ in first]


def identical(a: list[Any], b: list[Any]) -> None:
    """The same bits: every array equal, every generation's tokens and numbers equal."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
        else:
            assert x == y


def test_an_int8_bundle_gives_the_same_bits_however_requests_are_batched(
    int8_bundle: Path,
) -> None:
    """int8 graphs read each row's activations on a grid of its own (exporter.rowwise), so
    batching, chunking, the state cache and the prefill split change no bit of any result."""
    bundle = load_bundle(int8_bundle)
    together, alone, batched = batched_workload(bundle)
    for other in (
        run_engine(bundle, alone, prefill_chunk=8, state_cache_bytes=0),
        run_engine(bundle, together, prefill_chunk=3, batching=False),
        *(run_engine(bundle, together, prefill_split=split) for split in SPLITS),
    ):
        identical(batched, other)


def test_an_int8_seeded_generation_is_the_same_alone_and_among_64(int8_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    params = [SamplingParams(seed=i, temperature=1.1) for i in range(64)]

    async def alone(engine: Engine) -> list[list]:
        return [await collect(engine, [2, i], 40, params[i]) for i in range(4)]

    async def crowded(engine: Engine) -> list[list]:
        calls = (collect(engine, [2, i % bundle.vocab_size], 40, p) for i, p in enumerate(params))
        return list(await asyncio.gather(*calls))[:4]

    metrics = Metrics()
    among = run_engine(bundle, crowded, metrics)
    count, total = runs(metrics, bundle)
    assert total / count > 16  # the crowd's rows really shared runs
    assert run_engine(bundle, alone) == among


def test_stop_ids_end_generation_after_the_stop_token(lstm: Bundle) -> None:
    async def body(engine: Engine) -> tuple[list, list]:
        greedy = SamplingParams(temperature=0)
        free = await collect(engine, [4, 5], 5, greedy)
        stop = frozenset({free[2][0]})
        stopped = [t.token_id async for t in engine.generate([4, 5], 5, greedy, stop)]
        return free, stopped

    free, stopped = run_engine(lstm, body)
    assert len(free) == 5
    assert stopped == [t for t, _, _ in free][: len(stopped)]
    assert stopped[-1] == free[2][0] and len(stopped) <= 3


class CountingSessions:
    """The batch's runner on the bundle's real graphs, recording each run's graph and shape."""

    def __init__(self, bundle: Bundle) -> None:
        self.step_session = bundle.open_session("step")
        self.score_session = bundle.open_session("score")
        self.prefill_session = bundle.open_session("prefill")
        self.names = [s.input for s in bundle.state]
        self.shapes: list[tuple[int, int]] = []
        self.runs: list[tuple[str, tuple[int, int]]] = []

    def _record(self, graph: str, tokens: np.ndarray) -> None:
        self.shapes.append(tokens.shape)
        self.runs.append((graph, tokens.shape))

    def step(self, tokens: np.ndarray, states: Any) -> tuple[np.ndarray, np.ndarray, list]:
        self._record("step", tokens)
        feeds = {"tokens": tokens, **dict(zip(self.names, states, strict=True))}
        logits, features, *new = self.step_session.run(None, feeds)
        return logits, features, new

    def score(self, tokens: np.ndarray, targets: np.ndarray, states: Any) -> tuple:
        self._record("score", tokens)
        feeds = {"tokens": tokens, "targets": targets, **dict(zip(self.names, states, strict=True))}
        logprobs, features, *new = self.score_session.run(None, feeds)
        return logprobs, features, new

    def prefill(self, tokens: np.ndarray, states: Any) -> tuple[np.ndarray, list]:
        self._record("prefill", tokens)
        feeds = {"tokens": tokens, **dict(zip(self.names, states, strict=True))}
        features, *new = self.prefill_session.run(None, feeds)
        return features, new


def run_to_the_end(batch: Batch, sessions: CountingSessions, config: StepConfig) -> int:
    """Step the batch until every request finished, delivering as the engine does; the steps."""
    steps = 0
    sampler = NumpyRowSampler()
    while len(batch):
        result = step(batch, sessions, config, sampler)
        for request, payload in result.replies:
            request.deliver(payload)
        batch = result.batch.live()
        steps += 1
    return steps


def next_token_runs(
    bundle: Bundle, ids: np.ndarray, split: int
) -> tuple[list[tuple[str, tuple[int, int]]], int, np.ndarray]:
    """One next-token request for `ids` through a batch (chunks of 8, `prefill_split`
    `split`): the runs it made, the steps it took and its log-probs."""
    zero = tuple(s[:, 0, :] for s in bundle.zero_state(1))
    sessions = CountingSessions(bundle)
    config = StepConfig(bundle.vocab_size, bundle.hidden, chunk=8, prefill_split=split)
    got: list[Any] = []
    batch = Batch.of([NextRequest(ids, ids, zero, None, got.append)], bundle.vocab_size)
    steps = run_to_the_end(batch, sessions, config)
    return sessions.runs, steps, got[0]


def test_a_short_feed_runs_whole_on_the_step_graph(lstm: Bundle) -> None:
    """Fewer than `prefill_split` tokens before the last: one step-graph run saves a run."""
    ids = np.random.default_rng(8).integers(0, lstm.vocab_size, 21)
    runs, _, logprobs = next_token_runs(lstm, ids, split=5)
    # 20 tokens before the last: two whole chunks on the prefill graph, then 4 + the last.
    assert runs == [("prefill", (1, 8)), ("prefill", (1, 8)), ("step", (1, 5))]
    close(logprobs, Direct(lstm).logprobs(ids.tolist())[-1])


def test_step_budget_and_run_splits_never_change_results(lstm: Bundle) -> None:
    """A tight run budget holds chunks back and splits groups; the numbers stay the same."""
    rng = np.random.default_rng(6)
    texts = [rng.integers(0, lstm.vocab_size, n) for n in (3, 30, 17, 64, 9, 40)]
    zero = tuple(s[:, 0, :] for s in lstm.zero_state(1))
    eos = np.array([lstm.eos_id])

    def finish(run_elements: int) -> tuple[list[Any], CountingSessions, int]:
        results: list[list[Any]] = [[] for _ in range(2 * len(texts))]
        requests: list[Request] = []
        for i, ids in enumerate(texts):
            fed = np.concatenate([eos, ids])
            out = np.zeros(len(ids) + 1, dtype=np.float32)
            requests.append(ScoreRequest(fed[:-1], ids, zero, out, results[2 * i].append))
            requests.append(EmbedRequest(fed, zero, "mean", lstm.hidden, results[2 * i + 1].append))
        sessions = CountingSessions(lstm)
        config = StepConfig(lstm.vocab_size, lstm.hidden, chunk=8, run_elements=run_elements)
        steps = run_to_the_end(Batch.of(requests, lstm.vocab_size), sessions, config)
        return [r[0] for r in results], sessions, steps

    roomy, roomy_sessions, roomy_steps = finish(1 << 24)
    tight, tight_sessions, tight_steps = finish(20 * (lstm.vocab_size + lstm.hidden))
    assert tight_steps > roomy_steps  # chunks were held back for later steps
    assert max(b * t for b, t in tight_sessions.shapes) < max(
        b * t for b, t in roomy_sessions.shapes
    )
    for a, b in zip(roomy, tight, strict=True):
        close(a, b)


def test_decoding_rows_keep_their_states_on_the_device_between_steps(
    lstm: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `device_logits`, a step whose rows all decode takes the states the last decode
    run left on the device (`DeviceStates`: CPU values here, GPU memory under CUDA) and
    leaves its own there; they are copied to the host only when the batch's rows change.
    The tokens are those of host states."""
    copies = 0
    host = DeviceStates.host

    def counted(self: DeviceStates) -> tuple[np.ndarray, ...]:
        nonlocal copies
        copies += self._host is None
        return host(self)

    monkeypatch.setattr(DeviceStates, "host", counted)
    zero = tuple(s[:, 0, :] for s in lstm.zero_state(1))
    prompt = np.array([lstm.eos_id, 5, 9, 2], dtype=np.int64)

    def generate(device: bool) -> tuple[list[list[int]], list[bool]]:
        sessions = Sessions(lstm.open_session("step"), None, None, lstm, None)
        config = StepConfig(lstm.vocab_size, lstm.hidden, chunk=8, device_logits=device)
        sampler = GraphRowSampler(["CPUExecutionProvider"], ort.SessionOptions())
        got: list[list[Any]] = [[] for _ in range(4)]
        batch = Batch.of(
            [
                GenerateRequest(
                    prompt,
                    prompt,
                    zero,
                    None,
                    SamplingParams(seed=i),
                    5 + 4 * i,
                    frozenset(),
                    None,
                    got[i].append,
                )
                for i in range(4)
            ],
            lstm.vocab_size,
        )
        on_device = []
        while len(batch):
            result = step(batch, sessions, config, sampler)
            dispatch(result.replies)
            on_device.append(isinstance(result.batch.states, DeviceStates))
            batch = result.batch.live()
        return [[t.token_id for t in g if t is not END] for g in got], on_device

    tokens, on_device = generate(True)
    assert copies <= 4  # three rows ended while others ran, and the last one
    assert [len(t) for t in tokens] == [5, 9, 13, 17]
    assert on_device[0] is False and sum(on_device) >= 15  # the prompt's step is on the host
    assert generate(False) == (tokens, [False] * len(on_device))


def test_a_context_runs_on_the_prefill_graph_but_its_last_token(lstm: Bundle) -> None:
    """Only the last token's logits are read: the tokens before it go through the prefill
    graph (no output layer) in chunks, and the last one joins a one-token step run in the
    same step as the last chunk."""
    ids = np.random.default_rng(7).integers(0, lstm.vocab_size, 20)
    runs, steps, logprobs = next_token_runs(lstm, ids, split=1)
    assert runs == [
        ("prefill", (1, 8)), ("prefill", (1, 8)), ("prefill", (1, 3)), ("step", (1, 1))
    ]  # fmt: skip
    assert steps == 3
    close(logprobs, Direct(lstm).logprobs(ids.tolist())[-1])


def test_a_bundle_without_a_prefill_graph_gives_the_same_results(
    lstm: Bundle, tmp_path: Path
) -> None:
    """Bundles exported before the prefill graph load, and run its work on the step graph."""
    old = tmp_path / "no-prefill"
    shutil.copytree(lstm.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["graphs"]["prefill"], manifest["files"]["prefill.onnx"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "prefill.onnx").unlink()
    earlier = load_bundle(old)
    assert lstm.prefill_graph is not None and earlier.prefill_graph is None
    calls = mixed_workload(lstm.vocab_size)

    async def together(engine: Engine) -> list[Any]:
        return list(await asyncio.gather(*(call(engine) for call in calls)))

    assert_same(
        run_engine(lstm, together, prefill_chunk=8, prefill_split=1),
        run_engine(earlier, together, prefill_chunk=8),
    )

    async def split(engine: Engine) -> int | None:
        return engine.prefill_split

    assert run_engine(earlier, split) is None  # the step graph takes a feed in one run


# ---- the state cache --------------------------------------------------------------------------


def test_cache_gives_the_cold_results(bundle: Bundle) -> None:
    direct = Direct(bundle)
    rng = np.random.default_rng(5)
    context = rng.integers(0, bundle.vocab_size, 12).tolist()
    longer = [*context, *rng.integers(0, bundle.vocab_size, 3).tolist()]
    params = SamplingParams(seed=9, top_logprobs=2)

    metrics = Metrics()

    async def warm(engine: Engine) -> tuple:
        first = await engine.next_token_logprobs(context)
        before = runs(metrics, bundle)
        again = await engine.next_token_logprobs(context)
        assert runs(metrics, bundle) == before  # an exact hit costs no run
        extended = await engine.next_token_logprobs(longer)
        entry = engine.cache.lookup(np.array(context))
        generated = await collect(engine, context, 10, params)  # starts from the cached head
        hits = engine.cache.hits
        return first, again, extended, entry, generated, hits

    async def cold(engine: Engine) -> tuple:
        return await engine.next_token_logprobs(longer), await collect(engine, context, 10, params)

    first, again, extended, entry, generated, hits = run_engine(
        bundle, warm, metrics, prefill_chunk=4
    )
    np.testing.assert_array_equal(again, first)
    assert hits == 4  # again, extended, the explicit lookup, generate
    close(extended, direct.logprobs(longer)[-1])
    _, _, state = direct.run([bundle.eos_id, *context])
    assert entry is not None and entry.length == len(context)
    for cached, fresh in zip(entry.state, state, strict=True):
        close(cached, fresh[:, 0, :])
    close(entry.logprobs, direct.logprobs(context)[-1])
    cold_extended, cold_generated = run_engine(bundle, cold, prefill_chunk=4, state_cache_bytes=0)
    close(extended, cold_extended)
    assert_same([generated], [cold_generated])


def test_cache_byte_bound_holds_with_evictions_counted(lstm: Bundle) -> None:
    metrics = Metrics()
    per_entry = 0

    async def body(engine: Engine) -> None:
        nonlocal per_entry
        await engine.next_token_logprobs([1, 2, 3])
        per_entry = engine.cache.bytes
        for i in range(30):
            await engine.next_token_logprobs([4, i % lstm.vocab_size, 5, 6])
            assert engine.cache.bytes <= engine.cache.capacity

    capacity = 3 * 1200
    run_engine(lstm, body, metrics, state_cache_bytes=capacity)
    assert 0 < per_entry <= capacity // 2
    labels = {"model": lstm.name}
    evictions = metrics.registry.get_sample_value("rnnlm_state_cache_evictions_total", labels)
    assert evictions is not None and evictions >= 30 - capacity // per_entry
    assert (metrics.registry.get_sample_value("rnnlm_state_cache_bytes", labels) or 0) <= capacity
    assert metrics.registry.get_sample_value("rnnlm_state_cache_misses_total", labels) == 31


# ---- admission, cancellation, shutdown --------------------------------------------------------


def test_a_closed_stream_leaves_at_the_next_step(lstm: Bundle) -> None:
    metrics = Metrics()

    async def body(engine: Engine) -> tuple[float, float]:
        stream = engine.generate([1, 2], 10**9, SamplingParams(seed=1))
        for _ in range(3):
            await anext(stream)
        await stream.aclose()
        at_close = runs(metrics, lstm)[0]
        await wait_until(lambda: engine.active == 0)
        await asyncio.sleep(0.05)
        return at_close, runs(metrics, lstm)[0]

    at_close, later = run_engine(lstm, body, metrics)
    assert later - at_close <= 2


def test_cancelling_a_call_removes_its_request(lstm: Bundle) -> None:
    metrics = Metrics()

    async def body(engine: Engine) -> float:
        companion = engine.generate([3], 10**9, SamplingParams(seed=2))
        await anext(companion)
        # 20000 one-token steps; cancelled, it must leave at once, not after all of them.
        task = asyncio.create_task(engine.score([4] * 20000))
        await wait_until(lambda: engine.active == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.active == 1)
        score_rows = runs(metrics, lstm)[1]
        await companion.aclose()
        await wait_until(lambda: engine.active == 0)
        return score_rows

    # The rows the steps ran up to the cancellation: the score's and the companion's, each
    # well under the 20000 the score alone would have taken had it not left (counts, not time).
    assert run_engine(lstm, body, metrics, prefill_chunk=1) < 10_000


def test_overloaded_counts_waiting_work_not_running_rows(lstm: Bundle) -> None:
    """Admission control: generations sitting a step out count as waiting work; rows that
    run every step do not, however many there are."""

    async def crowded(engine: Engine, capped: bool) -> None:
        streams = [engine.generate([1], 10**9, SamplingParams(seed=i)) for i in range(3)]
        for stream in streams:
            await anext(stream)
        scheduler = engine._scheduler
        assert scheduler is not None
        if capped:  # one generation advances per step: two wait for their turn
            await wait_until(lambda: scheduler.waiting >= 2)
            with pytest.raises(Overloaded, match="max_queued 2"):
                await engine.next_token_logprobs([8, 9])
        else:  # three running rows, nothing waiting: admitted
            assert (await engine.next_token_logprobs([8, 9])).shape == (lstm.vocab_size,)
        for stream in streams:
            await stream.aclose()
        await wait_until(lambda: engine.active == 0)
        assert (await engine.next_token_logprobs([8, 9, 10])).shape == (lstm.vocab_size,)

    run_engine(lstm, lambda e: crowded(e, True), max_batch_size=1, max_queued=2)
    run_engine(lstm, lambda e: crowded(e, False), max_queued=2)


def test_close_fails_pending_requests(lstm: Bundle) -> None:
    async def main() -> None:
        engine = Engine(lstm, EngineConfig(prefill_chunk=1))
        await engine.start()
        stream = engine.generate([1], 10**9, SamplingParams(seed=4))
        await anext(stream)
        queued = asyncio.create_task(engine.score([5, 6, 7] * 5000))  # a token a step
        await asyncio.sleep(0.01)
        await engine.close()
        with pytest.raises(EngineError, match="shutting down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineError, match="shutting down"):
            await queued
        with pytest.raises(EngineError, match="shutting down"):
            await engine.next_token_logprobs([1])

    asyncio.run(main())


def test_a_lone_request_does_not_wait_to_fill_a_batch(lstm: Bundle) -> None:
    async def body(engine: Engine) -> float:
        start = time.perf_counter()
        for i in range(5):
            await engine.next_token_logprobs([2, i, 3])
        return time.perf_counter() - start

    assert run_engine(lstm, body, max_queue_wait_ms=2000) < 1.5


def test_a_lone_next_token_request_runs_at_once_on_the_event_loop(lstm: Bundle) -> None:
    """An idle engine answers a short extension without handing it to its thread and back."""
    direct = Direct(lstm)
    metrics = Metrics()

    async def body(engine: Engine) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        await wait_until(engine._idle_now)
        coroutine = engine.next_token_logprobs([3, 4, 5])
        with pytest.raises(StopIteration) as done:  # finished without ever suspending
            coroutine.send(None)
        inline = done.value.value
        # Busy with a stream, the engine batches such a request with the stream's step.
        stream = engine.generate([1], 10**9, SamplingParams(seed=1))
        await anext(stream)
        queued = await engine.next_token_logprobs([3, 4, 5, 6])
        await stream.aclose()
        return inline, queued, runs(metrics, lstm)

    inline, queued, (count, total) = run_engine(lstm, body, metrics)
    close(inline, direct.logprobs([3, 4, 5])[-1])
    close(queued, direct.logprobs([3, 4, 5, 6])[-1])
    assert total > count  # the queued request shared a run with the stream


async def groups_of(stream: Any) -> list[list[int]]:
    """The tokens of a stream as its consumer takes them: each wake-up's tokens together."""
    groups = []
    async for first in stream:
        groups.append([first.token_id, *(t.token_id for t in stream.take_ready())])
    return groups


def test_under_load_tokens_arrive_a_few_at_a_time(lstm: Bundle) -> None:
    params = [SamplingParams(seed=i, temperature=1.3) for i in range(12)]

    async def crowded(engine: Engine) -> list[list[list[int]]]:
        streams = [engine.generate([2, i], 40, p) for i, p in enumerate(params)]
        return list(await asyncio.gather(*(groups_of(s) for s in streams)))

    async def alone(engine: Engine) -> list[list[list[int]]]:
        return [await groups_of(engine.generate([2, i], 40, p)) for i, p in enumerate(params)]

    loaded = run_engine(lstm, crowded, stream_tokens=3)
    single = run_engine(lstm, alone, stream_tokens=3)
    for busy, quiet in zip(loaded, single, strict=True):
        assert [t for g in busy for t in g] == [t for g in quiet for t in g]
        assert all(len(g) == 1 for g in quiet)  # one stream: every token on its own
    assert max(len(g) for busy in loaded for g in busy) >= 3


# ---- bad input --------------------------------------------------------------------------------


def test_bad_inputs_name_the_problem(lstm: Bundle) -> None:
    vocab = lstm.vocab_size

    async def body(engine: Engine) -> None:
        with pytest.raises(ValueError, match=rf"context_ids\[1\] = {vocab} .*vocabulary size"):
            await engine.next_token_logprobs([1, vocab])
        with pytest.raises(ValueError, match=r"token_ids\[0\] = -1"):
            await engine.score([-1, 2])
        with pytest.raises(ValueError, match="pooling"):
            await engine.embed([1], "median")
        with pytest.raises(ValueError, match="empty"):
            await engine.embed([], "last")
        with pytest.raises(ValueError, match="max_tokens"):
            engine.generate([1], 0, SamplingParams())
        with pytest.raises(ValueError, match="banned_ids"):
            engine.generate([1], 3, SamplingParams(banned_ids=frozenset({vocab})))
        with pytest.raises(ValueError, match="stop_ids"):
            engine.generate([1], 3, SamplingParams(), frozenset({vocab + 5}))

    run_engine(lstm, body)


def test_engine_must_be_started(lstm: Bundle) -> None:
    async def main() -> None:
        with pytest.raises(EngineError, match="start"):
            await Engine(lstm).next_token_logprobs([1])

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provider", "tpu"),
        ("max_batch_size", 0),
        ("batch_threads", 0),
        ("prefill_chunk", 0),
        ("max_queue_wait_ms", -1),
        ("stream_ms", -1),
        ("prefill_split", 0),
    ],
)
def test_bad_config_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_cuda_without_a_gpu_fails_at_start(lstm: Bundle) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")

    async def main() -> None:
        engine = Engine(lstm, EngineConfig(provider="cuda"))
        with pytest.raises(EngineError, match="CUDAExecutionProvider"):
            await engine.start()
        auto = Engine(lstm, EngineConfig(provider="auto"))
        await auto.start()
        assert auto.provider == "CPUExecutionProvider"
        await auto.close()

    asyncio.run(main())


@pytest.mark.gpu
@pytest.mark.parametrize("batch_threads", [1, 2])
def test_cuda_runs_the_same_results(lstm: Bundle, batch_threads: int) -> None:
    """On CUDA, also with two threads running one session at once, results are the CPU's."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a GPU")
    calls = mixed_workload(lstm.vocab_size)

    async def together(engine: Engine) -> list[Any]:
        return list(await asyncio.gather(*(call(engine) for call in calls)))

    on_gpu = run_engine(
        lstm, together, provider="cuda", prefill_chunk=8, batch_threads=batch_threads
    )
    on_cpu = run_engine(lstm, together, provider="cpu", prefill_chunk=8)
    for x, y in zip(on_gpu, on_cpu, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)
