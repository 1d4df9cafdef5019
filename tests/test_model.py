"""The model family: shapes, carried state, tying, the IRNN initialisation, residuals, the
adaptive softmax."""

from __future__ import annotations

import pytest
import torch

from training.model import CELLS, RNNLM, ModelConfig, detach_state


def _model(cell: str, **kw: object) -> RNNLM:
    torch.manual_seed(0)
    options: dict = {"vocab_size": 30, "embedding": 12, "hidden": 16, "layers": 2} | kw
    return RNNLM(ModelConfig(cell=cell, **options)).eval()


@pytest.mark.parametrize("cell", CELLS)
def test_shapes_and_state_tensors(cell: str) -> None:
    model = _model(cell)
    state = model.initial_state(3)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (2, 3, 16) for s in state)
    logits, new_state = model(torch.randint(0, 30, (3, 7)), state)
    assert logits.shape == (3, 7, 30)
    assert [s.shape for s in new_state] == [s.shape for s in state]


@pytest.mark.parametrize("cell", CELLS)
def test_carrying_the_state_equals_one_long_call(cell: str) -> None:
    """What truncated BPTT and the server rely on: chunks with the state carried = one pass."""
    model = _model(cell, residual=True, embedding=16)
    tokens = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        whole, whole_state = model(tokens, model.initial_state(2))
        state = model.initial_state(2)
        parts = []
        for chunk in tokens.split(5, dim=1):
            logits, state = model(chunk, detach_state(state))
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)
    for a, b in zip(state, whole_state, strict=True):
        torch.testing.assert_close(a, b)


def test_detach_cuts_the_graph_but_keeps_values() -> None:
    model = _model("lstm").train()
    _, state = model(torch.randint(0, 30, (2, 4)), model.initial_state(2))
    assert all(s.requires_grad for s in state)
    detached = detach_state(state)
    assert not any(s.requires_grad for s in detached)
    assert all(torch.equal(a, b) for a, b in zip(state, detached, strict=True))


def test_tied_weights_share_the_embedding_and_project_when_sizes_differ() -> None:
    same = _model("gru", tied=True, embedding=16, hidden=16)
    assert same.decoder.weight is same.embed.weight
    assert same.proj is None
    differ = _model("gru", tied=True, embedding=12, hidden=16)
    assert differ.decoder.weight is differ.embed.weight
    assert differ.proj is not None and differ.proj.weight.shape == (12, 16)
    assert differ(torch.zeros(1, 3, dtype=torch.long), differ.initial_state(1))[0].shape == (
        1,
        3,
        30,
    )


def test_relu_rnn_starts_from_the_identity() -> None:
    """Le et al. 2015: identity recurrent matrix and zero biases for ReLU RNNs."""
    model = _model("rnn_relu")
    for rnn in model.rnns:
        assert torch.equal(rnn.get_parameter("weight_hh_l0"), torch.eye(16))
        assert not rnn.get_parameter("bias_hh_l0").any()
        assert not rnn.get_parameter("bias_ih_l0").any()
    tanh = _model("rnn_tanh")
    assert not torch.equal(tanh.rnns[0].get_parameter("weight_hh_l0"), torch.eye(16))


def test_residual_adds_the_layer_input_where_sizes_match() -> None:
    plain = _model("rnn_tanh", layers=2, embedding=16)
    residual = _model("rnn_tanh", layers=2, embedding=16, residual=True)
    residual.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 30, (1, 5))
    with torch.no_grad():
        x = plain.embed(tokens)
        y0, _ = plain.rnns[0](x)
        y1, _ = plain.rnns[1](y0 + x)
        features, _ = residual.features(tokens, residual.initial_state(1))
    torch.testing.assert_close(features, y1 + y0 + x)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cell", "transformer", "cell must be one of"),
        ("hidden", 0, "hidden must be at least 1"),
        ("dropout", 1.0, "dropout must be in"),
        ("adaptive_cutoffs", (5, 5), "adaptive_cutoffs must increase strictly"),
        ("adaptive_cutoffs", (4, 10), "adaptive_cutoffs must increase strictly"),
        ("embedding", 2, "adaptive_div 4 leaves the last of 1 tail clusters no width"),
        ("adaptive_div", 0, "adaptive_div must be at least 1"),
    ],
)
def test_bad_config(field: str, value: object, message: str) -> None:
    options: dict = {"cell": "lstm", "vocab_size": 10, field: value}
    if field == "embedding":
        options |= {"hidden": 2, "adaptive_cutoffs": (5,)}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**options)


@pytest.mark.parametrize("tied", [True, False])
def test_the_adaptive_softmax_is_a_distribution_and_its_loss_matches_it(tied: bool) -> None:
    model = _model(
        "lstm", tied=tied, embedding=16, adaptive_cutoffs=(6, 14), adaptive_div=2, dropout=0.0
    )
    tokens = torch.arange(30).reshape(3, 10)  # every id, so every cluster, embedded and scored
    targets = tokens.roll(1)
    with torch.no_grad():
        logits, _ = model(tokens, model.initial_state(3))
        nll, _ = model(tokens, model.initial_state(3), targets)
    assert logits.shape == (3, 10, 30)
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(3, 10), atol=1e-5, rtol=0)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(nll, -picked, atol=1e-5, rtol=1e-5)
    # Tied, the input embedding is the adaptive softmax's own matrices: no second copy.
    assert (model.embed is None) == tied
    assert model.decoder is None


def test_the_full_softmax_nll_is_cross_entropy() -> None:
    model = _model("gru")
    tokens = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        logits, _ = model(tokens, model.initial_state(2))
        nll, _ = model(tokens, model.initial_state(2), tokens)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    torch.testing.assert_close(nll, expected)


def test_adaptive_tail_embeddings_get_gradients_through_tying() -> None:
    model = _model("lstm", tied=True, embedding=16, adaptive_cutoffs=(6,), adaptive_div=4)
    model.train()
    tokens = torch.full((1, 4), 20)  # a tail id, as input and as target
    nll, _ = model(tokens, model.initial_state(1), tokens)
    nll.sum().backward()
    assert model.adaptive is not None
    tail = model.adaptive.tail[0]
    assert tail.grad is not None and tail.grad[20 - 6].abs().sum() > 0
