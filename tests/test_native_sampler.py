"""The native plain-row sampler (server/_fastsample.c) on its own.

The sampler tests of test_sampler_graph.py run on it too (their `sampler` fixture); these cover
what is its own: that it is built, the vocabulary sizes its blocks and lanes must handle, the
rows it hands back to the graph, and the errors its buffers get.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from server import fastsample, native_sampler, row_sampler, sampling
from server.native_sampler import NativeSampler, native_rows
from server.sampler import BatchSampler, ReferenceSampler, SamplingRows, stream_uniforms
from server.sampling import SamplingParams, log_softmax, native_top_k, numpy_log_softmax

BUILDS = fastsample.BUILDS


@pytest.fixture(scope="module", params=BUILDS, ids=lambda build: build.__name__.split(".")[-1])
def sampler(request: pytest.FixtureRequest) -> NativeSampler:
    """The sampler on each build of the kernels this CPU runs (setup.py: one per x86-64 level)."""
    return NativeSampler(BatchSampler(), request.param)


def rows_for(params: list[SamplingParams], vocab: int) -> SamplingRows:
    rows = SamplingRows.from_params(params, [None] * len(params), vocab)
    rows.seed[:] = np.arange(len(params)) * 7919 + 3
    return rows


def test_the_extension_is_built_and_auto_takes_it_on_the_cpu() -> None:
    assert native_sampler.available()
    # The build in use is the widest this CPU runs; on x86-64, setup.py built one per level.
    assert fastsample.kernels is BUILDS[0]
    assert [b.LANES for b in BUILDS] == sorted((b.LANES for b in BUILDS), reverse=True)
    level = BUILDS[-1].cpu_level()
    built = [
        f"server.{name}"
        for name, needs in fastsample.LEVELS
        if level >= needs and importlib.util.find_spec(f"server.{name}") is not None
    ]
    assert [b.__name__ for b in BUILDS] == [*built, "server._fastsample"]
    assert all(max(level, 1) >= b.LEVEL for b in BUILDS)  # never a build beyond this CPU
    names = {f"server._fastsample_{v}": f"x86-64-{v}" for v in ("v3", "v4")}
    assert [fastsample.level_name(b) for b in BUILDS] == [
        names.get(b.__name__, "baseline") for b in BUILDS
    ]
    options = ort.SessionOptions()
    cpu = row_sampler.choose("auto", ["CPUExecutionProvider"], options)
    assert isinstance(cpu, row_sampler.NativeRowSampler)
    assert row_sampler.native_default(["CPUExecutionProvider"])
    # Logits left on a GPU go to the graph where they are: no copy to the host.
    assert not row_sampler.native_default(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert isinstance(
        row_sampler.choose("graph", ["CPUExecutionProvider"], options), row_sampler.GraphRowSampler
    )


@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 127, 128, 129, 1000, 4099])
def test_every_vocabulary_size_gives_the_reference_ids(sampler: NativeSampler, vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    temperatures = [1.0, 0.0, 0.3, 0.7, 2.5, 1.0] * 8
    params = [
        SamplingParams(
            temperature=t,
            top_logprobs=min(i % 4, vocab),
            banned_ids=frozenset({i % vocab}) if i % 3 == 0 and vocab > 1 else frozenset(),
        )
        for i, t in enumerate(temperatures)
    ]
    rows = rows_for(params, vocab)
    logits = (rng.standard_normal((len(params), vocab)) * 4).astype(np.float32)
    got, want = sampler.sample(logits, rows), ReferenceSampler().sample(logits, rows)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.lse, log_softmax_lse(logits), rtol=1e-6, atol=1e-6)
    for r, k in enumerate(rows.top_logprobs.tolist()):
        np.testing.assert_array_equal(got.top_ids[r, :k], want.top_ids[r, :k])
        np.testing.assert_allclose(
            got.top_logprobs[r, :k], want.top_logprobs[r, :k], rtol=1e-5, atol=1e-6
        )


FILTERS = [
    SamplingParams(top_k=1),
    SamplingParams(top_k=5, temperature=0.7),
    SamplingParams(top_k=100_000),  # past the vocabulary: every id
    SamplingParams(top_p=0.5),
    SamplingParams(top_p=0.999, temperature=1.3),  # a nucleus past the sorted candidates
    SamplingParams(top_k=300, top_p=0.9),
    SamplingParams(min_p=0.05),
    SamplingParams(min_p=0.3, top_k=7, top_p=0.8, temperature=0.4),
    SamplingParams(top_p=0.9, banned_ids=frozenset({0, 3})),
    SamplingParams(top_k=3, temperature=0),  # greedy: filters do not matter
]


@pytest.mark.parametrize("vocab", [1, 7, 129, 300, 1000, 4099])
@pytest.mark.parametrize("ties", [False, True])
def test_filtered_rows_give_the_reference_ids(
    sampler: NativeSampler, vocab: int, ties: bool
) -> None:
    rng = np.random.default_rng(vocab + ties)
    params = [p for p in FILTERS if not p.banned_ids or vocab > 3] * 6
    rows = rows_for(params, vocab)
    logits = rng.standard_normal((len(params), vocab)).astype(np.float32) * 3
    if ties:  # many equal logits: thresholds fall on ties, which are kept
        logits = np.round(logits)
    got, want = sampler.sample(logits, rows), ReferenceSampler().sample(logits, rows)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)


def log_softmax_lse(logits: np.ndarray) -> np.ndarray:
    return (logits - log_softmax(logits))[:, 0]


def test_penalised_rows_go_to_the_graph_and_the_others_stay(sampler: NativeSampler) -> None:
    params = [
        SamplingParams(),
        SamplingParams(top_k=2),
        SamplingParams(temperature=0.5),
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.1),
        SamplingParams(repetition_penalty=1.2),
    ]
    rows = rows_for(params, 50)
    assert native_rows(rows).tolist() == [True, True, True, True, True, False]
    logits = np.random.default_rng(1).standard_normal((6, 50)).astype(np.float32)
    got, graph = sampler.sample(logits, rows), BatchSampler().sample(logits, rows)
    np.testing.assert_array_equal(got.tokens, graph.tokens)
    np.testing.assert_allclose(got.logprobs, graph.logprobs, rtol=1e-5, atol=1e-5)


def test_rows_it_cannot_draw_go_to_the_graph_as_they_are(sampler: NativeSampler) -> None:
    # Row 0: the banned id holds all the mass, so every allowed weight underflows; rows 1 and
    # 2: a NaN, plain and top-p; row 3: an infinite logit; row 4: drawn natively.
    logits = np.random.default_rng(3).standard_normal((5, 300)).astype(np.float32)
    logits[0, 2] = 1000.0
    logits[1:3, 7] = np.nan
    logits[3, 11] = np.inf
    params = [
        SamplingParams(banned_ids=frozenset({2})),
        SamplingParams(),
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=5),
        SamplingParams(temperature=0),
    ]
    rows = rows_for(params, 300)
    got, graph = sampler.sample(logits, rows), BatchSampler().sample(logits, rows)
    np.testing.assert_array_equal(got.tokens[:4], graph.tokens[:4])
    np.testing.assert_array_equal(got.logprobs[:4], graph.logprobs[:4])
    assert got.tokens[0] != 2
    assert got.tokens[4] == int(np.argmax(logits[4]))


def test_many_bans_give_the_reference_ids(sampler: NativeSampler) -> None:
    # Bans are looked up by bisection: a row banning nearly its whole vocabulary is cheap.
    vocab = 10_000
    keep = {17, 4242, 9999}
    banned = frozenset(range(vocab)) - keep
    params = [SamplingParams(banned_ids=banned), SamplingParams(banned_ids=banned, top_p=0.9)]
    rows = rows_for(params * 2, vocab)
    logits = np.random.default_rng(5).standard_normal((4, vocab)).astype(np.float32)
    got, want = sampler.sample(logits, rows), ReferenceSampler().sample(logits, rows)
    assert set(got.tokens.tolist()) <= keep
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_its_exponential_is_as_accurate_as_float32(sampler: NativeSampler) -> None:
    # The log-sum-exp of a row [0, x] is log(1 + e^x): every x from 0 down to the underflow.
    x = -np.linspace(0, 87, 100_001).astype(np.float32)
    logits = np.stack([np.zeros_like(x), x], axis=1)
    rows = rows_for([SamplingParams(temperature=0)] * len(x), 2)
    got = sampler.sample(logits, rows).lse.astype(np.float64)
    np.testing.assert_allclose(got, np.log1p(np.exp(x.astype(np.float64))), rtol=0, atol=2e-7)


@pytest.fixture(params=BUILDS, ids=lambda build: build.__name__.split(".")[-1])
def build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Each build of the kernels this CPU runs, as the one `server.sampling` calls."""
    monkeypatch.setattr(sampling, "_fastsample", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 10_000), (2, 4, 129)])
def test_log_softmax_agrees_with_numpy(build: ModuleType, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 8).astype(np.float32)
    x.reshape(-1)[1::5] = -np.inf  # masked ids stay -inf
    got, want = log_softmax(x), numpy_log_softmax(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_is_the_k_largest_largest_first_ties_by_the_lower_id(
    build: ModuleType, dtype: type
) -> None:
    rng = np.random.default_rng(5)
    for trial in range(300):
        n, k = int(rng.integers(1, 2500)), int(rng.integers(1, 40))
        x = (rng.standard_normal(n) * 3).astype(dtype)
        if trial % 3 == 0:
            x = np.round(x)  # ties
        x[rng.integers(0, n, n // 10)] = -np.inf
        x[rng.integers(0, n, 2)] = np.nan  # never chosen
        valid = np.flatnonzero(~np.isnan(x)).tolist()
        want = sorted(valid, key=lambda i: (-x[i], i))[:k]
        got = native_top_k(x, k)
        if len(want) < k:
            assert got is None
        else:
            assert got is not None and got.tolist() == want


def test_top_k_refuses_bad_buffers() -> None:
    from server import _fastsample  # type: ignore[attr-defined]

    x = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="vals"):
        _fastsample.top_k(x, np.zeros(3, np.int64), np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="ids"):
        _fastsample.top_k(x, np.zeros(3, np.int32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="at least one"):
        _fastsample.top_k(x, np.zeros(0, np.int64), np.zeros(0, np.float32))


def test_its_stream_is_bit_identical_to_the_reference() -> None:
    from server import _fastsample  # type: ignore[attr-defined]

    rng = np.random.default_rng(3)
    seed = rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64)
    position = rng.integers(0, 2**40, 5000, dtype=np.int64)
    out = np.empty(5000)
    _fastsample.uniforms(seed, position, out)
    np.testing.assert_array_equal(out, stream_uniforms(seed, position))


def test_bad_buffers_get_short_errors() -> None:
    from server import _fastsample  # type: ignore[attr-defined]

    n, v = 2, 10

    def arrays(**change: np.ndarray) -> list[np.ndarray]:
        base = {
            "logits": np.zeros((n, v), np.float32),
            "temperature": np.ones(n, np.float32),
            "top_k": np.zeros(n, np.int64),
            "top_p": np.ones(n, np.float32),
            "min_p": np.zeros(n, np.float32),
            "seed": np.zeros(n, np.int64),
            "position": np.zeros(n, np.int64),
            "banned_ids": np.zeros((n, 0), np.int64),
            "top_counts": np.zeros(n, np.int64),
            "tokens": np.zeros(n, np.int64),
            "logprobs": np.zeros(n, np.float32),
            "lse": np.zeros(n, np.float32),
            "top_ids": np.zeros((n, 0), np.int64),
            "top_logprobs": np.zeros((n, 0), np.float32),
            "lost": np.zeros(n, np.bool_),
        }
        return list({**base, **change}.values())

    _fastsample.sample(*arrays())
    for change, words in [
        ({"logits": np.zeros((n, v), np.float64)}, "logits"),
        ({"position": np.zeros(n + 1, np.int64)}, "position"),
        ({"seed": np.zeros(n, np.float64)}, "seed"),
        ({"tokens": np.zeros(n, np.int32)}, "tokens"),
        ({"logits": np.zeros(n * v, np.float32)}, r"logits must be \[rows, vocab\]"),
        ({"top_counts": np.full(n, 3, np.int64)}, "top_counts out of range"),
        ({"banned_ids": np.zeros((n + 1, 1), np.int64)}, "banned_ids"),
        ({"banned_ids": np.full((n, 1), v, np.int64)}, "banned_ids must be increasing ids"),
        ({"banned_ids": np.full((n, 1), 10**8, np.int64)}, "banned_ids must be increasing ids"),
        ({"banned_ids": np.array([[3, 2]] * n, np.int64)}, "banned_ids must be increasing ids"),
        ({"banned_ids": np.array([[-1, 2]] * n, np.int64)}, "banned_ids must be increasing ids"),
        ({"banned_ids": np.full((n, 1), -2, np.int64)}, "banned_ids must be increasing ids"),
    ]:
        with pytest.raises(ValueError, match=words) as err:
            _fastsample.sample(*arrays(**change))
        assert len(str(err.value)) < 200
    with pytest.raises(ValueError):  # read-only output
        out = np.zeros(n, np.int64)
        out.flags.writeable = False
        _fastsample.sample(*arrays(tokens=out))
    with pytest.raises(TypeError, match="15 arrays"):
        _fastsample.sample(*arrays()[:5])
    with pytest.raises((ValueError, BufferError)):  # not contiguous
        _fastsample.sample(*arrays(logits=np.zeros((n, 2 * v), np.float32)[:, ::2]))
