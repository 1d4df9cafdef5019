"""The server's view of a model bundle: validated by the contract, then loaded to serve.

`rnnlm.bundle` defines the bundle (manifest, graphs, state tensors, files) and every check on
it; this module adds what serving needs on top, with numpy, onnxruntime and tokenizers (never
torch or onnx): the tokenizer, the continuous-cache settings, and onnxruntime sessions made
from the verified bytes rather than the files (`GraphBytes`). docs/bundle.md describes the
format.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from rnnlm.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    BundleError,
    ExternalRef,
    Manifest,
    StateSpec,
    check_graph_io,
    external_data,
    load_manifest,
    member_path,
    quote,
    read_files,
    read_manifest,
    read_member,
    sha256_file,
)
from server.continuous_cache import CacheParams

__all__ = [  # the contract's names that the server's modules and tests import from here
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MAX_MANIFEST_BYTES",
    "Bundle",
    "BundleError",
    "ExternalRef",
    "GraphBytes",
    "StateSpec",
    "external_data",
    "load_bundle",
    "member_path",
    "read_manifest",
    "read_member",
    "sha256_file",
]


class GraphBytes:
    """The verified bytes of a bundle's graphs and of the external data they reference.

    Sessions are made from these bytes, never from the files: onnxruntime copies the weights
    into memory it owns, so a bundle edited, truncated or removed under a live server changes
    no answer (onnxruntime maps an external data file it loads from a path, and a truncated
    mapped file kills the process with SIGBUS). `release` drops the bytes once every session
    is made, and hands the heap that loading used back to the system.

    Each session keeps only what it derived from the weights (prepacked matrices, folded
    constants), which no session can share; the raw copies it made while loading are freed.
    Handing the sessions one shared copy instead (`SessionOptions.add_initializer`) was
    measured to cost more, not less: the caller's copy must then outlive the sessions, and each
    session still makes its own derived copies (docs/bundle.md, "Shared weights").
    """

    def __init__(self, files: dict[str, bytes], external: tuple[str, ...]) -> None:
        self._files: dict[str, bytes] | None = files
        self._external = external  # the external data files the graphs reference
        self._given: weakref.WeakSet[ort.SessionOptions] = weakref.WeakSet()

    def session_inputs(self, graph: Path, options: ort.SessionOptions) -> bytes:
        """The graph's bytes, with its external data files added to `options` (once per
        options object: onnxruntime refuses a second entry of the same name)."""
        if self._files is None:
            raise BundleError(
                f"{graph}: the bundle's bytes were released once its sessions were made; "
                "load the bundle again"
            )
        if self._external and options not in self._given:
            buffers = [self._files[name] for name in self._external]
            try:
                options.add_external_initializers_from_files_in_memory(
                    list(self._external), buffers, [len(b) for b in buffers]
                )
            except RuntimeError as e:
                raise BundleError(
                    f"{graph}: these session options already carry another bundle's external "
                    f"data ({quote(str(e), 120)}); give each bundle its own SessionOptions"
                ) from e
            self._given.add(options)
        return self._files[graph.name]

    def release(self) -> None:
        """Drop the bytes (the sessions made from them keep their own copies), then return the
        freed heap to the system: onnxruntime's transient copies of the weights would
        otherwise stay resident in the C allocator's free lists."""
        self._files = None
        trim_heap()


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system (glibc `malloc_trim`): whether any was
    given back (never, where the C library has no such call: musl, macOS)."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    call: Callable[[int], int] = trim
    return call


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: the manifest's facts (`spec`, read through the properties below), the
    loaded tokenizer and the graph files."""

    path: Path
    spec: Manifest = field(repr=False, compare=False)  # the validated manifest
    tokenizer: Tokenizer
    step_graph: Path
    score_graph: Path | None
    # The verified bytes the sessions are made from (never the files again).
    graph_bytes: GraphBytes = field(repr=False, compare=False)
    # The step graph without its output layer (bundles exported before it have none).
    prefill_graph: Path | None = None
    continuous_cache: CacheParams | None = None  # what Score mixes in on request
    blocklist: str = ""  # the bundle's blocklist file's text: words never suggested
    lexicon: str = ""  # the bundle's lexicon file's text: the words searches may suggest
    # A word model's words outside its vocabulary with their counts (file text, "" when none),
    # and the <unk> tokens its model learned from (server/oov_words.py).
    unknown_words: str = ""
    unk_tokens: int = 0

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest's raw JSON, for its informative sections (provenance, parity, ...)."""
        return self.spec.data

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def cell(self) -> str:
        return self.spec.cell

    @property
    def layers(self) -> int:
        return self.spec.layers

    @property
    def hidden(self) -> int:
        return self.spec.hidden

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def tokenizer_kind(self) -> str:
        return self.spec.tokenizer_kind

    @property
    def batch_independent(self) -> bool | None:
        """Whether a row's results are the same whatever shares its batch: True for float
        graphs and int8 graphs whose activations are quantized a row at a time
        (`exporter.rowwise`); False for int8 exported with one activation scale a run on
        purpose (`--per-tensor-activations`); None for an int8 export from before the manifest
        said (one scale a run, as onnxruntime's quantize_dynamic writes it)."""
        if self.precision != "int8":
            return True
        quantization = self.manifest.get("quantization")
        said = quantization.get("batch_independent") if isinstance(quantization, dict) else None
        return said if isinstance(said, bool) else None

    @property
    def special_tokens(self) -> dict[str, int]:
        return self.spec.special_tokens

    @property
    def eos_id(self) -> int:
        return self.spec.eos_id

    @property
    def state(self) -> tuple[StateSpec, ...]:
        return self.spec.state

    @property
    def score_features(self) -> bool:
        """Whether the score graph also outputs `features` (bundles exported since the
        continuous cache), so cached scoring can run on it."""
        return self.score_graph is not None and "features" in self.graph_io("score")[1]

    def graph_file(self, graph: str) -> Path:
        """The file of graph `step`, `score` or `prefill`."""
        path = {"step": self.step_graph, "score": self.score_graph, "prefill": self.prefill_graph}
        found = path.get(graph)
        if found is not None:
            return found
        raise BundleError(f"{self.path / MANIFEST_FILE}: the bundle has no {graph!r} graph")

    def graph_io(self, graph: str) -> tuple[list[str], list[str]]:
        """The input and output names of a graph, as the manifest lists them."""
        self.graph_file(graph)
        spec = self.spec.graphs[graph]
        return list(spec.inputs), list(spec.outputs)

    def zero_state(self, batch: int) -> tuple[np.ndarray, ...]:
        """The state that starts a stream: a float32 `[layers, batch, hidden]` array per tensor."""
        return tuple(np.zeros((s.layers, batch, s.hidden), dtype=np.float32) for s in self.state)

    def open_session(
        self,
        graph: str = "step",
        session_options: ort.SessionOptions | None = None,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    ) -> ort.InferenceSession:
        """Create an onnxruntime session for `graph` and check its inputs and outputs.

        The names, element types and ranks must be the manifest's; a fixed vocabulary or hidden
        dimension in the graph must match the architecture, which is how the tokenizer's size is
        held against the graph.
        """
        path = self.graph_file(graph)
        options = session_options if session_options is not None else ort.SessionOptions()
        data = self.graph_bytes.session_inputs(path, options)
        try:
            session = ort.InferenceSession(
                data,
                sess_options=options,
                providers=list(providers) if providers is not None else ["CPUExecutionProvider"],
            )
        except Exception as e:  # onnxruntime raises several types for an unreadable graph
            raise BundleError(
                f"{path}: onnxruntime cannot load the graph ({quote(str(e), 300)})"
            ) from e
        check_graph_io(path, graph, self.spec, session.get_inputs(), session.get_outputs())
        return session


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Read and validate a bundle: manifest fields, file hashes, tokenizer against architecture.

    Graph sessions are not created here (see `Bundle.open_session`), so the caller chooses the
    execution providers and threading.
    """
    directory = Path(bundle_dir)
    m = load_manifest(directory)
    continuous_cache = None
    if "continuous_cache" in m.data:
        try:
            continuous_cache = CacheParams.from_dict(m.data["continuous_cache"])
        except ValueError as e:
            raise BundleError(f"{m.path}: continuous_cache: {e}") from e
    files = read_files(directory, m)
    tokenizer_data = files.contents[m.tokenizer_file]
    tokenizer = _load_tokenizer(directory / m.tokenizer_file, tokenizer_data, m.vocab_size)
    graph_names = [spec.file for spec in m.graphs.values()]
    held = {name: files.contents[name] for name in [*graph_names, *files.external]}
    paths = {kind: directory / spec.file for kind, spec in m.graphs.items()}
    return Bundle(
        path=directory,
        spec=m,
        tokenizer=tokenizer,
        step_graph=paths["step"],
        score_graph=paths.get("score"),
        prefill_graph=paths.get("prefill"),
        continuous_cache=continuous_cache,
        blocklist=_word_file(files.contents, m, m.blocklist_file),
        lexicon=_word_file(files.contents, m, m.lexicon_file),
        unknown_words=_unknown_words(files.contents, m),
        unk_tokens=m.unk_tokens,
        graph_bytes=GraphBytes(held, files.external),
    )


def _word_file(contents: dict[str, bytes], m: Manifest, name: str | None) -> str:
    """The text of the bundle's word list `name` (a blocklist, a lexicon, the unknown words);
    "" when none."""
    if name is None:
        return ""
    try:
        return contents[name].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{m.path.parent / name}: not UTF-8 text ({e})") from e


def _unknown_words(contents: dict[str, bytes], m: Manifest) -> str:
    """The text of the bundle's unknown-words file, checked (`unknown_word_counts`)."""
    text = _word_file(contents, m, m.unknown_words_file)
    if text:
        where = str(m.path.parent / (m.unknown_words_file or ""))
        unknown_word_counts(text, m.unk_tokens, where)
    return text


def unknown_word_counts(text: str, unk_tokens: int, where: str) -> list[tuple[str, float]]:
    """The words and counts of an unknown-words file: `word<TAB>count` a line (blank lines
    ignored), each word once, each count a positive number (a fraction for a word replaced
    by <unk> only some of the times it was seen), together at most `unk_tokens` (the <unk>
    tokens the model learned from, of which these words were some)."""
    counts: dict[str, float] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        word, tab, count = line.partition("\t")
        value = _positive(count)
        if not tab or not word or word != word.strip() or value is None:
            raise BundleError(
                f"{where}: line {number} must be a word, a tab and a positive count, "
                f"not {quote(line, 60)}"
            )
        if word in counts:
            raise BundleError(f"{where}: line {number}: {quote(word, 60)} is listed twice")
        counts[word] = value
    total = sum(counts.values())
    if total > unk_tokens:
        raise BundleError(
            f"{where}: its counts add up to {total:g}, more than the manifest's "
            f"unknown_words.unk_tokens ({unk_tokens})"
        )
    return list(counts.items())


def _positive(text: str) -> float | None:
    """`text` as a finite positive number, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


def _load_tokenizer(path: Path, data: bytes, vocab_size: int) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise BundleError(
            f"{path}: cannot be read as a tokenizers file ({quote(str(e), 200)})"
        ) from e
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise BundleError(
            f"{path}: the tokenizer has {size} tokens but the graphs' architecture.vocab_size "
            f"is {vocab_size}"
        )
    return tokenizer
