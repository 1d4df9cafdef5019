"""The recurrent-norm cap of ReLU RNNs (training/recurrent_norm.py): it holds the spectral norm
where it says, the state then stays within its bound over a long stream, a capped run resumes
exactly, and its option's bad values are one clear line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_train import corpus, run_cli, same_weights, tiny

from training.model import RNNLM, ModelConfig
from training.recurrent_norm import DEFAULT_LIMIT, cap_recurrent_norm, spectral_norms
from training.train import TrainOptions, train

__all__ = ["corpus"]  # the corpus fixture of test_train, used here

torch.set_num_threads(1)


def relu_model(hidden: int = 24, layers: int = 2) -> RNNLM:
    torch.manual_seed(0)
    config = ModelConfig(cell="rnn_relu", vocab_size=30, embedding=8, hidden=hidden, layers=layers)
    return RNNLM(config)


def test_the_cap_scales_each_matrix_down_to_its_limit() -> None:
    model = relu_model()
    with torch.no_grad():
        for i, rnn in enumerate(model.rnns):
            # Random matrices well above the limit, one per layer.
            rnn.get_parameter("weight_hh_l0").copy_(torch.randn(24, 24) * (0.5 + i))
    before = spectral_norms(model)
    assert before is not None and min(before) > 1
    cap_recurrent_norm(model, 0.9)
    after = spectral_norms(model)
    assert after == pytest.approx([0.9, 0.9], rel=1e-3)
    # A matrix below the limit is left as it is.
    inside = [w.detach().clone() for w in (r.get_parameter("weight_hh_l0") for r in model.rnns)]
    with torch.no_grad():
        model.rnns[0].get_parameter("weight_hh_l0").mul_(0.5)
    cap_recurrent_norm(model, 0.9)
    assert torch.equal(model.rnns[0].get_parameter("weight_hh_l0"), inside[0] * 0.5)


def test_a_capped_relu_state_stays_within_its_bound_over_a_long_stream() -> None:
    """|h_t| <= rho |h_(t-1)| + |u_t|: below max |u| / (1 - rho) for any stream length,
    where the uncapped identity-initialised model's state grows with the stream."""
    model = relu_model(layers=1)
    tokens = torch.randint(0, 30, (1, 5000), generator=torch.Generator().manual_seed(1))
    rnn = model.rnns[0]
    inputs = torch.nn.functional.linear(
        model.embed(tokens), rnn.get_parameter("weight_ih_l0"), rnn.get_parameter("bias_ih_l0")
    )
    largest_input = float(inputs.detach().norm(dim=-1).max())
    with torch.no_grad():
        uncapped, _ = model.features(tokens, model.initial_state(1))
        cap_recurrent_norm(model, 0.9)
        capped, _ = model.features(tokens, model.initial_state(1))
    norms = capped[0].norm(dim=-1)
    assert float(norms.max()) <= largest_input / (1 - 0.9) * (1 + 1e-4)
    assert float(uncapped[0, -1].norm()) > 10 * float(norms.max())


def test_a_capped_run_resumes_exactly(corpus: Path, tmp_path: Path) -> None:
    options = tiny(corpus, tmp_path / "straight", cell="rnn_relu", epochs=2, dropout=0.0)
    straight = train(options)
    config = json.loads((straight / "config.json").read_text())
    limit = DEFAULT_LIMIT["rnn_relu"]
    assert config["train_args"]["recurrent_norm"] == limit  # the default, recorded
    assert max(config["provenance"]["recurrent_spectral_norm"]) <= limit * (1 + 1e-5)
    steps = config["provenance"]["steps"]
    part = train(replace(options, out=tmp_path / "part", max_steps=steps // 2 + 3))
    final = train(TrainOptions(resume=part, out=tmp_path / "final", threads=1, quiet=True))
    assert same_weights(straight / "last.safetensors", final / "last.safetensors")
    assert same_weights(straight / "model.safetensors", final / "model.safetensors")


def test_no_cap_for_the_other_cells_unless_asked(corpus: Path, tmp_path: Path) -> None:
    out = train(tiny(corpus, tmp_path / "tanh", cell="rnn_tanh", epochs=1))
    assert json.loads((out / "config.json").read_text())["train_args"]["recurrent_norm"] == 0.0
    capped = train(tiny(corpus, tmp_path / "capped", cell="rnn_tanh", epochs=1, recurrent_norm=0.5))
    norms = json.loads((capped / "config.json").read_text())["provenance"]
    assert max(norms["recurrent_spectral_norm"]) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cell", "rnn_relu", "--recurrent-norm", "-1"], "--recurrent-norm must be 0 (no cap)"),
        (["--cell", "lstm", "--recurrent-norm", "0.9"], "caps the recurrent matrix of rnn_relu"),
    ],
)
def test_bad_recurrent_norm_is_one_line(
    flags: list[str], message: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["--corpus", str(corpus), "--out", str(tmp_path / "o"), *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()
