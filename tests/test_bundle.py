"""The bundle contract: what `load_bundle` accepts, and each bad bundle with its error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer, models

import rnnlm.bundle as contract
from rnnlm.bundle import MAX_TEXT_FILE_BYTES
from server.bundle import BundleError, StateSpec, external_data, load_bundle, sha256_file

Manifest = dict[str, Any]


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / bundle.name
    shutil.copytree(bundle, target)
    return target


def edit_manifest(bundle: Path, edit: Callable[[Manifest], None]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rehash(bundle: Path, file: str) -> None:
    """Make the manifest agree with a replaced file, so the next check is the one under test."""

    def edit(m: Manifest) -> None:
        m["files"][file] = sha256_file(bundle / file)

    edit_manifest(bundle, edit)


def copy_graph_inline(source: Path, target: Path) -> None:
    """Copy a graph with its external weights read in, so it stands alone in another bundle."""
    onnx.save(onnx.load(str(source)), str(target))


def test_loads_the_default_bundle(default_bundle: Path) -> None:
    b = load_bundle(default_bundle)
    assert (b.name, b.version, b.cell, b.layers, b.hidden) == ("tiny-lstm-word", "1", "lstm", 2, 16)
    assert b.tokenizer_kind == "word"
    assert b.vocab_size == b.tokenizer.get_vocab_size()
    assert b.eos_id == b.special_tokens["eos"] == b.tokenizer.token_to_id("<eos>")
    assert b.state == (StateSpec("h", "h0", "hn", 2, 16), StateSpec("c", "c0", "cn", 2, 16))
    assert b.step_graph == default_bundle / "model.onnx"
    assert b.score_graph == default_bundle / "score.onnx"
    zero = b.zero_state(3)
    assert [z.shape for z in zero] == [(2, 3, 16), (2, 3, 16)]
    assert all(z.dtype == np.float32 and not z.any() for z in zero)


def test_sessions_run_with_the_manifest_names(default_bundle: Path) -> None:
    b = load_bundle(default_bundle)
    step = b.open_session("step")
    tokens = np.array([[b.eos_id, 5, 6]], dtype=np.int64)
    feeds = {
        "tokens": tokens,
        **{s.input: z for s, z in zip(b.state, b.zero_state(1), strict=True)},
    }
    logits, features, hn, cn = step.run(["logits", "features", "hn", "cn"], feeds)
    assert logits.shape == (1, 3, b.vocab_size)
    assert features.shape == (1, 3, b.hidden)
    assert hn.shape == cn.shape == (2, 1, b.hidden)
    score = b.open_session("score")
    (logprobs, *_) = score.run(None, {**feeds, "targets": tokens})
    assert logprobs.shape == (1, 3)
    assert (logprobs <= 0).all()


def imported_by(module: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after importing `module`."""
    code = (
        f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_the_loader_imports_neither_torch_nor_onnx() -> None:
    assert not {"torch", "onnx"} & imported_by("server.bundle")


def test_the_contract_needs_only_the_standard_library() -> None:
    loaded = imported_by("rnnlm.bundle")
    assert not {"torch", "onnx", "onnxruntime", "numpy", "tokenizers", "server"} & loaded


def test_the_contract_makes_the_manifest_the_exporter_wrote(default_bundle: Path) -> None:
    """Graph files, graph input/output names and state tensors follow from the architecture:
    the contract's `make_manifest` gives the exported bundle's sections exactly."""
    written = load_bundle(default_bundle).manifest
    made = contract.with_file_hashes(
        contract.make_manifest(
            name=written["name"],
            version=written["version"],
            architecture=written["architecture"],
            tokenizer_kind=written["tokenizer"]["kind"],
            special_tokens=written["tokenizer"]["special_tokens"],
            precision=written["precision"],
            graphs=list(written["graphs"]),
            provenance=written["provenance"],
            parity=written["parity"],
        ),
        {f: (default_bundle / f).read_bytes() for f in written["files"]},
    )
    assert made == written
    state = contract.state_specs("lstm", 2, 16)
    assert contract.graph_io("score", state) == (
        ["tokens", "targets", "h0", "c0"],
        ["target_logprobs", "features", "hn", "cn"],
    )
    assert {g: s["file"] for g, s in written["graphs"].items()} == contract.GRAPH_FILES


def test_the_contract_refuses_a_manifest_before_it_is_written(default_bundle: Path) -> None:
    manifest = load_bundle(default_bundle).manifest
    files = {f: (default_bundle / f).read_bytes() for f in manifest["files"]}
    del files["tokenizer.json"]
    with pytest.raises(BundleError, match=r"tokenizer\.file 'tokenizer\.json' has no sha256"):
        contract.with_file_hashes({k: v for k, v in manifest.items() if k != "files"}, files)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nowhere")


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(tmp_path)


def test_manifest_not_json(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle)


def test_tampered_file_names_the_file(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    with open(bundle / "score.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"score\.onnx: sha256 .* does not match"):
        load_bundle(bundle)


def test_missing_graph_file(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: missing"):
        load_bundle(bundle)


def _delete(path: str) -> Callable[[Manifest], None]:
    def edit(m: Manifest) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        del m[last]

    return edit


@pytest.mark.parametrize(
    "field",
    [
        "format_version",
        "name",
        "version",
        "architecture",
        "architecture.cell",
        "architecture.vocab_size",
        "tokenizer.file",
        "tokenizer.special_tokens.eos",
        "precision",
        "state",
        "graphs.step",
        "provenance",
        "parity",
        "files",
    ],
)
def test_manifest_missing_field(default_bundle: Path, tmp_path: Path, field: str) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    edit_manifest(bundle, _delete(field))
    with pytest.raises(BundleError, match=rf"manifest\.json: missing field '{field}'"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
        (lambda m: m.update(name=""), "'name' must not be empty"),
        (lambda m: m["architecture"].update(layers="2"), "'architecture.layers' must be an int"),
        (lambda m: m["architecture"].update(hidden=True), "'architecture.hidden' must be an int"),
        (lambda m: m["architecture"].update(cell="transformer"), "architecture.cell must be one"),
        (lambda m: m.update(precision="fp8"), "precision must be one of"),
        (lambda m: m["tokenizer"].update(kind="sentencepiece"), "tokenizer.kind must be one of"),
        (lambda m: m["tokenizer"].update(file="../tokenizer.json"), "must be a file name"),
        (lambda m: m["tokenizer"]["special_tokens"].update(eos=10**6), "special_tokens.eos must"),
        (lambda m: m["state"].pop(), "state lists 1 tensors; a lstm has 2"),
        (lambda m: m["state"][0].update(shape=[2, "batch", 99]), r"state\[0\]\.shape"),
        (lambda m: m["graphs"]["step"]["inputs"].reverse(), r"graphs\.step\.inputs"),
        (lambda m: m["graphs"].update(encoder={}), "graphs has unknown entries"),
        (
            lambda m: m["files"].pop("score.onnx"),
            r"graphs\.score\.file 'score\.onnx' has no sha256",
        ),
        (lambda m: m["files"].update({"model.onnx": "abc"}), "must be a sha256 hex digest"),
        (lambda m: m.update(continuous_cache=[500]), "'continuous_cache' must be an object"),
        (
            lambda m: m.update(continuous_cache={"window": 500, "theta": 0.5}),
            "continuous_cache: missing lambda",
        ),
        (
            lambda m: m.update(continuous_cache={"window": 500, "theta": 0.5, "lambda": 2}),
            "continuous_cache: lambda must be between 0 and 1",
        ),
    ],
)
def test_manifest_bad_value(
    default_bundle: Path, tmp_path: Path, edit: Callable[[Manifest], None], message: str
) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=message) as error:
        load_bundle(bundle)
    assert "manifest.json" in str(error.value)


def test_tokenizer_size_disagrees_with_the_graph(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    small = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "the": 2}, unk_token="<unk>"))
    small.save(str(bundle / "tokenizer.json"))
    rehash(bundle, "tokenizer.json")
    with pytest.raises(BundleError, match=r"tokenizer\.json: the tokenizer has 3 tokens but"):
        load_bundle(bundle)


@pytest.mark.parametrize("file", ["tokenizer.json", "unknown_words.txt"])
def test_a_text_file_over_its_bound_is_refused_before_it_is_read(
    default_bundle: Path, tmp_path: Path, file: str
) -> None:
    """A manifest naming a 257 MiB file (sparse here) as its tokenizer or a word list: the
    loader refuses it by its size, before reading or hashing it."""
    bundle = copy_bundle(default_bundle, tmp_path)

    def list_it(m: Manifest) -> None:  # the tiny bundle has no word list: add one
        m["unknown_words"] = {"file": file, "unk_tokens": 10}
        m["files"][file] = "0" * 64  # never checked: the size is

    if file == "unknown_words.txt":
        edit_manifest(bundle, list_it)
    with open(bundle / file, "wb") as f:
        f.truncate(MAX_TEXT_FILE_BYTES + 2**20)
    with pytest.raises(BundleError, match=rf"{file}: 269484032 bytes, more than the 268435456"):
        load_bundle(bundle)


def test_unreadable_tokenizer(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "tokenizer.json").write_text("{}")
    rehash(bundle, "tokenizer.json")
    with pytest.raises(BundleError, match=r"tokenizer\.json: cannot be read"):
        load_bundle(bundle)


def test_graph_inputs_disagree_with_the_manifest(
    default_bundle: Path, tiny_bundle_factory: Callable[..., Path], tmp_path: Path
) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    # A GRU step graph has inputs (tokens, h0); the LSTM manifest says (tokens, h0, c0).
    copy_graph_inline(tiny_bundle_factory("gru") / "model.onnx", bundle / "model.onnx")
    rehash(bundle, "model.onnx")
    loaded = load_bundle(bundle)
    with pytest.raises(BundleError, match=r"model\.onnx: graph inputs \['tokens', 'h0'\]"):
        loaded.open_session("step")


def test_graph_vocabulary_disagrees_with_the_manifest(
    default_bundle: Path, tiny_bundle_factory: Callable[..., Path], tmp_path: Path
) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    # Same I/O names, but a character-level graph has a different vocabulary axis.
    char = tiny_bundle_factory("lstm", "char")
    assert load_bundle(char).vocab_size != load_bundle(bundle).vocab_size
    copy_graph_inline(char / "model.onnx", bundle / "model.onnx")
    rehash(bundle, "model.onnx")
    loaded = load_bundle(bundle)
    with pytest.raises(BundleError, match=r"model\.onnx: 'logits' has size \d+ on axis 2"):
        loaded.open_session("step")


def test_graph_that_onnxruntime_cannot_load(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "score.onnx").write_bytes(b"")  # an empty protobuf: a model without a graph
    rehash(bundle, "score.onnx")
    with pytest.raises(BundleError, match=r"score\.onnx: onnxruntime cannot load"):
        load_bundle(bundle).open_session("score")


def test_graph_that_is_not_onnx(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "score.onnx").write_bytes(b"not a graph")
    rehash(bundle, "score.onnx")
    with pytest.raises(BundleError, match=r"score\.onnx: not an ONNX model \(malformed protobuf"):
        load_bundle(bundle)


def test_both_graphs_point_into_one_weights_file(default_bundle: Path) -> None:
    b = load_bundle(default_bundle)
    assert "weights.bin" in b.manifest["files"]
    step, score = external_data(b.step_graph), external_data(b.graph_file("score"))
    assert step and {r.location for r in step + score} == {"weights.bin"}
    # Every tensor of the step graph is shared: the score graph reads the very same bytes.
    assert {(r.offset, r.length) for r in step} <= {(r.offset, r.length) for r in score}
    # The parser agrees with onnx's own reading of the graph.
    proto = onnx.load(str(b.step_graph), load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == 1}
    assert external == {r.tensor for r in step}


def test_missing_weights_file_is_named(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "weights.bin").unlink()
    with pytest.raises(BundleError, match=r"weights\.bin: missing \(listed in manifest\.json\)"):
        load_bundle(bundle)
    edit_manifest(bundle, lambda m: m["files"].pop("weights.bin"))
    with pytest.raises(BundleError, match=r"weights\.bin: missing; model\.onnx keeps its weights"):
        load_bundle(bundle)


def test_unlisted_weights_file(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    edit_manifest(bundle, lambda m: m["files"].pop("weights.bin"))
    with pytest.raises(BundleError, match=r"model\.onnx: references external data 'weights\.bin'"):
        load_bundle(bundle)


def test_tampered_weights_file(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    data = bytearray((bundle / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (bundle / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.bin: sha256 .* does not match"):
        load_bundle(bundle)


def test_weights_file_too_short_for_the_graph(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "weights.bin").write_bytes((bundle / "weights.bin").read_bytes()[:1000])
    rehash(bundle, "weights.bin")
    with pytest.raises(BundleError, match=r"model\.onnx: tensor .* of 'weights\.bin', which has"):
        load_bundle(bundle)


def test_external_data_outside_the_bundle(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    proto = onnx.load(str(bundle / "score.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(proto, str(bundle / "score.onnx"))
    rehash(bundle, "score.onnx")
    with pytest.raises(BundleError, match=r"score\.onnx: external data location '\.\./weights"):
        load_bundle(bundle)


def test_bundle_without_a_score_graph(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)

    def drop_score(m: Manifest) -> None:
        del m["graphs"]["score"]
        del m["files"]["score.onnx"]

    edit_manifest(bundle, drop_score)
    (bundle / "score.onnx").unlink()
    loaded = load_bundle(bundle)
    assert loaded.score_graph is None
    with pytest.raises(BundleError, match="has no 'score' graph"):
        loaded.open_session("score")


def test_prefill_graph_outputs_are_checked(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)

    def with_logits(m: Manifest) -> None:
        m["graphs"]["prefill"]["outputs"] = ["logits", "features", "hn", "cn"]

    edit_manifest(bundle, with_logits)
    with pytest.raises(
        BundleError, match=r"graphs\.prefill\.outputs .* must be \['features', 'hn', 'cn'\]"
    ):
        load_bundle(bundle)


SHIPPED = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize("name", ["shakespeare-word", "shakespeare-char"])
def test_shipped_bundles_load_and_carry_their_figures(name: str) -> None:
    """The bundles `make serve` serves pass the loader's checks (hashes included) and record
    the held-out perplexity their training measured."""
    b = load_bundle(SHIPPED / name)
    assert b.name == name
    provenance = b.manifest["provenance"]
    assert provenance["valid_perplexity"] > 1 and provenance["test_perplexity"] > 1
    assert len(provenance["corpus_sha256"]) == 64
    if b.precision == "int8":
        assert abs(b.manifest["quantization"]["quality"]["perplexity_change_percent"]) <= 1.0
    if b.continuous_cache is not None:
        block = b.manifest["continuous_cache"]
        split = "test" if "test_perplexity" in block else "valid"  # nanoGPT's has no test text
        assert block[f"{split}_perplexity"] < block[f"{split}_perplexity_without"]
