"""`rnnlm int8-rows`: an int8 bundle quantized per tensor, rewritten with its own weights so that
batching changes none of its results, measured against it and refused when it moves too far."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from exporter.export import ExportError, export_bundle
from exporter.int8_rows import rewrite_bundle
from rnnlm.cli import main
from server.bundle import load_bundle
from server.config import ServerConfig
from tests.test_rowwise import row_states
from tests.test_server import LiveServer
from training.data import load_corpus


@pytest.fixture(scope="module")
def per_tensor(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny int8 LSTM bundle as exports wrote them before exporter.rowwise (read only)."""
    target = tmp_path_factory.mktemp("per-tensor") / "tiny-per-tensor"
    ckpt = tiny_checkpoint_factory("lstm")
    return export_bundle(ckpt, target, quantize="int8", per_tensor_activations=True)


@pytest.fixture(scope="module")
def held_out(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "valid.txt"
    path.write_text(load_corpus(tiny_corpus).valid)
    return path


def _logits(bundle_dir: Path, rows: int) -> np.ndarray:
    """The first row's next-token logits in a run of `rows` rows (its hidden state small, the
    others' large, so that one scale for the run would coarsen its grid)."""
    bundle = load_bundle(bundle_dir)
    states = {name: s[:, :rows] for name, s in row_states(bundle, 8).items()}
    tokens = np.random.default_rng(0).integers(0, bundle.vocab_size, (8, 3))[:rows]
    return bundle.open_session("step").run(None, {"tokens": tokens, **states})[0][0]


def test_the_rewritten_bundle_gives_a_row_the_same_bits_in_any_batch(
    per_tensor: Path, held_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not np.array_equal(_logits(per_tensor, 1), _logits(per_tensor, 8))
    target = tmp_path / "rows"
    argv = ["int8-rows", str(per_tensor), str(target), "--text", str(held_out), "--version", "2"]
    assert main(argv) == 0
    assert f"rewrote {per_tensor} -> {target}: perplexity" in capsys.readouterr().out
    old, new = load_bundle(per_tensor), load_bundle(target)
    assert np.array_equal(_logits(target, 1), _logits(target, 8))
    assert (new.name, new.version, new.precision) == (old.name, "2", "int8")
    assert (target / "tokenizer.json").read_bytes() == (per_tensor / "tokenizer.json").read_bytes()
    section = new.manifest["quantization"]
    assert section["batch_independent"] is True
    assert section["quality"] == old.manifest["quantization"]["quality"]  # the export's figures
    rewrite = section["rewrite"]
    assert rewrite["from_version"] == "1" and rewrite["text"]["file"] == str(held_out)
    assert abs(rewrite["perplexity_change_percent"]) < 5
    assert new.manifest["provenance"] == old.manifest["provenance"]


def test_what_it_refuses_is_named_and_nothing_is_written(
    per_tensor: Path,
    held_out: Path,
    tmp_path: Path,
    tiny_bundle_factory: Callable[..., Path],
    int8_bundle: Path,
) -> None:
    target = tmp_path / "out"
    with pytest.raises(ExportError, match="a fp32 bundle; only int8 bundles are rewritten"):
        rewrite_bundle(tiny_bundle_factory("lstm"), target, text=held_out)
    with pytest.raises(ExportError, match="already quantized a row at a time"):
        rewrite_bundle(int8_bundle, target, text=held_out)
    with pytest.raises(ExportError, match="the rewritten graphs are refused: perplexity moves"):
        rewrite_bundle(per_tensor, target, text=held_out, max_perplexity_change=0.0)
    with pytest.raises(ExportError, match=r"--text .*missing\.txt"):
        rewrite_bundle(per_tensor, target, text=tmp_path / "missing.txt")
    with pytest.raises(ExportError, match="already exists; pass --force to replace it"):
        rewrite_bundle(per_tensor, per_tensor, text=held_out)
    with pytest.raises(ExportError, match="--max-perplexity-change must be"):
        rewrite_bundle(per_tensor, target, text=held_out, max_perplexity_change=float("nan"))
    assert not target.exists()


def test_the_server_warns_of_an_int8_bundle_whose_results_move_with_its_batch(
    per_tensor: Path, int8_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not load_bundle(per_tensor).batch_independent
    assert load_bundle(int8_bundle).batch_independent
    models = tmp_path / "models"
    for bundle in (per_tensor, int8_bundle):
        shutil.copytree(bundle, models / bundle.name)
    # An export from before the manifest said either way (the shipped version 6 was one).
    older = shutil.copytree(per_tensor, models / "older")
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["name"] = "older"
    del manifest["quantization"]["batch_independent"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(older).batch_independent is None
    caplog.set_level(logging.INFO, logger="server.repository")
    LiveServer(ServerConfig(models=models, host="127.0.0.1", port=0, metrics_port=0)).close()
    said = {r.getMessage().split()[0]: r for r in caplog.records if "scale a run" in r.getMessage()}
    # Exported so on purpose (--per-tensor-activations): said; an older export: warned.
    name = load_bundle(per_tensor).name
    assert {n: r.levelno for n, r in said.items()} == {name: logging.INFO, "older": logging.WARNING}
    assert said["older"].getMessage() == (
        "older version 1 is int8 with one activation scale a run: its results move with what "
        "shares a batch (a seeded generation can differ under load); `rnnlm int8-rows` "
        "rewrites it (docs/bundle.md)"
    )


def test_a_bundle_is_rewritten_in_place_with_force(
    per_tensor: Path, held_out: Path, tmp_path: Path
) -> None:
    bundle = shutil.copytree(per_tensor, tmp_path / "bundle")
    assert rewrite_bundle(bundle, bundle, text=held_out, version="1", force=True) == bundle
    rewritten = load_bundle(bundle)  # every file's hash checked again
    assert rewritten.batch_independent and rewritten.version == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging left behind
