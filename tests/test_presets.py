"""The recipe levers and the presets: schedules, AWD-LSTM dropouts, automatic clipping, bf16,
nanoGPT's split, and the presets' options, all on tiny models in seconds."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import tiny

from exporter.export import export_bundle
from rnnlm.cli import main
from server.bundle import load_bundle
from training import train as train_module
from training.checkpoint import load_checkpoint
from training.cli import configure, torchrun_command
from training.clipping import AUTO_FACTOR, AutoClip
from training.data import encode, load_corpus
from training.model import RNNLM, ModelConfig, Regularization
from training.presets import PRESETS, preset_options
from training.report import main as report_main
from training.schedule import Schedule
from training.throughput import main as throughput_main
from training.tokenizer import fit_tokenizer
from training.train import (
    TrainError,
    TrainOptions,
    backward_step,
    bf16_runs,
    check_options,
    onednn_bf16,
    train,
)

torch.set_num_threads(1)


def parse(argv: list[str]) -> TrainOptions:
    """What `rnnlm train ARGV` would train with (the CLI's own parsing and preset merge)."""
    parser = argparse.ArgumentParser()
    configure(parser)
    given = vars(parser.parse_args(argv))
    return preset_options(given.pop("preset", None), given)


def records(directory: Path, kind: str) -> list[dict]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def provenance(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["provenance"]


# -- presets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_parses_to_valid_options(name: str, tmp_path: Path) -> None:
    options = parse(["--preset", name, "--corpus", "c.txt", "--out", str(tmp_path / "o")])
    check_options(options)
    assert options.preset == name
    for field, value in PRESETS[name].items():
        if field == "bf16":  # where it runs (test_bf16_where_onednn_has_no_kernel)
            value = value and bf16_runs(options.cell, options.device, options.mkldnn)
        assert getattr(options, field) == value, field


def test_pytorch_examples_is_word_language_model_s_defaults() -> None:
    o = parse(["--preset", "pytorch-examples", "--corpus", "c.txt", "--out", "o"])
    assert (o.tokenizer, o.cell, o.layers, o.embedding, o.hidden) == ("word", "lstm", 2, 200, 200)
    assert (o.tied, o.dropout, o.optimizer, o.lr, o.weight_decay) == (True, 0.2, "sgd", 20.0, 0.0)
    assert (o.schedule, o.clip, o.bptt, o.batch_size) == ("plateau", 0.25, 35, 20)
    assert (o.eval_batch_size, o.epochs, o.seed) == (10, 40, 1111)
    assert (o.embed_dropout, o.weight_drop, o.locked_dropout, o.bf16) == (0.0, 0.0, False, False)


def test_explicit_flags_override_the_preset() -> None:
    o = parse(["--preset", "char-medium", "--corpus", "c.txt", "--out", "o", "--hidden", "64",
               "--no-bf16", "--no-residual", "--clip", "0.5", "--max-minutes", "1"])  # fmt: skip
    assert (o.hidden, o.bf16, o.residual, o.clip, o.max_minutes) == (64, False, False, 0.5, 1.0)
    assert (o.layers, o.split, o.schedule) == (3, "nanogpt", "cosine")  # the rest: the preset's
    default = TrainOptions(corpus=Path("c.txt"), out=Path("o"))
    assert parse(["--corpus", "c.txt", "--out", "o"]) == default


def test_preset_and_nproc_survive_the_relaunch_under_torchrun() -> None:
    command = torchrun_command(2, {"preset": "char-small", "tied": False, "clip": "auto"})
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "training", "--preset", "char-small", "--no-tied", "--clip",
                           "auto"]  # fmt: skip


def test_bad_lever_values_are_refused(tmp_path: Path) -> None:
    base = TrainOptions(corpus=tmp_path / "c.txt", out=tmp_path / "o")
    for change, message in (
        ({"clip": "sometimes"}, "--clip must be 0 (off), a positive number or 'auto'"),
        ({"weight_drop": 1.0}, "--weight-drop must be in [0, 1), not 1.0"),
        ({"schedule": "linear"}, "--schedule must be one of plateau, cosine, constant"),
        ({"min_lr": 1e-4}, "--min-lr is the end of the cosine schedule; --schedule is plateau"),
        (
            {
                "split": "nanogpt",
                "corpus": None,
                "train": Path("t"),
                "valid": Path("v"),
                "test": Path("t"),
            },
            "--split nanogpt splits one --corpus file",
        ),
        ({"warmup_steps": -1}, "--warmup-steps must be 0 (none) or more"),
        ({"eval_batch_size": 0}, "--eval-batch-size must be at least 1"),
    ):
        with pytest.raises(TrainError) as error:
            check_options(replace(base, **change))
        assert message in str(error.value), str(error.value)


# -- schedules -----------------------------------------------------------------------------


def test_cosine_schedule_with_warmup_at_key_points() -> None:
    s = Schedule(kind="cosine", lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert s.rate(0) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0.0))))
    assert s.rate(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 110)))
    assert s.rate(55) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert s.rate(110) == pytest.approx(0.1) and s.rate(500) == pytest.approx(0.1)
    rates = [s.rate(i) for i in range(10, 111)]
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_cosine_follows_the_time_budget_when_it_comes_first() -> None:
    s = Schedule(kind="cosine", lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=1000, budget_s=60)
    assert s.rate(10, elapsed_s=30.0) == pytest.approx(0.5)  # half the time, 1% of the steps
    assert s.rate(900, elapsed_s=6.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert s.rate(10, elapsed_s=60.0) == pytest.approx(0.0)


def test_plateau_quarters_the_rate_when_validation_stalls() -> None:
    s = Schedule(kind="plateau", lr=20.0, min_lr=2.0, warmup_steps=0, total_steps=100)
    s.validated(improved=True)
    assert s.rate(5) == 20.0
    s.validated(improved=False)
    s.validated(improved=False)
    assert s.rate(6) == 20.0 / 16
    restored = Schedule(kind="plateau", lr=20.0, min_lr=2.0, warmup_steps=0, total_steps=100)
    restored.load_state_dict(s.state_dict())
    assert restored.rate(7) == 20.0 / 16


# -- AWD-LSTM regularizers -----------------------------------------------------------------


def _model(**reg: Any) -> RNNLM:
    torch.manual_seed(0)
    config = ModelConfig(cell="lstm", vocab_size=30, embedding=12, hidden=12, layers=2, dropout=0.5)
    return RNNLM(config, Regularization(**reg))


def test_locked_dropout_shares_one_mask_over_time() -> None:
    model = _model(locked_dropout=True).train()
    x = torch.ones(3, 20, 12)
    dropped = model._dropout(x, 0.5)
    kept = dropped != 0
    assert torch.equal(kept, kept[:, :1].expand_as(kept))  # the same units at every step
    assert 0 < kept[:, 0].float().mean() < 1
    assert torch.allclose(dropped[kept], torch.tensor(2.0))  # scaled by 1 / (1 - p)
    plain = _model().train()._dropout(x, 0.5) != 0
    assert not torch.equal(plain, plain[:, :1].expand_as(plain))


def test_embedding_dropout_drops_whole_words() -> None:
    model = _model(embed_dropout=0.5).train()
    tokens = torch.tensor([[1, 2, 1, 2, 1, 2, 3, 3]])
    rows = model._embed(tokens)[0]
    for token in (1, 2, 3):
        same = rows[tokens[0] == token]
        assert torch.equal(same, same[:1].expand_as(same))  # every occurrence alike
    model.eval()
    assert torch.equal(model._embed(tokens), model.embed(tokens))


def test_weight_drop_acts_in_training_only_and_leaves_the_weights_alone() -> None:
    dropped, plain = _model(weight_drop=0.5), _model()
    plain.load_state_dict(dropped.state_dict())
    before = {k: v.clone() for k, v in dropped.state_dict().items()}
    tokens = torch.randint(0, 30, (2, 9))
    state = dropped.initial_state(2)
    dropped.eval()
    plain.eval()
    assert torch.equal(dropped(tokens, state)[0], plain(tokens, state)[0])
    dropped.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = dropped.features(tokens, state)[0]
        torch.manual_seed(2)
        b = dropped.features(tokens, state)[0]
    assert not torch.allclose(a, b)
    assert sorted(dropped.state_dict()) == sorted(before)
    assert all(torch.equal(before[k], v) for k, v in dropped.state_dict().items())
    # The gradient reaches the recurrent matrix through the mask: about half of it is zero.
    dropped.zero_grad()
    dropped(tokens, state)[0].sum().backward()
    grad = dropped.rnns[0].weight_hh_l0.grad
    assert grad is not None and 0.3 < (grad == 0).float().mean() < 0.7


def test_a_regularized_model_trains_exports_and_keeps_parity(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    levers = {"weight_drop": 0.3, "embed_dropout": 0.1, "locked_dropout": True,
              "input_dropout": 0.3, "tied": True, "layers": 2}  # fmt: skip
    out = train(tiny(tiny_corpus, tmp_path / "ckpt", **levers))
    config = json.loads((out / "config.json").read_text())
    assert {k: config["train_args"][k] for k in levers} == levers
    bundle = export_bundle(out, tmp_path / "bundle", name="awd")
    manifest = load_bundle(bundle).manifest
    assert manifest["parity"]["max_abs_error"] < 1e-4
    assert load_checkpoint(out).model.regularization == Regularization()  # plain for export


# -- clipping --------------------------------------------------------------------------------


def test_auto_clip_sets_the_threshold_from_the_running_median() -> None:
    clip = AutoClip(window=5)
    assert clip.threshold(1.0) == AUTO_FACTOR * 1.0  # the first step is never clipped
    for norm in (1.0, 2.0, 3.0):
        clip.threshold(norm)
    assert clip.threshold(100.0) == AUTO_FACTOR * 2.0  # a spike is cut back to 2 x the median
    clip.threshold(math.nan)  # a failed step does not enter the window
    restored = AutoClip(window=5)
    restored.load_state_dict(clip.state_dict())
    assert restored.norms == clip.norms == type(clip.norms)([1.0, 1.0, 2.0, 3.0, 100.0])


def test_auto_clip_clips_and_logs_its_thresholds(tiny_corpus: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(cell="lstm", vocab_size=20, embedding=8, hidden=8, layers=1))
    x, y = torch.randint(0, 20, (4, 10)), torch.randint(0, 20, (4, 10))
    clip = AutoClip()
    clip.norms.extend([0.01] * 10)  # a history of small norms: this step's is a spike
    _, norm, _ = backward_step(model, x, y, model.initial_state(4), clip)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert norm > clip.last == pytest.approx(AUTO_FACTOR * 0.01)
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(clip.last, rel=1e-4)

    out = train(tiny(tiny_corpus, tmp_path / "auto", clip="auto"))
    for r in records(out, "train") + records(out, "epoch"):
        assert r["clip_threshold_mean"] > 0 and 0 <= r["clipped_fraction"] <= 1
        assert r["grad_norm_mean"] > 0 and r["tokens_per_s"] > 0
    fixed = train(tiny(tiny_corpus, tmp_path / "fixed", clip=0.3))
    assert all(r["clip_threshold_mean"] == pytest.approx(0.3) for r in records(fixed, "epoch"))


# -- speed levers ----------------------------------------------------------------------------


def test_bf16_trains_and_the_carried_state_stays_float32(tiny_corpus: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(cell="lstm", vocab_size=20, embedding=8, hidden=8, layers=2))
    x, y = torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 6))
    was = torch.backends.mkldnn.enabled
    # oneDNN's bf16 kernels need AVX-512; PyTorch's own run bf16 on any CPU.
    torch.backends.mkldnn.enabled = was and onednn_bf16("lstm")  # type: ignore[assignment]
    try:
        loss, norm, state = backward_step(model, x, y, model.initial_state(2), 0.0, bf16=True)
    finally:
        torch.backends.mkldnn.enabled = was  # type: ignore[assignment]
    assert math.isfinite(loss) and norm > 0
    assert all(s.dtype == torch.float32 for s in state)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    out = train(tiny(tiny_corpus, tmp_path / "bf16", bf16=True, mkldnn=not was, epochs=1))
    assert torch.backends.mkldnn.enabled == was  # the switch is undone after the run
    epoch = records(out, "epoch")[0]
    assert epoch["train_loss"] < math.log(load_checkpoint(out).config.vocab_size)


def test_bf16_where_onednn_has_no_kernel(
    tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """On a CPU without AVX-512 (oneDNN has no bf16 LSTM there, and torch raises at the first
    forward): a preset's bf16 gives way to float32 with a note, and an asked-for --bf16 is
    refused before training, naming the flag and the ways out."""
    monkeypatch.setattr(train_module, "onednn_bf16", lambda cell: False)
    assert preset_options("char-small", {}).bf16 is False
    assert preset_options("char-small", {"bf16": True}).bf16 is True  # asked for: kept
    assert preset_options("char-small", {"mkldnn": False}).bf16 is True  # PyTorch's kernels
    with pytest.raises(TrainError, match=r"^--bf16: this CPU's oneDNN has no bfloat16 lstm kernel"):
        train(tiny(tiny_corpus, tmp_path / "asked", bf16=True, mkldnn=True, epochs=1))
    argv = ["train", "--preset", "char-small", "--corpus", str(tiny_corpus), "--hidden", "8",
            "--max-steps", "1", "--out", str(tmp_path / "preset"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "--preset char-small trains in float32 here" in capsys.readouterr().err
    saved = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert saved["train_args"]["bf16"] is False


def test_the_throughput_comparison_runs_both_loops(
    tiny_corpus: Path, tmp_path: Path, capsys: Any
) -> None:
    result = tmp_path / "throughput.json"
    # bf16 on PyTorch's own kernels where oneDNN has none (an AVX2-only CPU).
    flags = ["--bf16"] if bf16_runs("lstm", "cpu") else ["--bf16", "--no-mkldnn"]
    argv = ["--corpus", str(tiny_corpus), "--steps", "3", "--warmup", "1", "--threads", "1",
            "--json", str(result), "--", *flags]  # fmt: skip
    assert throughput_main(argv) == 0
    figures = json.loads(result.read_text())
    assert figures["pytorch_examples_tokens_per_s"] > 0 and figures["rnnlm_tokens_per_s"] > 0
    assert figures["rnnlm_flags"] == flags and figures["steps"] == 3
    assert "speed-up:" in capsys.readouterr().out


# -- nanoGPT's split -------------------------------------------------------------------------


def test_nanogpt_split_is_90_10_by_characters(tmp_path: Path) -> None:
    text = "".join(f"line {i}: to be or not.\r\n" for i in range(37)) + "no newline at the end"
    path = tmp_path / "shakespeare.txt"
    path.write_bytes(text.encode())
    corpus = load_corpus(path, split="nanogpt")
    data = text.replace("\r\n", "\n")  # as nanoGPT reads it: open(path).read()
    n = len(data)
    assert corpus.train == data[: int(n * 0.9)] and corpus.valid == data[int(n * 0.9) :]
    assert corpus.test == corpus.valid and corpus.test_is_valid
    assert not corpus.train.endswith("\n")  # the cut falls mid-line here
    assert corpus.sources["train"].endswith(f"characters 1-{int(n * 0.9)}")
    # Character tokens: one per character, none lost at the cut.
    tokenizer = fit_tokenizer("char", corpus.train)
    assert encode(tokenizer, corpus.train).numel() == len(corpus.train)
    assert encode(tokenizer, corpus.valid).numel() == len(corpus.valid)


def test_a_nanogpt_run_scores_the_whole_validation_text(tiny_corpus: Path, tmp_path: Path) -> None:
    out = train(tiny(tiny_corpus, tmp_path / "ng", tokenizer="char", split="nanogpt"))
    prov = provenance(out)
    n = len(tiny_corpus.read_text())
    assert prov["split_tokens"]["valid"] == n - int(n * 0.9)
    assert prov["test_is_valid"] and prov["test_loss"] == prov["valid_loss"]
    # One stream (--eval-batch-size 1) and ten carry the state over the same text: the ten
    # only lose their first prediction's context.
    options = tiny(tiny_corpus, tmp_path / "one", tokenizer="char", split="nanogpt")
    one = train(replace(options, eval_batch_size=1))
    assert provenance(one)["valid_loss"] == pytest.approx(prov["valid_loss"], rel=0.05)


def test_the_report_tabulates_runs(tiny_corpus: Path, tmp_path: Path, capsys: Any) -> None:
    lines = train(tiny(tiny_corpus, tmp_path / "lines", epochs=1))
    nanogpt = train(tiny(tiny_corpus, tmp_path / "nanogpt", epochs=1, split="nanogpt"))
    assert report_main([str(lines), str(nanogpt)]) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("| run | preset | split | valid loss |") and len(rows) == 2
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert cells[0][:3] == ["lines", "-", "lines"] and cells[0][5] != "= valid"
    assert cells[0][7] == "-"  # no continuous cache was tuned
    assert cells[1][:3] == ["nanogpt", "-", "nanogpt"] and cells[1][5:7] == ["= valid"] * 2
    assert float(cells[0][3]) == pytest.approx(provenance(lines)["valid_loss"], abs=1e-4)
