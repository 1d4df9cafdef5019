"""End to end: train tiny, export, load with the server's loader, ONNX equals PyTorch."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.export import ExportError, export_bundle, write_bundle
from rnnlm.cli import main
from server.bundle import load_bundle
from training.checkpoint import CheckpointError, load_checkpoint

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
RTOL, ATOL = 1e-3, 1e-5  # these tests' own comparisons (tiny models round little)
PARITY_TOLERANCES = (1e-3, 1e-4)  # what the exporter's parity check uses by default
TEXT = "the cat sees the moon .\na dog likes a red house .\nthe old man calls the small boat .\n"


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cell", CELLS)
def test_onnx_scores_equal_pytorch_across_chunks(
    cell: str,
    tiny_checkpoint_factory: Callable[..., Path],
    tiny_bundle_factory: Callable[..., Path],
) -> None:
    bundle = load_bundle(tiny_bundle_factory(cell))
    model = load_checkpoint(tiny_checkpoint_factory(cell)).model
    step, score = bundle.open_session("step"), bundle.open_session("score")
    ids = [bundle.eos_id, *bundle.tokenizer.encode(TEXT).ids]
    tokens = np.array([ids[:-1], ids[:0:-1]], dtype=np.int64)  # two rows: batch 2
    targets = np.array([ids[1:], ids[-2::-1]], dtype=np.int64)
    state_in = [s.input for s in bundle.state]
    onnx_step = onnx_score = bundle.zero_state(2)
    torch_state = model.initial_state(2)
    for start, end in [(0, 1), (1, 9), (9, 10), (10, tokens.shape[1])]:
        x, y = tokens[:, start:end], targets[:, start:end]
        with torch.no_grad():
            features, torch_state = model.features(torch.from_numpy(x), torch_state)
            logits = model.logits(features)
            logprobs = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(y)[..., None])
        logits_o, features_o, *onnx_step = step.run(
            None, {"tokens": x, **dict(zip(state_in, onnx_step, strict=True))}
        )
        logprobs_o, score_features_o, *onnx_score = score.run(
            None, {"tokens": x, "targets": y, **dict(zip(state_in, onnx_score, strict=True))}
        )
        close(logits_o, logits.numpy())
        close(features_o, features.numpy())
        close(score_features_o, features.numpy())
        close(logprobs_o, logprobs.squeeze(-1).numpy())
        for a, b, expected in zip(onnx_step, onnx_score, torch_state, strict=True):
            close(a, expected.numpy())
            close(b, expected.numpy())


@pytest.mark.parametrize("cell", CELLS)
def test_manifest_records_the_export(cell: str, tiny_bundle_factory: Callable[..., Path]) -> None:
    bundle = load_bundle(tiny_bundle_factory(cell))
    m = bundle.manifest
    assert m["architecture"]["cell"] == cell
    parity = m["parity"]
    assert (parity["rtol"], parity["atol"]) == PARITY_TOLERANCES
    assert 0 <= parity["max_abs_error"] < 1e-3
    cases = {(c["graph"], c["batch"], tuple(c["lengths"])) for c in parity["cases"]}
    for graph in ("step", "prefill", "score"):
        assert {(graph, b, (t,)) for b in (1, 3, 8) for t in (1, 7, 64)} <= cases
        assert any(g == graph and len(lengths) > 1 for g, _, lengths in cases)
    prov = m["provenance"]
    assert len(prov["corpus_sha256"]) == 64
    assert prov["valid_perplexity"] > 1 and prov["tokens_seen"] > 0
    assert set(m["files"]) == {
        "model.onnx", "prefill.onnx", "score.onnx", "tokenizer.json", "weights.bin"
    }  # fmt: skip
    assert m["precision"] == "fp32" and "quantization" not in m


@pytest.mark.parametrize(("cell", "tokenizer"), [("lstm", "char"), ("gru", "bpe")])
def test_other_tokenizers_export(
    cell: str, tokenizer: str, tiny_bundle_factory: Callable[..., Path]
) -> None:
    bundle = load_bundle(tiny_bundle_factory(cell, tokenizer))
    assert bundle.tokenizer_kind == tokenizer
    assert bundle.tokenizer.encode("\n").ids == [bundle.eos_id]


def test_an_adaptive_softmax_model_exports_and_serves_its_log_probs(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    from training.train import TrainOptions, train

    options = TrainOptions(corpus=tiny_corpus, out=tmp_path / "ckpt", hidden=16, embedding=16,
                           tied=True, adaptive_softmax=(6, 14), adaptive_div=2, bptt=8,
                           batch_size=4, epochs=2, seed=0, threads=1, quiet=True)  # fmt: skip
    checkpoint = train(options)
    bundle = load_bundle(export_bundle(checkpoint, tmp_path / "bundle", name="ada"))
    model = load_checkpoint(checkpoint).model
    assert model.config.adaptive_cutoffs == (6, 14)
    assert bundle.manifest["architecture"]["adaptive_cutoffs"] == [6, 14]
    ids = np.array([[bundle.eos_id, *bundle.tokenizer.encode(TEXT).ids]], dtype=np.int64)
    states = dict(zip([s.input for s in bundle.state], bundle.zero_state(1), strict=True))
    logits, *_ = bundle.open_session("step").run(None, {"tokens": ids, **states})
    with torch.no_grad():
        expected, _ = model(torch.from_numpy(ids), model.initial_state(1))
    close(logits, expected.numpy())
    np.testing.assert_allclose(np.exp(logits).sum(-1), 1.0, rtol=1e-4)


def test_tied_weights_are_stored_once(default_bundle: Path) -> None:
    bundle = load_bundle(default_bundle)
    v, e = bundle.vocab_size, bundle.manifest["architecture"]["embedding"]
    stored = set()
    for file in ("model.onnx", "prefill.onnx", "score.onnx"):
        graph = onnx.load(str(default_bundle / file)).graph
        matrices = [i for i in graph.initializer if sorted(i.dims) == sorted([v, e])]
        assert len(matrices) == 1, (file, [i.name for i in matrices])
        stored.add(onnx.numpy_helper.to_array(matrices[0]).tobytes())
    assert len(stored) == 1  # the same layout in every graph, so weights.bin holds it once


def test_graphs_share_one_copy_of_the_weights(default_bundle: Path) -> None:
    files = ("model.onnx", "prefill.onnx", "score.onnx")
    graphs = {f: onnx.load(str(default_bundle / f)) for f in files}
    weights = (default_bundle / "weights.bin").stat().st_size
    unique: dict[bytes, int] = {}
    for proto in graphs.values():
        for tensor in proto.graph.initializer:
            data = onnx.numpy_helper.to_array(tensor).tobytes()
            if len(data) >= 1024:
                unique[data] = len(data)
    # One copy of each large tensor, at most a page of alignment apiece; the graphs are small.
    assert sum(unique.values()) <= weights <= sum(unique.values()) + 4096 * len(unique)
    for file in graphs:
        assert (default_bundle / file).stat().st_size < 16_000, file
        inline = onnx.load(str(default_bundle / file), load_external_data=False)
        assert not [t.name for t in inline.graph.initializer if len(t.raw_data) >= 1024]


def test_cli_exports_and_refuses_an_existing_target(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, target = tiny_checkpoint_factory("gru"), tmp_path / "models" / "gru"
    assert main(["export", str(ckpt), str(target), "--name", "g", "--version", "7"]) == 0
    assert (load_bundle(target).name, load_bundle(target).version) == ("g", "7")
    assert main(["export", str(ckpt), str(target)]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip() == f"rnnlm export: error: {target}: already exists; pass --force to replace it"
    )
    assert load_bundle(target).version == "7"
    assert main(["export", str(ckpt), str(target), "--force", "--version", "8"]) == 0
    assert load_bundle(target).version == "8"
    assert sorted(p.name for p in target.parent.iterdir()) == ["gru"]  # no temporary leftovers


def test_default_name_is_the_directory_name(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path
) -> None:
    path = export_bundle(tiny_checkpoint_factory("rnn_tanh"), tmp_path / "elman", score_graph=False)
    bundle = load_bundle(path)
    assert (bundle.name, bundle.version, bundle.score_graph) == ("elman", "1", None)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "prefill.onnx",
        "tokenizer.json",
        "weights.bin",  # the step and prefill graphs share the recurrent weights
    ]


def run_cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rnnlm export: error: ") and "\n" not in err
    return err


def test_missing_checkpoint_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli_error([str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert "nope: not a checkpoint directory" in err
    assert not (tmp_path / "out").exists()


def corrupt_checkpoint(source: Path, tmp_path: Path, file: str, content: bytes) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    (ckpt / file).write_bytes(content)
    return ckpt


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", b"{ broken", r"config\.json: not valid JSON"),
        ("config.json", b'{"format": 1}', r"config\.json: missing the 'model' section"),
        ("model.safetensors", b"\x00garbage", r"model\.safetensors: cannot be read"),
    ],
)
def test_corrupt_checkpoint(
    tiny_checkpoint_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    file: str,
    content: bytes,
    message: str,
) -> None:
    ckpt = corrupt_checkpoint(tiny_checkpoint_factory("lstm"), tmp_path, file, content)
    err = run_cli_error([str(ckpt), str(tmp_path / "out")], capsys)
    assert re.search(message, err), err
    with pytest.raises(CheckpointError):
        export_bundle(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_weights_that_do_not_match_the_config(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gru_weights = (tiny_checkpoint_factory("gru") / "model.safetensors").read_bytes()
    ckpt = corrupt_checkpoint(
        tiny_checkpoint_factory("lstm"), tmp_path, "model.safetensors", gru_weights
    )
    err = run_cli_error([str(ckpt), str(tmp_path / "out")], capsys)
    assert re.search(r"model\.safetensors: .*size mismatch for rnns\.0\.weight_ih_l0", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_parity_writes_nothing(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path
) -> None:
    # A zero tolerance cannot be met by float32 arithmetic in two different engines.
    with pytest.raises(ExportError, match=r"onnxruntime does not match PyTorch: .*nothing was"):
        export_bundle(tiny_checkpoint_factory("lstm"), tmp_path / "a" / "b", rtol=0.0, atol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_cli_parity_tolerances_are_the_users_and_recorded(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, target = tiny_checkpoint_factory("lstm"), tmp_path / "m"
    err = run_cli_error(
        [str(ckpt), str(target), "--parity-rtol", "0", "--parity-atol", "0"], capsys
    )
    assert "onnxruntime does not match PyTorch" in err and "--parity-atol" in err
    assert not target.exists()
    for flag, value in (
        ("--parity-atol", "1"),
        ("--parity-rtol", "nan"),
        ("--parity-atol", "-1e-4"),
    ):
        err = run_cli_error([str(ckpt), str(target), f"{flag}={value}"], capsys)
        assert err.endswith(f"{flag} must be >= 0 and < 1, not {float(value)}"), err
        assert not target.exists()
    assert main(["export", str(ckpt), str(target), "--parity-atol", "0.0002"]) == 0
    parity = load_bundle(target).manifest["parity"]
    assert (parity["rtol"], parity["atol"]) == (1e-3, 2e-4)


def test_checkpoint_config_and_bundle_agree(
    tiny_checkpoint_factory: Callable[..., Path], default_bundle: Path
) -> None:
    config = json.loads((tiny_checkpoint_factory("lstm") / "config.json").read_text())
    manifest = load_bundle(default_bundle).manifest
    for key, value in config["model"].items():
        assert manifest["architecture"][key] == value
    specials = {k: v for k, v in config["tokenizer"]["special_tokens"].items() if v is not None}
    assert manifest["tokenizer"]["special_tokens"] == specials


def test_write_bundle_is_how_other_writers_make_a_bundle(
    default_bundle: Path, tmp_path: Path
) -> None:
    """An importer hands `write_bundle` its files and a manifest without hashes: the bundle
    is validated by the server's loader and then appears whole; a bad one leaves nothing."""
    manifest = load_bundle(default_bundle).manifest
    files = {f: (default_bundle / f).read_bytes() for f in manifest.pop("files")}
    target = tmp_path / "models" / "imported"
    assert write_bundle(target, files, {**manifest, "name": "imported"}) == target
    loaded = load_bundle(target)
    assert (
        loaded.name == "imported"
        and loaded.manifest["files"] == load_bundle(default_bundle).manifest["files"]
    )
    with pytest.raises(ExportError, match="already exists"):
        write_bundle(target, files, manifest)
    broken = {**files, "model.onnx": files["score.onnx"]}  # a graph with the wrong inputs
    with pytest.raises(ExportError, match=r"does not pass the server's loader: .*model\.onnx"):
        write_bundle(tmp_path / "other", broken, manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
