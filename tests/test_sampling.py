"""The vectorised sampler: filters, penalties, greedy, log-probs, and row independence.

Distributions are checked without randomness: a grid of N evenly spaced uniforms through the
inverse CDF gives each token N * p draws, to within one.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.sampling import MAX_TOP_LOGPROBS, Sampler, SamplingParams, log_softmax


def grid_frequencies(logits: np.ndarray, params: SamplingParams, n: int = 20000) -> np.ndarray:
    """How often each token is drawn from one row of logits over a grid of n uniforms."""
    rows = np.repeat(logits[None, :].astype(np.float32), n, axis=0)
    uniforms = (np.arange(n) + 0.5) / n
    samples = Sampler().sample(rows, [params] * n, [None] * n, uniforms)
    return np.bincount(samples.tokens, minlength=len(logits)) / n


def reference(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The filtered distribution, computed the slow, obvious way (vLLM's order)."""
    x = logits.astype(np.float64) / p.temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones(len(x), dtype=bool)
    if p.top_k:
        keep &= x >= x[order[p.top_k - 1]]
    if p.top_p < 1:
        probs = np.exp(x - x.max()) * keep
        probs /= probs.sum()
        cum = np.cumsum(probs[order])
        last = int(np.argmax(cum >= p.top_p - 1e-12))
        keep &= x >= x[order[last]]
    if p.min_p:
        probs = np.exp(x - x.max())
        keep &= probs >= p.min_p
    out = np.exp(x - x.max()) * keep
    return out / out.sum()


LOGITS = np.log(np.array([0.1, 0.2, 0.3, 0.15, 0.05, 0.2]))
# The filters' cases on LOGITS, each against `reference` (here and in test_sampler_graph).
DISTRIBUTION_CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0),
    SamplingParams(top_k=1),
    SamplingParams(top_k=2),  # the 2nd value is tied: ties are kept
    SamplingParams(top_k=4),
    SamplingParams(top_p=0.25),
    SamplingParams(top_p=0.45),
    SamplingParams(top_p=0.75),
    SamplingParams(top_k=4, top_p=0.7),  # top-p over the top-k renormalised mass
    SamplingParams(min_p=0.6),
    SamplingParams(min_p=0.4, temperature=0.7),
    SamplingParams(temperature=0.5, top_p=0.7, min_p=0.1),
]


@pytest.mark.parametrize("params", DISTRIBUTION_CASES)
def test_filters_give_the_reference_distribution(params: SamplingParams) -> None:
    freq = grid_frequencies(LOGITS, params)
    np.testing.assert_allclose(freq, reference(LOGITS, params), atol=2e-4)


def test_wide_nucleus_beyond_the_first_candidates() -> None:
    # 300 nearly flat logits: the 0.9 nucleus holds ~270 tokens, past the sorted candidates.
    logits = np.random.default_rng(0).normal(0, 0.2, 300)
    params = SamplingParams(top_p=0.9)
    expected = reference(logits, params)
    assert (expected > 0).sum() > 256
    freq = grid_frequencies(logits, params, n=30000)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))
    np.testing.assert_allclose(freq, expected, atol=1e-4)


def test_inverse_cdf_across_blocks() -> None:
    # 300 tokens: three search blocks, the last one partial.
    logits = np.random.default_rng(1).normal(0, 2, 300)
    freq = grid_frequencies(logits, SamplingParams(), n=30000)
    np.testing.assert_allclose(freq, np.exp(log_softmax(logits)), atol=1e-4)


def test_greedy_takes_the_argmax_and_reports_the_raw_logprob() -> None:
    logits = np.random.default_rng(2).normal(0, 3, (8, 50)).astype(np.float32)
    params = [SamplingParams(temperature=0, repetition_penalty=1.0)] * 8
    s = Sampler().sample(logits, params, [None] * 8, np.random.default_rng(3).random(8))
    np.testing.assert_array_equal(s.tokens, logits.argmax(axis=1))
    expected = log_softmax(logits)[np.arange(8), s.tokens]
    np.testing.assert_allclose(s.logprobs, expected, rtol=1e-6, atol=1e-6)


def test_logprob_is_under_the_unmodified_distribution() -> None:
    logits = np.random.default_rng(4).normal(0, 2, (5, 40)).astype(np.float32)
    params = [
        SamplingParams(temperature=0.3, top_k=3, repetition_penalty=2.0, banned_ids=frozenset({7}))
    ] * 5
    history = [np.array([1, 2, 3])] * 5
    s = Sampler().sample(logits, params, history, np.linspace(0.05, 0.95, 5))
    expected = log_softmax(logits)[np.arange(5), s.tokens]
    np.testing.assert_allclose(s.logprobs, expected, rtol=1e-6, atol=1e-6)


def test_repetition_penalty_is_ctrl_style_and_never_compounds() -> None:
    logits = np.array([2.0, -1.0, 1.0, 0.5, -0.5])
    params = SamplingParams(repetition_penalty=2.0)
    history = np.array([0, 1, 1, 1])  # a token repeated in history is penalised once
    n = 20000
    rows = np.repeat(logits[None, :].astype(np.float32), n, axis=0)
    s = Sampler().sample(rows, [params] * n, [history] * n, (np.arange(n) + 0.5) / n)
    penalised = np.array([1.0, -2.0, 1.0, 0.5, -0.5])
    freq = np.bincount(s.tokens, minlength=5) / n
    np.testing.assert_allclose(freq, np.exp(log_softmax(penalised)), atol=2e-4)


def test_banned_ids_are_never_drawn_even_by_greedy() -> None:
    logits = np.array([[5.0, 1.0, 0.0, 4.0]], dtype=np.float32)
    banned = frozenset({0})
    greedy = Sampler().sample(
        logits, [SamplingParams(temperature=0, banned_ids=banned)], [None], np.array([0.5])
    )
    assert greedy.tokens.tolist() == [3]
    freq = grid_frequencies(logits[0], SamplingParams(banned_ids=banned))
    assert freq[0] == 0
    np.testing.assert_allclose(freq[1:], np.exp(log_softmax(logits[0, 1:])), atol=2e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_with_bans_gives_the_renormalised_distribution(temperature: float) -> None:
    logits = np.random.default_rng(7).normal(0, 2, 300)
    banned = frozenset({3, 130, 299})  # in the first, a middle and the partial last block
    freq = grid_frequencies(logits, SamplingParams(temperature=temperature, banned_ids=banned))
    kept = np.array([i not in banned for i in range(300)])
    expected = np.where(kept, np.exp((logits - logits.max()) / temperature), 0.0)
    np.testing.assert_allclose(freq, expected / expected.sum(), atol=2e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_a_banned_token_that_dwarfs_the_rest_is_still_no_problem(temperature: float) -> None:
    # exp(others - max) underflows to 0 next to the banned token: the row must still sample
    # the others, in their proportions, and report their log-probs under the raw logits.
    logits = np.array([0.5, 200.0, -0.5, 1.0, 0.0])
    params = SamplingParams(temperature=temperature, banned_ids=frozenset({1}))
    freq = grid_frequencies(logits, params)
    others = np.delete(logits, 1) / temperature
    np.testing.assert_allclose(np.delete(freq, 1), np.exp(log_softmax(others)), atol=2e-4)
    assert freq[1] == 0
    s = Sampler().sample(logits[None, :].astype(np.float32), [params], [None], np.array([0.3]))
    expected = log_softmax(logits.astype(np.float32))[s.tokens[0]]
    np.testing.assert_allclose(s.logprobs[0], expected, rtol=1e-6)


def test_top_logprobs_most_likely_first_ties_by_lower_id() -> None:
    logits = np.log(np.array([[0.1, 0.3, 0.05, 0.3, 0.25]], dtype=np.float32))
    s = Sampler().sample(logits, [SamplingParams(top_logprobs=3)], [None], np.array([0.2]))
    ids = [t for t, _ in s.top[0]]
    assert ids == [1, 3, 4]
    np.testing.assert_allclose([lp for _, lp in s.top[0]], np.log([0.3, 0.3, 0.25]), rtol=1e-5)
    assert Sampler().sample(logits, [SamplingParams()], [None], np.array([0.2])).top == [()]


def test_a_row_does_not_depend_on_its_batch_companions() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (12, 300)).astype(np.float32)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(top_k=3),
        SamplingParams(top_k=200, top_p=0.5),
        SamplingParams(top_p=0.95),
        SamplingParams(min_p=0.2, temperature=0.5),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(banned_ids=frozenset({1, 2})),
        SamplingParams(top_logprobs=4),
        SamplingParams(temperature=1.7, top_k=50),
        SamplingParams(top_p=0.3, top_logprobs=2),
        SamplingParams(temperature=0.2),
    ]
    history = [np.array([4, 5, 6]) if p.repetition_penalty != 1 else None for p in params]
    uniforms = rng.random(12)
    sampler = Sampler()
    together = sampler.sample(logits, params, history, uniforms)
    for r in range(12):
        alone = sampler.sample(
            logits[r : r + 1], params[r : r + 1], history[r : r + 1], uniforms[r : r + 1]
        )
        assert alone.tokens[0] == together.tokens[r]
        assert alone.logprobs[0] == together.logprobs[r]
        assert alone.top[0] == together.top[r]


def test_seeded_rng_is_reproducible() -> None:
    a = SamplingParams(seed=42).rng().random(5)
    b = SamplingParams(seed=42).rng().random(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, SamplingParams(seed=43).rng().random(5))
    SamplingParams(seed=-1).rng()  # any integer seed works


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.0}, "min_p"),  # the public API's range is [0, 1)
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_logprobs": -2}, "top_logprobs"),
        ({"top_logprobs": MAX_TOP_LOGPROBS + 1}, "top_logprobs"),
        ({"banned_ids": frozenset({-3})}, "banned_ids"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_the_edges_of_each_range_are_accepted() -> None:
    SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=0.999, top_logprobs=MAX_TOP_LOGPROBS)
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\) \(0 is off\), not 1.0"):
        SamplingParams(min_p=1.0)


def test_params_checked_against_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="banned_ids"):
        SamplingParams(banned_ids=frozenset({10})).check_vocab(10)
    with pytest.raises(ValueError, match="bans all"):
        SamplingParams(banned_ids=frozenset(range(4))).check_vocab(4)
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=11).check_vocab(10)
    SamplingParams(banned_ids=frozenset({9}), top_logprobs=10).check_vocab(10)


def test_scratch_buffers_follow_the_batch_size() -> None:
    sampler = Sampler()
    rng = np.random.default_rng(6)
    for rows in (3, 17, 2, 17, 40):
        logits = rng.normal(size=(rows, 130)).astype(np.float32)
        params = [SamplingParams(temperature=0.8, top_k=5)] * rows
        s = sampler.sample(logits, params, [None] * rows, rng.random(rows))
        top5 = np.argsort(-logits, axis=1)[:, :5]
        assert all(t in top5[r] for r, t in enumerate(s.tokens))
