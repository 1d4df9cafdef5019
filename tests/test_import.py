"""`rnnlm import`: models made elsewhere become bundles that serve what the source computes.

Each source is made here in its own layout, in seconds: a pytorch/examples `word_language_model`
checkpoint (a module with its `RNNModel`'s attribute names and structure, saved with
`torch.save` as its `main.py` does, or its `state_dict`), an ONNX LM with icefall's `with-state`
inputs and outputs, and a flair character LM (a stand-in `flair.data.Dictionary` pickled in
flair's structure). The bundles serve on a real loopback server, and what it answers is held to
the source's own computation.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from rnnlm.cli import main as rnnlm_main
from rnnlm.client import Client
from tests.conftest import tiny_text
from tests.test_server import LiveServer, config
from training.tokenizer import fit_tokenizer, special_tokens

TEST_TEXT = "a dog likes the moon .\nthe bird finds a tree .\nmy friend calls a zebra .\n"
VALID_TEXT = "the cat sees  the\tball .\n\nthe old man hears a red house .\n"


# -- sources in their own layouts -----------------------------------------------------------------


class RNNModel(nn.Module):
    """pytorch/examples' word-language-model network: the same attributes (`drop`, `encoder`,
    `rnn`, `decoder`, `rnn_type`, `nhid`, `nlayers`, `ntoken`) and the same computation."""

    def __init__(self, rnn_type: str, ntoken: int, ninp: int, nhid: int, nlayers: int,
                 tie_weights: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ("LSTM", "GRU"):
            self.rnn: nn.Module = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=0.2)
        else:
            act = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type]
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=act, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

    def forward(self, input: Tensor, hidden: Any) -> tuple[Tensor, Any]:
        output, hidden = self.rnn(self.drop(self.encoder(input)), hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> Any:
        zeros = torch.zeros(self.nlayers, bsz, self.nhid)
        return (zeros, zeros.clone()) if self.rnn_type == "LSTM" else zeros


class Helper(nn.Module):
    """A class no pytorch/examples checkpoint holds."""


class Touch:
    """Pickles as a call of `Path.touch`: loading it unrestricted would create the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


@contextmanager
def defined_in(module_name: str, *classes: type) -> Iterator[None]:
    """Make `classes` pickle as `module_name.<name>` (as a user's own module defines them);
    the module is gone again afterwards, so loading cannot import it."""
    parts = module_name.split(".")
    modules = {".".join(parts[: i + 1]): types.ModuleType(".".join(parts[: i + 1]))
               for i in range(len(parts))}  # fmt: skip
    saved = {cls: cls.__module__ for cls in classes}
    for cls in classes:
        cls.__module__ = module_name
        setattr(modules[module_name], cls.__name__, cls)
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)
        for cls, module in saved.items():
            cls.__module__ = module


def corpus_ids(data: Path) -> tuple[dict[str, int], dict[str, list[int]]]:
    """pytorch/examples' `data.Corpus`, as its data.py defines it, written out again here."""
    vocab: dict[str, int] = {}
    ids: dict[str, list[int]] = {}
    for split in ("train", "valid", "test"):
        ids[split] = []
        for line in (data / f"{split}.txt").read_text(encoding="utf8").splitlines():
            for word in [*line.split(), "<eos>"]:
                if word not in vocab:
                    vocab[word] = len(vocab)
                ids[split].append(vocab[word])
    return vocab, ids


def train_briefly(model: RNNModel, ids: list[int], steps: int = 30) -> None:
    """pytorch/examples-style training, a few steps: the model predicts something."""
    torch.manual_seed(0)
    data = torch.tensor(ids[: len(ids) // 4 * 4]).view(4, -1).t().contiguous()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        start = (step * 10) % (data.size(0) - 11)
        hidden = model.init_hidden(4)
        output, _ = model(data[start : start + 10], hidden)
        loss = F.nll_loss(output, data[start + 1 : start + 11].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def examples_logprobs(model: RNNModel, ids: list[int], eos: int) -> np.ndarray:
    """The checkpoint's own evaluation of one stream that starts after eos (batch 1):
    log p(ids[i] | eos, ids[:i]) for each i."""
    data = torch.tensor([eos, *ids]).unsqueeze(1)
    with torch.no_grad():
        output, _ = model(data[:-1], model.init_hidden(1))
    return output[torch.arange(len(ids)), data[1:, 0]].double().numpy()


class IcefallLm(nn.Module):
    """icefall's RnnLmModel as its `with-state` ONNX export runs it (`score_token_onnx`)."""

    def __init__(self, vocab: int, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.input_embedding = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, layers, batch_first=True)
        self.output_linear = nn.Linear(dim, vocab)

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rnn_out, (h, c) = self.rnn(self.input_embedding(x), (h0, c0))
        return self.output_linear(rnn_out)[:, 0].log_softmax(-1), h, c


def export_icefall_layout(path: Path, vocab: int, eos: int) -> None:
    """An ONNX LM with icefall's names, axes, opset and metadata."""
    torch.manual_seed(1)
    model = IcefallLm(vocab).eval()
    args = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(2, 1, 16), torch.zeros(2, 1, 16))
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and trace notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), dynamo=False, opset_version=13,
            input_names=["x", "h0", "c0"], output_names=["log_softmax", "next_h0", "next_c0"],
            dynamic_axes={"x": {0: "N", 1: "L"}, "h0": {1: "N"}, "c0": {1: "N"},
                          "log_softmax": {0: "N"}, "next_h0": {1: "N"}, "next_c0": {1: "N"}},
        )  # fmt: skip
    proto = onnx.load(str(path))
    meta = {"model_type": "rnnlm", "sos_id": str(eos), "eos_id": str(eos),
            "vocab_size": str(vocab), "num_layers": "2", "hidden_size": "16"}  # fmt: skip
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


class Dictionary:
    """flair.data.Dictionary's pickled fields and how it adds items."""

    def __init__(self) -> None:
        self.item2idx: dict[bytes, int] = {}
        self.idx2item: list[bytes] = []
        self.add_unk = True
        self.multi_label = False
        self.span_labels = False
        self.add_item("<unk>")

    def add_item(self, item: str) -> int:
        key = item.encode("utf-8")
        if key not in self.item2idx:
            self.idx2item.append(key)
            self.item2idx[key] = len(self.idx2item) - 1
        return self.item2idx[key]


def flair_modules(vocab: int) -> dict[str, nn.Module]:
    """flair LanguageModel's modules: encoder, a sequence-first LSTM, proj (nout), decoder."""
    torch.manual_seed(2)
    return {"encoder": nn.Embedding(vocab, 12), "rnn": nn.LSTM(12, 24, 1),
            "proj": nn.Linear(24, 10), "decoder": nn.Linear(10, vocab)}  # fmt: skip


def flair_logprobs(modules: dict[str, nn.Module], ids: list[int], eos: int) -> np.ndarray:
    """flair's forward (eval), one stream after the delimiter: log p of each id."""
    data = torch.tensor([eos, *ids]).unsqueeze(1)
    with torch.no_grad():
        output, _ = modules["rnn"](modules["encoder"](data[:-1]))
        decoded = modules["decoder"](modules["proj"](output))[:, 0]
        logprobs = torch.log_softmax(decoded.double(), -1)
    return logprobs[torch.arange(len(ids)), data[1:, 0]].numpy()


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (more only contend, on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("examples-data")
    (data / "train.txt").write_text(tiny_text(120), encoding="utf8")
    (data / "valid.txt").write_text(VALID_TEXT, encoding="utf8")
    (data / "test.txt").write_text(TEST_TEXT, encoding="utf8")
    return data


# name -> (rnn_type, tied, saved as)
EXAMPLES = {"ex-lstm": ("LSTM", True, "model"), "ex-gru": ("GRU", False, "state_dict"),
            "ex-tanh": ("RNN_TANH", False, "model")}  # fmt: skip


@pytest.fixture(scope="module")
def examples_models(data_dir: Path) -> dict[str, RNNModel]:
    vocab, ids = corpus_ids(data_dir)
    models = {}
    for name, (rnn_type, tied, _) in EXAMPLES.items():
        torch.manual_seed(0)
        models[name] = RNNModel(rnn_type, len(vocab), 16, 16, 2, tie_weights=tied)
        train_briefly(models[name], ids["train"])
    return models


def import_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rnnlm_main(["import", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory,
    data_dir: Path,
    examples_models: dict[str, RNNModel],
) -> dict[str, Any]:
    """Every format imported into one model repository (through the API; the CLI is tested
    on its own), with what the tests need to compute the sources' answers."""
    from importers.examples import import_examples
    from importers.flair import import_flair
    from importers.onnx_lm import OnnxSpec, import_onnx
    from importers.write import write_imported

    work = tmp_path_factory.mktemp("sources")
    root = tmp_path_factory.mktemp("imported")
    for name, (_, _, saved) in EXAMPLES.items():
        path = work / f"{name}.pt"
        with defined_in("model", RNNModel):
            model = examples_models[name]
            torch.save(model if saved == "model" else model.state_dict(), path)
        write_imported(import_examples(path, data_dir), root / name, name=name)

    tok = fit_tokenizer("word", tiny_text())
    tok.save(str(work / "tokenizer.json"))
    eos = special_tokens(tok, "word")["eos"]
    export_icefall_layout(work / "lm.onnx", tok.get_vocab_size(), eos)
    spec = OnnxSpec(tokens="x", output="log_softmax", log_probs=True,
                    states=(("h0", "next_h0"), ("c0", "next_c0")))  # fmt: skip
    onnx_import = import_onnx(work / "lm.onnx", work / "tokenizer.json", spec, None)
    write_imported(onnx_import, root / "icefall", name="icefall")

    dictionary = Dictionary()
    for ch in "\n" + tiny_text(30) + "xyz,":
        dictionary.add_item(ch)
    modules = flair_modules(len(dictionary.idx2item))
    flair_path = work / "flair-lm.pt"
    save_flair(flair_path, modules, dictionary)
    (work / "flair-test.txt").write_text("the cat sees a tree .\nxyz, the moon\n")
    write_imported(import_flair(flair_path, work / "flair-test.txt"), root / "flair", name="flair")
    return {"root": root, "work": work, "onnx_eos": eos, "flair_modules": modules,
            "flair_dictionary": dictionary}  # fmt: skip


def save_flair(
    path: Path, modules: dict[str, nn.Module], dictionary: Dictionary, **changes: Any
) -> None:
    """A flair LM file: LanguageModel.save's dict (with `changes`), pickled with protocol 4
    as flair does."""
    state_dict = collections.OrderedDict(
        (f"{name}.{key}", value)
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    )
    state = {"state_dict": state_dict, "dictionary": dictionary, "is_forward_lm": True,
             "hidden_size": 24, "nlayers": 1, "embedding_size": 12, "nout": 10,
             "document_delimiter": "\n", "dropout": 0.1, **changes}  # fmt: skip
    with defined_in("flair.data", Dictionary):
        torch.save(state, path, pickle_protocol=4)


@pytest.fixture(scope="module")
def client(repository: dict[str, Any]) -> Iterator[Client]:
    server = LiveServer(config(repository["root"]))
    with Client(server.target, timeout=30) as c:
        yield c
    server.close()


# -- pytorch/examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_checkpoint_scores_as_its_own_evaluation(
    client: Client, data_dir: Path, examples_models: dict[str, RNNModel], name: str
) -> None:
    vocab, ids = corpus_ids(data_dir)
    response = client.score(TEST_TEXT, model=name, return_token_logprobs=True)
    (result,) = response.results
    # The bundle's tokenizer gives data.Corpus's ids, <eos> at each line end included.
    assert [t.token_id for t in result.token_logprobs] == ids["test"]
    expected = examples_logprobs(examples_models[name], ids["test"], vocab["<eos>"])
    assert result.log_prob == pytest.approx(expected.sum(), rel=1e-4, abs=1e-3)
    np.testing.assert_allclose(
        [t.logprob for t in result.token_logprobs], expected, rtol=1e-3, atol=1e-4
    )


def test_examples_word_outside_a_corpus_without_unk_is_invalid_argument(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        client.score("the cat sees a unicorn .", model="ex-lstm")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be encoded by model 'ex-lstm'" in str(raised.value.details())


def test_examples_manifest_records_the_source_and_its_test_perplexity(
    repository: dict[str, Any], data_dir: Path, examples_models: dict[str, RNNModel]
) -> None:
    vocab, ids = corpus_ids(data_dir)
    for name, (rnn_type, tied, saved) in EXAMPLES.items():
        manifest = json.loads((repository["root"] / name / "manifest.json").read_text())
        source = manifest["provenance"]["source"]
        assert source["format"] == "pytorch-examples"
        assert (source["rnn_type"], source["tied"]) == (rnn_type, tied)
        assert source["holds"] == ("torch.save(model)" if saved == "model" else "state_dict")
        assert len(source["sha256"]) == 64 and set(source["data"]) == {
            "train.txt", "valid.txt", "test.txt"
        }  # fmt: skip
        expected = examples_logprobs(examples_models[name], ids["test"], vocab["<eos>"])
        assert manifest["provenance"]["test_perplexity"] == pytest.approx(
            math.exp(-expected.mean()), rel=1e-4
        )
        cases = manifest["parity"]["cases"]
        assert {c["graph"] for c in cases} == {"step", "prefill", "score"}
        assert any(c["input"] == "real text" and len(c["lengths"]) > 1 for c in cases)


def test_examples_cli_refuses_a_class_no_checkpoint_holds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    model = RNNModel("LSTM", 5, 4, 4, 2)
    model.helper = Helper()
    marker = tmp_path / "ran"
    bundle = tmp_path / "bundle"
    for payload in (model, {"model": model, "hook": Touch(marker)}):
        with defined_in("model", RNNModel, Helper):
            torch.save(payload, tmp_path / "evil.pt")
        code, _, err = import_cli(
            capsys, "pytorch-examples", str(tmp_path / "evil.pt"), str(bundle),
            "--data", str(data_dir),
        )  # fmt: skip
        assert code == 2
        assert err.count("\n") == 1 and err.startswith("rnnlm import: error: ")
        assert "refused: it holds" in err and "'model.Helper'" in err
    assert not marker.exists() and not bundle.exists()


def test_examples_cli_imports_and_says_where_to(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path,
    examples_models: dict[str, RNNModel],
) -> None:  # fmt: skip
    path = tmp_path / "model.pt"
    with defined_in("model", RNNModel):
        torch.save(examples_models["ex-lstm"], path)
    target = tmp_path / "out" / "lm"
    argv = ["pytorch-examples", str(path), str(target), "--data", str(data_dir)]
    code, out, err = import_cli(capsys, *argv, "--version", "7")
    assert (code, err) == (0, "")
    assert out.startswith(f"imported pytorch-examples {path} -> {target}")
    assert "note: the corpus has no <unk>: a word it never saw cannot be encoded" in out
    manifest = json.loads((target / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"]) == ("lm", "7")
    code, _, err = import_cli(capsys, *argv)
    assert code == 2 and "already exists" in err
    # The target is checked before the checkpoint is read (which can take minutes for a big one).
    missing = ["pytorch-examples", str(tmp_path / "none.pt"), str(target), "--data", str(data_dir)]
    code, _, err = import_cli(capsys, *missing)
    assert code == 2 and "already exists" in err


def test_examples_elman_state_dict_needs_its_cell(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    vocab, ids = corpus_ids(data_dir)
    torch.manual_seed(3)
    model = RNNModel("RNN_RELU", len(vocab), 8, 8, 2).eval()
    torch.save(model.state_dict(), tmp_path / "relu.pt")
    argv = ["pytorch-examples", str(tmp_path / "relu.pt"), str(tmp_path / "b"),
            "--data", str(data_dir)]  # fmt: skip
    code, _, err = import_cli(capsys, *argv)
    assert code == 2 and "pass --cell rnn_tanh or rnn_relu" in err
    code, _, err = import_cli(capsys, *argv, "--cell", "gru")
    assert code == 2 and "not a gru" in err
    code, _, err = import_cli(capsys, *argv, "--cell", "rnn_relu")
    assert (code, err) == (0, "")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["architecture"]["cell"] == "rnn_relu"
    expected = examples_logprobs(model, ids["test"], vocab["<eos>"])
    assert manifest["provenance"]["test_perplexity"] == pytest.approx(
        math.exp(-expected.mean()), rel=1e-4
    )


def test_examples_data_that_is_not_the_training_corpus_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, examples_models: dict[str, RNNModel]
) -> None:
    other = tmp_path / "data"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text("some other words\n")
    with defined_in("model", RNNModel):
        torch.save(examples_models["ex-gru"].state_dict(), tmp_path / "sd.pt")
    code, _, err = import_cli(
        capsys, "pytorch-examples", str(tmp_path / "sd.pt"), str(tmp_path / "b"),
        "--data", str(other),
    )  # fmt: skip
    assert code == 2 and "is --data the folder it was trained on?" in err


# -- ONNX (icefall layout) ------------------------------------------------------------------------


def icefall_run(work: Path, ids: list[int], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """The source graph fed eos and then `ids` one token per call, as sherpa-onnx feeds it:
    the log-probs `[len(ids) + 1, V]` after each and the last layer of `h` after each."""
    session = ort.InferenceSession(str(work / "lm.onnx"), providers=["CPUExecutionProvider"])
    h, c = np.zeros((2, 1, 16), np.float32), np.zeros((2, 1, 16), np.float32)
    rows, features = [], []
    for token in [eos, *ids]:
        x = np.array([[token]], dtype=np.int64)
        logprobs, h, c = session.run(None, {"x": x, "h0": h, "c0": c})
        rows.append(logprobs[0].astype(np.float64))
        features.append(h[-1, 0])
    return np.array(rows), np.array(features)


def icefall_logprobs(work: Path, ids: list[int], eos: int) -> np.ndarray:
    return icefall_run(work, ids, eos)[0]


def test_onnx_lm_serves_predict_next_generate_embed_and_score(
    client: Client, repository: dict[str, Any]
) -> None:
    work, eos = repository["work"], repository["onnx_eos"]
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    context = "the cat sees the"
    ids = tok.encode(context).ids
    probs = np.exp(icefall_logprobs(work, ids, eos)[-1])
    # The model's own distribution: without the word cache (docs/typing.md).
    response = client.predict_next(context, k=4, model="icefall", word_cache=False)
    got = [p.token_id for p in response.predictions]
    ranked = [int(i) for i in np.argsort(-probs, kind="stable") if int(i) != eos][:4]
    assert got == ranked
    np.testing.assert_allclose([p.probability for p in response.predictions], probs[ranked],
                               rtol=1e-4, atol=1e-6)  # fmt: skip

    chunks = list(client.generate(context, model="icefall", max_tokens=8, temperature=0))
    generated = [i for chunk in chunks for i in chunk.token_ids]
    expected = []
    for _ in range(8):
        expected.append(int(np.argmax(icefall_logprobs(work, ids + expected, eos)[-1])))
    assert generated == expected

    (embedding,) = client.embed(context, pooling="last", model="icefall").embeddings
    np.testing.assert_allclose(embedding.values, icefall_run(work, ids, eos)[1][-1],
                               rtol=1e-3, atol=1e-5)  # fmt: skip

    text = TEST_TEXT + " ".join(["the old man calls the small boat ."] * 30)
    score_ids = tok.encode(text).ids
    logprobs = icefall_logprobs(work, score_ids, eos)[np.arange(len(score_ids)), score_ids]
    (result,) = client.score(text, model="icefall").results
    assert result.num_tokens == len(score_ids)
    assert result.log_prob == pytest.approx(logprobs.sum(), rel=1e-4, abs=1e-3)


def test_onnx_cli_names_missing_inputs_and_keeps_the_source_names(
    capsys: pytest.CaptureFixture[str], repository: dict[str, Any], tmp_path: Path
) -> None:
    work = repository["work"]
    tokenizer = str(work / "tokenizer.json")
    common = [str(work / "lm.onnx"), str(tmp_path / "b"), "--tokenizer", tokenizer,
              "--tokens", "x", "--log-probs", "log_softmax"]  # fmt: skip
    code, _, err = import_cli(capsys, "onnx", *common, "--state", "h0:next_h0")
    assert code == 2 and "input 'c0' is neither --tokens nor a --state" in err
    code, _, err = import_cli(capsys, "onnx", *common, "--state", "h0:next_h0",
                              "--state", "c0:cn")  # fmt: skip
    assert code == 2 and "has no output 'cn'" in err
    code, out, err = import_cli(capsys, "onnx", *common, "--state", "h0:next_h0",
                                "--state", "c0:next_c0", "--name", "lm")  # fmt: skip
    assert (code, err) == (0, "")
    assert "note: no --test-text: parity ran on random tokens only" in out
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["name"] == "lm"
    manifest = json.loads((repository["root"] / "icefall" / "manifest.json").read_text())
    source = manifest["provenance"]["source"]
    assert source["inputs"] == ["x", "h0", "c0"]
    assert source["outputs"] == ["log_softmax", "next_h0", "next_c0"]
    assert source["metadata"]["model_type"] == "rnnlm"
    assert manifest["architecture"]["embedding"] is None
    assert set(manifest["graphs"]) == {"step", "prefill", "score"}


def test_onnx_bundle_with_only_a_step_graph_serves_score_on_it(
    repository: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the server does with an import whose derived graphs were left out."""
    from importers.onnx_lm import OnnxSpec, import_onnx
    from importers.write import write_imported

    work, eos = repository["work"], repository["onnx_eos"]
    spec = OnnxSpec(tokens="x", output="log_softmax", log_probs=True,
                    states=(("h0", "next_h0"), ("c0", "next_c0")))  # fmt: skip
    imported = import_onnx(work / "lm.onnx", work / "tokenizer.json", spec, None)
    imported.blobs = {"step": imported.blobs["step"]}
    write_imported(imported, tmp_path / "models" / "step-only")
    manifest = json.loads((tmp_path / "models" / "step-only" / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"step"}
    caplog.set_level(logging.INFO, logger="server.repository")
    server = LiveServer(config(tmp_path / "models"))
    try:
        with Client(server.target, timeout=30) as client:
            (result,) = client.score(TEST_TEXT, model="step-only").results
    finally:
        server.close()
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    ids = tok.encode(TEST_TEXT).ids
    logprobs = icefall_logprobs(work, ids, eos)[np.arange(len(ids)), ids]
    assert result.log_prob == pytest.approx(logprobs.sum(), rel=1e-4, abs=1e-3)
    said = [r.getMessage() for r in caplog.records]
    assert "step-only version 1 has no score graph: its score work runs on the step graph" in said


# -- flair --------------------------------------------------------------------------------------


def test_flair_lm_scores_like_the_source(client: Client, repository: dict[str, Any]) -> None:
    dictionary = repository["flair_dictionary"]
    text = "the cat sees a tree .\nqq the moon\n"  # q: not in the dictionary, so <unk> (id 0)
    ids = [dictionary.item2idx.get(ch.encode(), 0) for ch in text]
    assert 0 in ids
    (result,) = client.score(text, model="flair", return_token_logprobs=True).results
    assert [t.token_id for t in result.token_logprobs] == ids
    eos = dictionary.item2idx[b"\n"]
    expected = flair_logprobs(repository["flair_modules"], ids, eos)
    assert result.log_prob == pytest.approx(expected.sum(), rel=1e-4, abs=1e-3)
    manifest = json.loads((repository["root"] / "flair" / "manifest.json").read_text())
    test_text = (repository["work"] / "flair-test.txt").read_text()
    test_ids = [dictionary.item2idx.get(ch.encode(), 0) for ch in test_text]
    want = flair_logprobs(repository["flair_modules"], test_ids, eos)
    assert manifest["provenance"]["test_perplexity"] == pytest.approx(
        math.exp(-want.mean()), rel=1e-4
    )
    assert manifest["tokenizer"]["special_tokens"] == {"eos": eos, "unk": 0}
    info = client.get_model("flair")
    assert info.quality.test_perplexity == pytest.approx(manifest["provenance"]["test_perplexity"])
    assert (info.architecture.cell, info.tokenizer_kind) == ("lstm", "char")


def test_flair_backward_lm_and_foreign_classes_are_refused(
    capsys: pytest.CaptureFixture[str], repository: dict[str, Any], tmp_path: Path
) -> None:
    modules = repository["flair_modules"]
    dictionary = repository["flair_dictionary"]
    path = tmp_path / "backward.pt"
    save_flair(path, modules, dictionary, is_forward_lm=False)
    save_flair(tmp_path / "evil.pt", modules, dictionary, x=Touch(tmp_path / "ran"))
    code, _, err = import_cli(capsys, "flair", str(path), str(tmp_path / "b"))
    assert code == 2 and "backward flair LM" in err
    code, _, err = import_cli(capsys, "flair", str(tmp_path / "evil.pt"), str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1 and "refused" in err and "pathlib" in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "b").exists()
