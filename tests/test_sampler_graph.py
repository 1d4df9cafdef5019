"""The batch samplers against the numpy reference: same ids, same stream, same filters.

Every test that takes the `sampler` fixture runs on the sampler graph and on the native
sampler (plain rows in C, server/_fastsample.c, the others through the graph).

Statistical checks draw with a fixed counter stream (one seed, positions 0..N-1), so they are
deterministic; their tolerances are a few binomial standard deviations.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from test_sampling import DISTRIBUTION_CASES, LOGITS, reference

from server.native_sampler import NativeSampler
from server.sampler import (
    GRAPH_PATH,
    BatchSampler,
    ReferenceSampler,
    SampledRows,
    SamplingRows,
    graph_feeds,
    stream_uniforms,
)
from server.sampling import SamplingParams, log_softmax

AnySampler = BatchSampler | NativeSampler


@pytest.fixture(scope="module", params=["graph", "native"])
def sampler(request: pytest.FixtureRequest) -> AnySampler:
    if request.param == "graph":
        return BatchSampler()
    return NativeSampler(BatchSampler())


def make_rows(
    params: list[SamplingParams],
    vocab: int,
    histories: list[np.ndarray | None] | None = None,
    position: int = 0,
) -> SamplingRows:
    rows = SamplingRows.from_params(params, histories or [None] * len(params), vocab)
    rows.position[:] = position
    return rows


def frequencies(
    sampler: AnySampler,
    logits: np.ndarray,
    params: SamplingParams,
    n: int = 40000,
    history: np.ndarray | None = None,
) -> np.ndarray:
    """How often each token is drawn from one row of logits at stream positions 0..n-1."""
    rows = make_rows([params] * n, len(logits), [history] * n)
    rows.seed[:] = 12345
    rows.position[:] = np.arange(n)
    out = sampler.sample(np.repeat(logits[None, :].astype(np.float32), n, axis=0), rows)
    return np.bincount(out.tokens, minlength=len(logits)) / n


def binomial_tolerance(p: np.ndarray, n: int) -> np.ndarray:
    return 5 * np.sqrt(p * (1 - p) / n) + 1e-9


MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0),
    SamplingParams(top_k=3, banned_ids=frozenset({0})),
    SamplingParams(top_k=200, top_p=0.5),
    SamplingParams(top_p=0.95),
    SamplingParams(min_p=0.2, temperature=0.5),
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(banned_ids=frozenset({0, 2})),
    SamplingParams(top_logprobs=4),
    SamplingParams(temperature=1.7, top_k=50),
    SamplingParams(top_p=0.3, top_logprobs=2),
    SamplingParams(temperature=0.2, repetition_penalty=0.8),
    SamplingParams(top_k=1, temperature=0.7),
    SamplingParams(top_p=0.999, temperature=1.3),
]


def mixed_rows(vocab: int, position: int, seed: int = 0) -> SamplingRows:
    rng = np.random.default_rng(seed)
    histories = [rng.integers(0, vocab, 20) for _ in MIXED]
    rows = make_rows(MIXED, vocab, histories, position)
    rows.seed[:] = np.arange(len(MIXED)) * 7919 + seed
    return rows


def test_the_committed_graph_is_what_the_builder_makes() -> None:
    from exporter.sampler_graph import build

    assert build().SerializeToString() == GRAPH_PATH.read_bytes()


def test_counter_uniforms_are_bit_identical_to_the_reference() -> None:
    rng = np.random.default_rng(0)
    n = 4096
    seeds = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    positions = rng.integers(0, 2**62, n, dtype=np.int64)
    seeds[:4] = [0, -1, -(2**63), 2**63 - 1]
    positions[:4] = [0, 2**32 - 1, 2**32, 2**63 - 1]
    rows = make_rows([SamplingParams()] * n, 8)
    rows.seed, rows.position = seeds, positions
    session = ort.InferenceSession(str(GRAPH_PATH), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = graph_feeds(rows)
    feeds["logits"] = np.zeros((n, 8), dtype=np.float32)
    (graph,) = session.run(["uniforms"], feeds)
    expected = stream_uniforms(seeds, positions)
    assert graph.dtype == np.float64
    np.testing.assert_array_equal(graph, expected)
    assert ((expected >= 0) & (expected < 1)).all()


def test_the_stream_is_uniform_and_uncorrelated() -> None:
    u = stream_uniforms(np.full(200_000, 7), np.arange(200_000))
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    assert np.abs(counts - 10_000).max() < 5 * np.sqrt(10_000)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    other = stream_uniforms(np.full(200_000, 8), np.arange(200_000))
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01


def test_greedy_and_top_k_1_are_exact(sampler: AnySampler) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (32, 1000)).astype(np.float32)
    params = [SamplingParams(temperature=0)] * 16 + [SamplingParams(top_k=1, temperature=0.7)] * 16
    params[3] = SamplingParams(temperature=0, banned_ids=frozenset({int(logits[3].argmax())}))
    rows = make_rows(params, 1000)
    out = sampler.sample(logits, rows)
    masked = logits.copy()
    masked[3, logits[3].argmax()] = -np.inf
    np.testing.assert_array_equal(out.tokens, masked.argmax(axis=1))
    np.testing.assert_array_equal(out.tokens, ReferenceSampler().sample(logits, rows).tokens)
    expected = log_softmax(logits)[np.arange(32), out.tokens]
    np.testing.assert_allclose(out.logprobs, expected, rtol=1e-5, atol=1e-5)


def test_greedy_ties_take_the_lowest_id_and_skip_banned_maxima(sampler: AnySampler) -> None:
    logits = np.random.default_rng(4).normal(0, 1, (4, 400)).astype(np.float32)
    logits[0, [300, 5, 130]] = 9.0  # tied in three blocks
    logits[1, [7, 9]] = 9.0  # tied in one block
    logits[2, 3], logits[2, 250] = 50.0, 9.0  # the largest is banned
    logits[3, 17], logits[3, 18] = 9.0, np.nextafter(np.float32(9.0), np.float32(10.0))
    params = [SamplingParams(temperature=0)] * 4
    params[2] = SamplingParams(temperature=0, banned_ids=frozenset({3}))
    out = sampler.sample(logits, make_rows(params, 400))
    assert out.tokens.tolist() == [5, 7, 250, 18]
    # min-p is relative to the largest allowed token, not the banned one
    min_p = SamplingParams(min_p=0.5, banned_ids=frozenset({3}))
    freq = frequencies(sampler, logits[2].astype(np.float64), min_p, n=2000)
    assert freq[250] == 1.0


@pytest.mark.parametrize("position", [0, 1, 2, 3, 50, 1000])
def test_same_ids_as_the_reference_given_the_same_uniforms(
    sampler: AnySampler, position: int
) -> None:
    rng = np.random.default_rng(position)
    logits = rng.normal(0, 3, (len(MIXED), 1000)).astype(np.float32)
    rows = mixed_rows(1000, position)
    graph, ref = sampler.sample(logits, rows), ReferenceSampler().sample(logits, rows)
    np.testing.assert_array_equal(graph.tokens, ref.tokens)
    np.testing.assert_allclose(graph.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(graph.lse, ref.lse, rtol=1e-6)
    asked = np.arange(graph.top_ids.shape[1])[None, :] < rows.top_logprobs[:, None]
    np.testing.assert_array_equal(graph.top_ids[asked], ref.top_ids[asked])
    np.testing.assert_allclose(
        graph.top_logprobs[asked], ref.top_logprobs[asked], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_wide_nuclei_give_the_reference_ids(sampler: AnySampler, top_p: float) -> None:
    # Flat-ish rows of 2000: nuclei of hundreds to thousands of tokens, past the candidates.
    logits = np.random.default_rng(7).normal(0, 1, (48, 2000)).astype(np.float32)
    logits[:8] = np.round(logits[:8], 1)  # many ties at every threshold
    rows = make_rows([SamplingParams(top_p=top_p, temperature=0.9)] * 48, 2000, position=3)
    graph, ref = sampler.sample(logits, rows), ReferenceSampler().sample(logits, rows)
    np.testing.assert_array_equal(graph.tokens, ref.tokens)


# The filters' shared cases; top-k 1 is drawn exactly (above); a banned id added.
@pytest.mark.parametrize(
    "params",
    [p for p in DISTRIBUTION_CASES if p.top_k != 1] + [SamplingParams(banned_ids=frozenset({2}))],
)
def test_sampled_distribution_matches_the_reference(
    sampler: AnySampler, params: SamplingParams
) -> None:
    expected = reference(LOGITS, params)
    if params.banned_ids:
        expected = np.exp(LOGITS) * [i not in params.banned_ids for i in range(6)]
        expected /= expected.sum()
    freq = frequencies(sampler, LOGITS, params)
    assert (freq[expected == 0] == 0).all()
    assert (np.abs(freq - expected) <= binomial_tolerance(expected, 40000)).all()


def test_a_nucleus_wider_than_the_sorted_candidates(sampler: AnySampler) -> None:
    # 300 nearly flat logits: the 0.9 nucleus holds ~270 tokens, past the 256 candidates.
    logits = np.random.default_rng(0).normal(0, 0.2, 300)
    params = SamplingParams(top_p=0.9)
    expected = reference(logits, params)
    assert (expected > 0).sum() > 256
    freq = frequencies(sampler, logits, params, n=60000)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))
    assert (np.abs(freq - expected) <= binomial_tolerance(expected, 60000)).all()


def test_a_row_does_not_depend_on_what_shares_its_batch(sampler: AnySampler) -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (len(MIXED), 300)).astype(np.float32)
    rows = mixed_rows(300, position=9)
    together = sampler.sample(logits, rows)
    for r in range(len(MIXED)):
        alone = sampler.sample(logits[r : r + 1], rows.filter([r]))
        assert alone.tokens[0] == together.tokens[r]
        assert alone.logprobs[0] == together.logprobs[r]
        assert alone.lse[0] == together.lse[r]
        assert alone.generated()[0] == together.generated()[r]
    # The same rows in another order, beside greedy and top-p rows of other seeds.
    extra = make_rows([SamplingParams(temperature=0), SamplingParams(top_p=0.5, seed=3)], 300)
    order = rng.permutation(len(MIXED))
    both = SamplingRows.concatenate([extra, rows.filter(order)])
    mixed = sampler.sample(np.concatenate([logits[:2], logits[order]]), both)
    np.testing.assert_array_equal(mixed.tokens[2:], together.tokens[order])
    np.testing.assert_array_equal(mixed.logprobs[2:], together.logprobs[order])


def test_banned_ids_are_never_chosen(sampler: AnySampler) -> None:
    # Token 1 dwarfs the rest: at a low temperature the others underflow next to it.
    logits = np.array([0.5, 200.0, -0.5, 1.0, 0.0])
    banned = frozenset({1})
    for params in (
        SamplingParams(temperature=0.25, banned_ids=banned),
        SamplingParams(banned_ids=banned),
        SamplingParams(top_k=2, banned_ids=banned),
        SamplingParams(top_p=0.9, banned_ids=banned),
    ):
        freq = frequencies(sampler, logits, params, n=20000)
        assert freq[1] == 0
        others = np.delete(logits, 1) / params.temperature
        expected = reference(np.delete(logits, 1), params)
        if params.top_k == 0 and params.top_p == 1:
            expected = np.exp(log_softmax(others))
        assert (np.abs(np.delete(freq, 1) - expected) <= binomial_tolerance(expected, 20000)).all()
    greedy = make_rows([SamplingParams(temperature=0, banned_ids=banned)], 5)
    out = sampler.sample(logits[None, :].astype(np.float32), greedy)
    assert out.tokens.tolist() == [3]
    np.testing.assert_allclose(out.logprobs, log_softmax(logits.astype(np.float32))[3], rtol=1e-5)


def test_repetition_penalty_is_applied_to_seen_tokens(sampler: AnySampler) -> None:
    logits = np.array([2.0, -1.0, 1.0, 0.5, -0.5])
    params = SamplingParams(repetition_penalty=2.0)
    freq = frequencies(sampler, logits, params, history=np.array([0, 1, 1, 1]))
    expected = np.exp(log_softmax(np.array([1.0, -2.0, 1.0, 0.5, -0.5])))
    assert (np.abs(freq - expected) <= binomial_tolerance(expected, 40000)).all()


def test_advance_moves_the_stream_and_marks_penalised_rows_tokens() -> None:
    rows = make_rows([SamplingParams(repetition_penalty=1.3), SamplingParams()], 10)
    rows.advance(np.array([4, 5]))
    assert rows.position.tolist() == [1, 1]
    assert np.flatnonzero(rows.seen[0]).tolist() == [4]
    assert rows.seen[1] is None  # not penalised: no mask kept
    assert np.flatnonzero(rows.seen_mask()[0]).tolist() == [4] and not rows.seen_mask()[1].any()


def test_top_logprobs_most_likely_first_ties_by_lower_id(sampler: AnySampler) -> None:
    logits = np.log(np.array([[0.1, 0.3, 0.05, 0.3, 0.25]] * 2, dtype=np.float32))
    rows = make_rows([SamplingParams(top_logprobs=3), SamplingParams()], 5)
    out = sampler.sample(logits, rows)
    first, second = out.generated()
    assert [t for t, _ in first.top] == [1, 3, 4]
    np.testing.assert_allclose([lp for _, lp in first.top], np.log([0.3, 0.3, 0.25]), rtol=1e-5)
    assert second.top == ()
    none = sampler.sample(logits, make_rows([SamplingParams()] * 2, 5))
    assert none.top_ids.shape == (2, 0)


def test_seeds_fixed_or_drawn_once_per_request() -> None:
    rows = SamplingRows.from_params(
        [SamplingParams(seed=42), SamplingParams(seed=-1), SamplingParams(), SamplingParams()],
        [None] * 4,
        10,
    )
    assert rows.seed[0] == 42
    assert rows.seed[1] == -1  # seed mod 2**64, as two's complement
    assert rows.seed[2] != rows.seed[3]
    again = SamplingRows.from_params([SamplingParams(seed=42)], [None], 10)
    np.testing.assert_array_equal(
        stream_uniforms(again.seed, np.arange(1)), stream_uniforms(rows.seed[:1], np.arange(1))
    )


def test_filter_and_concatenate_keep_rows_whole() -> None:
    params = [SamplingParams(top_k=k + 1, banned_ids=frozenset({k})) for k in range(4)]
    rows = make_rows(params, 6)
    rows.position[:] = [10, 11, 12, 13]
    picked = rows.filter([3, 1])
    assert picked.top_k.tolist() == [4, 2] and picked.position.tolist() == [13, 11]
    assert picked.banned_ids.tolist() == [[3], [1]]
    joined = SamplingRows.concatenate([picked, rows.filter([0])])
    assert len(joined) == 3 and joined.top_k.tolist() == [4, 2, 1]
    wider = make_rows([SamplingParams(banned_ids=frozenset({1, 4, 5}))], 6)
    mixed = SamplingRows.concatenate([rows.filter([0]), wider, make_rows([SamplingParams()], 6)])
    assert mixed.banned_ids.tolist() == [[0, -1, -1], [1, 4, 5], [-1, -1, -1]]
    assert SamplingRows.from_params([], [], 6).banned_ids.shape == (0, 0)
    # A penalised row's seen tokens go with it, copied: filtered rows are new rows.
    penalised = make_rows([SamplingParams(), SamplingParams(repetition_penalty=1.5)], 6)
    penalised.advance(np.array([2, 3]))
    moved = SamplingRows.concatenate([rows.filter([0]), penalised.filter([1, 0])])
    assert [None if m is None else np.flatnonzero(m).tolist() for m in moved.seen] == [
        None,
        [3],
        None,
    ]
    moved.advance(np.array([0, 5, 0]))
    assert np.flatnonzero(penalised.seen[1]).tolist() == [3]
    with pytest.raises(ValueError, match="different vocabularies"):
        SamplingRows.concatenate([rows, make_rows([SamplingParams()], 7)])


def test_ortvalue_logits_and_shape_errors(sampler: AnySampler) -> None:
    logits = np.random.default_rng(3).normal(size=(3, 20)).astype(np.float32)
    rows = make_rows([SamplingParams(temperature=0)] * 3, 20)
    out = sampler.sample(ort.OrtValue.ortvalue_from_numpy(logits), rows)
    assert isinstance(out, SampledRows)
    np.testing.assert_array_equal(out.tokens, logits.argmax(axis=1))
    # A step graph's [B, 1, V] output as it is, on the host or as an OrtValue.
    steps = logits[:, None, :]
    np.testing.assert_array_equal(sampler.sample(steps, rows).tokens, out.tokens)
    as_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(steps))
    np.testing.assert_array_equal(sampler.sample(as_value, rows).tokens, out.tokens)
    with pytest.raises(ValueError, match="do not match 3 rows"):
        sampler.sample(logits[:2], rows)
    with pytest.raises(ValueError, match="do not match 3 rows"):
        sampler.sample(logits[:, None, :10], rows)
    rows.banned_ids = np.full((3, 1), 20)
    with pytest.raises(ValueError, match="past the vocabulary of 20"):
        sampler.sample(logits, rows)


def test_the_server_side_imports_neither_onnx_nor_torch() -> None:
    code = (
        "import sys; from server.sampler import BatchSampler; BatchSampler(); "
        "bad = {'onnx', 'torch'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
