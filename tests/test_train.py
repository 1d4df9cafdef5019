"""The trainer end to end on tiny corpora: what it writes, that it learns, clipping, exact
resume, and every bad input with its one-line error."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from rnnlm.cli import main
from training.checkpoint import CheckpointError, load_checkpoint
from training.model import CELLS, RNNLM, ModelConfig
from training.tokenizer import special_tokens
from training.train import TrainError, TrainOptions, backward_step, train

torch.set_num_threads(1)

SUBJECTS = ("the cat", "a dog", "the bird", "my friend", "the old man")
VERBS = ("sees", "likes", "follows", "finds")
OBJECTS = ("the ball", "a tree", "the river", "the moon", "a red house", "the boat")


def grammar_text(lines: int = 200) -> str:
    """Lines of a fixed grammar: a tiny model learns it within a few epochs."""
    return "".join(
        f"{SUBJECTS[i % 5]} {VERBS[(i // 2) % 4]} {OBJECTS[(i * 5) % 6]} .\n" for i in range(lines)
    )


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(grammar_text())
    return path


def tiny(corpus: Path, out: Path, **kw: Any) -> TrainOptions:
    options = TrainOptions(
        corpus=corpus,
        out=out,
        layers=1,
        hidden=16,
        embedding=16,
        dropout=0.2,
        bptt=8,
        batch_size=4,
        epochs=2,
        lr=0.01,
        seed=3,
        threads=1,
        quiet=True,
    )
    return replace(options, **kw)


def read_metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_writes_a_complete_checkpoint(corpus: Path, tmp_path: Path) -> None:
    out = train(tiny(corpus, tmp_path / "runs" / "ckpt", tokenizer="char", tied=True))
    assert out == tmp_path / "runs" / "ckpt"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "last.safetensors",
        "metrics.jsonl",
        "metrics.png",
        "model.safetensors",
        "tokenizer.json",
        "train_state.pt",
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no staging left over
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((out / "config.json").read_text())
    prov = config["provenance"]
    for key in ("corpus_sha256", "tokens_seen", "valid_perplexity", "test_perplexity"):
        assert prov[key] is not None, key
    assert prov["stopped"] == "completed" and prov["epochs_completed"] == 2
    assert math.isclose(prov["test_perplexity"], math.exp(prov["test_loss"]))
    assert config["train_args"]["tokenizer"] == "char"

    ckpt = load_checkpoint(out)
    assert ckpt.tokenizer_kind == "char"
    assert ckpt.config.tied and ckpt.config.cell == "lstm"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt.tokenizer_path))
    assert ckpt.special_tokens == special_tokens(tok, "char")
    assert ckpt.config.vocab_size == tok.get_vocab_size()

    records = read_metrics(out)
    kinds = [r["kind"] for r in records]
    assert kinds.count("epoch") == 2 and kinds[-1] == "test"
    epochs = [r for r in records if r["kind"] == "epoch"]
    for r in epochs:
        # The gradient norm before clipping is logged, mean and max per epoch.
        assert 0 < r["grad_norm_mean"] <= r["grad_norm_max"]
    assert epochs[-1]["tokens_seen"] == prov["tokens_seen"]


def test_a_continuous_cache_is_tuned_after_training(tmp_path: Path) -> None:
    # Held-out lines the grammar never makes, each repeated: the cache predicts them.
    files = {
        "train": grammar_text(),
        "valid": "the moon finds a red house .\n" * 3 + "a tree sees the boat .\n" * 3,
        "test": "the river likes my friend .\n" * 4,
    }
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_text(text)
    paths = {name: tmp_path / f"{name}.txt" for name in files}
    out = train(tiny(None, tmp_path / "run", **paths, continuous_cache=True))  # type: ignore[arg-type]
    block = json.loads((out / "config.json").read_text())["continuous_cache"]
    assert block["valid_perplexity"] < block["valid_perplexity_without"]
    assert block["test_perplexity"] < block["test_perplexity_without"]
    accuracy = block["test_suggestion_accuracy"]
    assert accuracy["k"] == [1, 3, 5] and accuracy["positions"] > 0
    assert all(0 <= a <= 1 for a in accuracy["without"] + accuracy["with"])
    assert load_checkpoint(out).continuous_cache == block


def test_best_on_validation_weights_are_kept(corpus: Path, tmp_path: Path) -> None:
    # SGD at a high rate overshoots, so a middle epoch often validates best (which one depends
    # on the CPU's kernels: the rule is checked whichever it is).
    options = tiny(corpus, tmp_path / "three", optimizer="sgd", lr=30.0, clip=5.0, epochs=3)
    out = train(options)
    prov = json.loads((out / "config.json").read_text())["provenance"]
    losses = [r["valid_loss"] for r in read_metrics(out) if r["kind"] == "epoch"]
    best = losses.index(min(losses)) + 1
    assert (prov["best_epoch"], prov["valid_loss"]) == (best, losses[best - 1])
    # model.safetensors holds the weights after the best epoch: the last of a run that long.
    again = train(replace(options, out=tmp_path / "again", epochs=best))
    assert same_weights(out / "model.safetensors", again / "last.safetensors")
    assert same_weights(out / "model.safetensors", out / "last.safetensors") == (best == 3)


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_learns_a_tiny_corpus(cell: str, corpus: Path, tmp_path: Path) -> None:
    lr = 0.01 if cell == "rnn_relu" else 0.02
    out = train(tiny(corpus, tmp_path / cell, cell=cell, epochs=3, lr=lr, dropout=0.0))
    epochs = [r for r in read_metrics(out) if r["kind"] == "epoch"]
    vocab = load_checkpoint(out).config.vocab_size
    assert epochs[0]["train_loss"] > epochs[-1]["train_loss"]
    assert epochs[0]["valid_loss"] > epochs[-1]["valid_loss"]
    # Well below a uniform guess over the vocabulary.
    assert epochs[-1]["valid_perplexity"] < vocab / 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bf16", [False, True])
def test_a_run_on_cuda_learns_and_its_checkpoint_exports(
    bf16: bool, corpus: Path, tmp_path: Path
) -> None:
    """`--device cuda` (and bf16 autocast there) trains, and the checkpoint it writes loads
    on the CPU and exports with parity like one trained on the CPU."""
    from exporter.export import export_bundle

    out = train(tiny(corpus, tmp_path / "gpu", device="cuda", bf16=bf16, epochs=3, lr=0.02))
    epochs = [r for r in read_metrics(out) if r["kind"] == "epoch"]
    assert epochs[0]["valid_loss"] > epochs[-1]["valid_loss"]
    assert epochs[-1]["valid_perplexity"] < load_checkpoint(out).config.vocab_size / 4
    assert all(t.device.type == "cpu" for t in weights(out / "model.safetensors").values())
    bundle = export_bundle(out, tmp_path / "bundle")
    assert (bundle / "manifest.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_on_cuda_resumes_on_cuda_and_on_the_cpu(corpus: Path, tmp_path: Path) -> None:
    """The device is the resuming run's choice: a GPU run's optimizer state and RNG come back
    on the GPU and on the CPU."""
    first = train(tiny(corpus, tmp_path / "a", device="cuda", epochs=2, max_steps=5))
    assert json.loads((first / "config.json").read_text())["provenance"]["stopped"] == "max_steps"
    train(TrainOptions(resume=first, device="cuda", max_steps=10, threads=1, quiet=True))
    assert json.loads((first / "config.json").read_text())["provenance"]["steps"] == 10
    final = train(TrainOptions(resume=first, out=tmp_path / "b", threads=1, quiet=True))
    config = json.loads((final / "config.json").read_text())
    assert config["train_args"]["device"] == "cpu"
    assert config["provenance"]["stopped"] == "completed"
    assert config["provenance"]["epochs_completed"] == 2


def test_clipping_bounds_the_gradient_norm_and_reports_the_norm_before() -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(cell="rnn_relu", vocab_size=20, embedding=8, hidden=8, layers=2))
    x, y = torch.randint(0, 20, (4, 10)), torch.randint(0, 20, (4, 10))

    def norm_now() -> float:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    _, before, _ = backward_step(model, x, y, model.initial_state(4), clip=0.0)
    assert math.isclose(norm_now(), before, rel_tol=1e-5)  # clip 0: untouched
    clip = before / 10
    _, reported, _ = backward_step(model, x, y, model.initial_state(4), clip=clip)
    assert math.isclose(reported, before, rel_tol=1e-5)  # the logged norm is before clipping
    assert norm_now() <= clip * (1 + 1e-5)


def _comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields or the extra records of an interrupted invocation."""
    timing = {"tokens_per_s", "elapsed_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records if r["kind"] != "test"]


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    corpus: Path, tmp_path: Path
) -> None:
    straight = train(tiny(corpus, tmp_path / "straight", epochs=2, tokenizer="char"))
    windows = json.loads((straight / "config.json").read_text())["provenance"]["steps"] // 2

    # Stopped mid-epoch 1 (no best yet), then mid-epoch 2, then run to the end; dropout is on,
    # so the RNG state must come back too. The second resume writes to a new directory.
    first = train(tiny(corpus, tmp_path / "a", epochs=2, tokenizer="char", max_steps=5))
    prov = json.loads((first / "config.json").read_text())["provenance"]
    assert (prov["stopped"], prov["steps"], prov["best_epoch"]) == ("max_steps", 5, None)
    assert prov["valid_perplexity"] and prov["test_perplexity"]
    train(TrainOptions(resume=first, max_steps=windows + 3, threads=1, quiet=True))
    assert json.loads((first / "config.json").read_text())["provenance"]["steps"] == windows + 3
    final = train(TrainOptions(resume=first, out=tmp_path / "b", threads=1, quiet=True))

    for name in ("last.safetensors", "model.safetensors"):
        assert same_weights(straight / name, final / name), name
    assert _comparable(read_metrics(final)) == _comparable(read_metrics(straight))
    p_straight = json.loads((straight / "config.json").read_text())["provenance"]
    p_final = json.loads((final / "config.json").read_text())["provenance"]
    for key in ("tokens_seen", "steps", "best_epoch", "valid_loss", "test_loss"):
        assert p_final[key] == p_straight[key], key


def test_unk_replace_changes_what_is_trained_on_and_resumes_exactly(tmp_path: Path) -> None:
    # Grammar lines with a few words seen once each in the training split.
    lines = grammar_text(200).splitlines()
    for i, word in enumerate(("zebra", "quokka", "marmot", "ibis", "tapir")):
        lines[20 * i] += f" {word}"
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")

    plain = train(tiny(path, tmp_path / "plain"))
    straight = train(tiny(path, tmp_path / "straight", unk_replace=1.0))
    assert not same_weights(plain / "last.safetensors", straight / "last.safetensors")
    windows = json.loads((straight / "config.json").read_text())["provenance"]["steps"] // 2
    part = train(tiny(path, tmp_path / "part", unk_replace=1.0, max_steps=windows + 2))
    final = train(TrainOptions(resume=part, out=tmp_path / "final", threads=1, quiet=True))
    assert same_weights(straight / "last.safetensors", final / "last.safetensors")


def test_a_run_stopped_mid_epoch_ships_its_last_weights_when_they_validate_better(
    corpus: Path, tmp_path: Path
) -> None:
    one_epoch = train(tiny(corpus, tmp_path / "one", epochs=1, dropout=0.0))
    windows = json.loads((one_epoch / "config.json").read_text())["provenance"]["steps"]
    stopped = train(tiny(corpus, tmp_path / "a", epochs=2, dropout=0.0, max_steps=2 * windows - 1))
    prov = json.loads((stopped / "config.json").read_text())["provenance"]
    epoch_one = next(r for r in read_metrics(stopped) if r["kind"] == "epoch")
    assert prov["best_epoch"] == 1 and prov["valid_loss"] < epoch_one["valid_loss"]
    assert prov["weights_from"] == f"step {2 * windows - 1} (max_steps)"
    assert same_weights(stopped / "model.safetensors", stopped / "last.safetensors")
    # The recorded best is still epoch 1's weights, for a resumed run to compare against.
    state = torch.load(stopped / "train_state.pt", weights_only=True)
    best = state["best_weights"]
    assert all(torch.equal(best[k], v) for k, v in weights(one_epoch / "last.safetensors").items())


def test_max_minutes_stops_and_the_run_resumes(corpus: Path, tmp_path: Path) -> None:
    stopped = train(tiny(corpus, tmp_path / "a", epochs=1, max_minutes=1e-9))
    prov = json.loads((stopped / "config.json").read_text())["provenance"]
    assert (prov["stopped"], prov["steps"]) == ("max_minutes", 0)
    assert load_checkpoint(stopped).model is not None  # complete even with no epoch done
    # --max-minutes is the budget of the whole run: a resumed run that has spent it stops at once.
    spent = train(TrainOptions(resume=stopped, out=tmp_path / "c", max_minutes=1e-9, quiet=True))
    assert json.loads((spent / "config.json").read_text())["provenance"]["steps"] == 0
    resumed = train(TrainOptions(resume=stopped, threads=1, quiet=True))
    straight = train(tiny(corpus, tmp_path / "b", epochs=1))
    assert same_weights(resumed / "last.safetensors", straight / "last.safetensors")
    # A resumed run can be given more epochs.
    longer = train(TrainOptions(resume=resumed, epochs=2, threads=1, quiet=True))
    assert json.loads((longer / "config.json").read_text())["provenance"]["epochs_completed"] == 2


# -- bad inputs: one line on stderr, exit code 2, nothing written ------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["train", *args])
    return code, capsys.readouterr().err


TINY_FLAGS = ["--hidden", "8", "--embedding", "8", "--layers", "1", "--bptt", "8",
              "--batch-size", "4", "--epochs", "1", "--threads", "1"]  # fmt: skip


@pytest.mark.parametrize(
    ("corpus_text", "flags", "message"),
    [
        (None, [], r"--corpus .*missing\.txt: no such file"),
        ("", [], r"--corpus .*corpus\.txt: the file is empty"),
        ("a b\nc d\ne f\n", [], r"the training split is too short, 3 tokens; --batch-size 4 x"),
        (grammar_text(), ["--bptt", "500"], r"--bptt 500 \+ 1\) = 2004 are needed"),
        (grammar_text(), ["--hidden", "-4"], r"--hidden must be at least 1, not -4"),
        (grammar_text(), ["--dropout", "1"], r"--dropout must be in \[0, 1\), not 1.0"),
        (grammar_text(), ["--lr", "0"], r"--lr must be a positive number, not 0.0"),
        (grammar_text(), ["--clip", "-1"], r"--clip must be 0 \(off\), a positive number or 'auto"),
        (grammar_text(), ["--vocab-size", "0"], r"--vocab-size must be at least 1, not 0"),
        (grammar_text(), ["--tokenizer", "bpe", "--vocab-size", "50"], r"at least 256 for bpe"),
        (grammar_text(), ["--max-minutes", "0"], r"--max-minutes must be positive"),
        (
            grammar_text(),
            ["--adaptive-softmax", "9999"],
            r"--adaptive-softmax / --adaptive-div: "
            r"adaptive_cutoffs must increase strictly and lie between 1 and the vocabulary size",
        ),
        (grammar_text(), ["--unk-replace", "1.5"], r"--unk-replace must be in \[0, 1\]"),
        (
            grammar_text(),
            ["--tokenizer", "bpe", "--vocab-size", "300", "--unk-replace", "0.5"],
            r"--unk-replace needs a tokenizer with an <unk> token \(word or char\), not bpe",
        ),
        (grammar_text(), ["--train", "x.txt"], r"either --corpus or --train/--valid/--test"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    corpus_text: str | None,
    flags: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / ("missing.txt" if corpus_text is None else "corpus.txt")
    if corpus_text is not None:
        path.write_text(corpus_text)
    out = tmp_path / "runs" / "out"
    code, err = run_cli(["--corpus", str(path), "--out", str(out), *TINY_FLAGS, *flags], capsys)
    assert code == 2
    assert err.startswith("rnnlm train: error: ") and err.count("\n") == 1, err
    assert len(re.findall(message, err)) == 1, err
    assert not (tmp_path / "runs").exists()


def test_missing_or_partial_corpus_options(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="no corpus: give --corpus FILE"):
        train(TrainOptions(out=tmp_path / "o"))
    with pytest.raises(TrainError, match="go together; missing --valid, --test"):
        train(TrainOptions(out=tmp_path / "o", train=tmp_path / "t.txt"))
    with pytest.raises(TrainError, match="--out DIR is required"):
        train(TrainOptions(corpus=tmp_path / "t.txt"))
    with pytest.raises(TrainError, match="--tokenizer must be one of word, char, bpe, not 'bytes'"):
        train(TrainOptions(corpus=tmp_path / "t.txt", out=tmp_path / "o", tokenizer="bytes"))
    with pytest.raises(TrainError, match="--cell must be one of lstm, gru, rnn_tanh, rnn_relu"):
        train(TrainOptions(corpus=tmp_path / "t.txt", out=tmp_path / "o", cell="lstmx"))
    assert not (tmp_path / "o").exists()


def test_unknown_choices_are_rejected_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag, value in (("--cell", "transformer"), ("--tokenizer", "bytes"), ("--optimizer", "x")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--corpus", "c.txt", "--out", str(tmp_path / "o"), flag, value])
        assert exit_.value.code == 2
        assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
    for value, message in (("4,2", "must increase strictly"), ("ten", "separated by commas")):
        with pytest.raises(SystemExit):
            main(["train", "--corpus", "c.txt", "--out", str(tmp_path / "o"),
                  "--adaptive-softmax", value])  # fmt: skip
        assert message in capsys.readouterr().err
    with pytest.raises(TrainError, match="--adaptive-div must be at least 1"):
        train(TrainOptions(corpus=tmp_path / "c.txt", out=tmp_path / "o", adaptive_div=0))


def test_an_existing_output_directory_is_not_overwritten(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["--corpus", str(corpus), "--out", str(out), *TINY_FLAGS], capsys)
    assert code == 2 and "already exists and is not an empty directory" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_divergence_is_an_error_not_a_nan_checkpoint(corpus: Path, tmp_path: Path) -> None:
    options = tiny(corpus, tmp_path / "o", cell="rnn_relu", optimizer="sgd", lr=1e6, clip=0.0)
    with pytest.raises(TrainError, match="training diverged at step"):
        train(options)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text(grammar_text())
    return train(tiny(root / "corpus.txt", root / "ckpt", epochs=1))


class _Payload:
    """Unpickling this would create a file: proof that loading runs no pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _corrupt(kind: str, ckpt: Path, tmp_path: Path) -> None:
    if kind == "garbage state":
        (ckpt / "train_state.pt").write_bytes(b"not a torch file")
    elif kind == "pickled code":
        torch.save({"epoch": _Payload(tmp_path / "pwned")}, ckpt / "train_state.pt")
    elif kind == "incomplete state":
        torch.save({"epoch": 1}, ckpt / "train_state.pt")
    elif kind == "truncated weights":
        data = (ckpt / "last.safetensors").read_bytes()
        (ckpt / "last.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "bad config":
        (ckpt / "config.json").write_text("{not json")
    elif kind == "bad tokenizer":
        (ckpt / "tokenizer.json").write_text("[]")
    elif kind == "no state":
        (ckpt / "train_state.pt").unlink()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage state", r"train_state\.pt: cannot be read as a training state"),
        ("pickled code", r"train_state\.pt: cannot be read as a training state"),
        ("incomplete state", r"train_state\.pt: not a complete training state \(missing"),
        ("truncated weights", r"last\.safetensors: cannot be read as safetensors weights"),
        ("bad config", r"config\.json: not valid JSON"),
        ("bad tokenizer", r"tokenizer\.json: not a tokenizers file"),
        ("no state", r"train_state\.pt: missing"),
    ],
)
def test_a_corrupt_checkpoint_is_refused_and_left_alone(
    kind: str,
    message: str,
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    _corrupt(kind, ckpt, tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    code, err = run_cli(["--resume", str(ckpt), "--epochs", "2"], capsys)
    assert code == 2 and err.startswith("rnnlm train: error: "), err
    assert len(re.findall(message, err)) == 1, err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing else, no "pwned"


def test_resume_refuses_a_missing_directory_changed_options_or_corpus(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a checkpoint directory (it does not exist)" in err
    code, err = run_cli(["--resume", str(trained), "--cell", "gru", "--hidden", "8"], capsys)
    assert code == 2 and "--cell, --hidden: cannot change when resuming" in err
    with pytest.raises(TrainError, match="--cell 'gru' conflicts with the checkpoint"):
        train(TrainOptions(resume=trained, cell="gru"))

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    changed = tmp_path / "changed.txt"
    changed.write_text(grammar_text() + "one more line .\n")
    config["train_args"]["corpus"] = str(changed)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match="the corpus changed since that run"):
        train(TrainOptions(resume=ckpt, epochs=2))
    with pytest.raises(CheckpointError):
        train(TrainOptions(resume=tmp_path / "changed.txt"))
