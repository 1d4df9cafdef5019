"""The model bundle contract: the one place that defines, reads and validates a bundle.

The exporter runs this same validator before it commits a bundle, and the server runs it before
it serves one, so a bundle that loads here is a bundle both sides agree on. Torch-free: only
numpy, onnxruntime and tokenizers. The format is described in docs/bundle.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from server.continuous_cache import CacheParams

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
TOKENIZER_KINDS = ("word", "char", "bpe")
# Precision of the weights -> the element type of the graphs' float inputs and outputs.
FLOAT_IO = {"fp32": "tensor(float)", "int8": "tensor(float)"}
GRAPH_KINDS = ("step", "score", "prefill")
MAX_MANIFEST_BYTES = 4 * 2**20
QUOTE_CHARS = 60  # the most of a manifest's value an error message quotes
_HEX64 = re.compile("[0-9a-f]{64}")
# ONNX protobuf field numbers (onnx/onnx.proto) on every path from a model to a tensor, so the
# loader can list a graph's external data files without the `onnx` package (not a server
# dependency). Message kind -> {field number: kind of the embedded message}.
_ONNX_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME = 8
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data: StringStringEntryProto key=1, value=2


class BundleError(Exception):
    """A bundle is missing, incomplete, tampered with or inconsistent; the message names a file."""


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor `[layers, batch, hidden]`: its graph input and output names."""

    name: str
    input: str
    output: str
    layers: int
    hidden: int


class GraphBytes:
    """The verified bytes of a bundle's graphs and of the external data they reference.

    Sessions are made from these bytes, never from the files: onnxruntime copies the weights
    into memory it owns, so a bundle edited, truncated or removed under a live server changes
    no answer (onnxruntime maps an external data file it loads from a path, and a truncated
    mapped file kills the process with SIGBUS). `release` drops the bytes once every session
    is made.
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
        """Drop the bytes (the sessions made from them keep their own copies)."""
        self._files = None


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: the manifest's facts, the loaded tokenizer and the graph files."""

    path: Path
    manifest: dict[str, Any]
    name: str
    version: str
    cell: str
    layers: int
    hidden: int
    vocab_size: int
    precision: str
    tokenizer: Tokenizer
    tokenizer_kind: str
    special_tokens: dict[str, int]
    eos_id: int
    state: tuple[StateSpec, ...]
    step_graph: Path
    score_graph: Path | None
    # The step graph without its output layer (bundles exported before it have none).
    prefill_graph: Path | None = None
    continuous_cache: CacheParams | None = None  # what Score mixes in on request
    # The verified bytes the sessions are made from (never the files again).
    graph_bytes: GraphBytes = field(
        default_factory=lambda: GraphBytes({}, ()), repr=False, compare=False
    )

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
        spec = self.manifest["graphs"][graph]
        return list(spec["inputs"]), list(spec["outputs"])

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
        inputs, outputs = self.graph_io(graph)
        expected = self._expected_io(graph)
        for kind, names, args in (
            ("inputs", inputs, session.get_inputs()),
            ("outputs", outputs, session.get_outputs()),
        ):
            actual = [a.name for a in args]
            if actual != names:
                raise BundleError(
                    f"{path}: graph {kind} {actual} do not match the manifest's {names}"
                )
            for arg in args:
                _check_arg(path, arg, *expected[arg.name])
        return session

    def _expected_io(self, graph: str) -> dict[str, tuple[str, list[int | None]]]:
        """Each I/O name of a graph -> (element type, dims where None means dynamic)."""
        fp = FLOAT_IO[self.precision]
        io: dict[str, tuple[str, list[int | None]]] = {"tokens": ("tensor(int64)", [None, None])}
        for s in self.state:
            io[s.input] = io[s.output] = (fp, [s.layers, None, s.hidden])
        io["features"] = (fp, [None, None, self.hidden])
        if graph == "step":
            io["logits"] = (fp, [None, None, self.vocab_size])
        elif graph == "score":
            io["targets"] = ("tensor(int64)", [None, None])
            io["target_logprobs"] = (fp, [None, None])
        return io


def _check_arg(path: Path, arg: Any, elem_type: str, dims: list[int | None]) -> None:
    if arg.type != elem_type:
        raise BundleError(f"{path}: {arg.name!r} has type {arg.type}, expected {elem_type}")
    shape = list(arg.shape)
    if len(shape) != len(dims):
        raise BundleError(
            f"{path}: {arg.name!r} has rank {len(shape)} {shape}, expected rank {len(dims)}"
        )
    for axis, (got, want) in enumerate(zip(shape, dims, strict=True)):
        if want is not None and isinstance(got, int) and got != want:
            raise BundleError(
                f"{path}: {arg.name!r} has size {got} on axis {axis}, expected {want} "
                "(from the manifest's architecture)"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """A value from a manifest or graph, quoted for an error message: a bounded prefix only."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def file_name_problem(name: str) -> str | None:
    """Why `name` is not a plain file name inside a bundle directory, or None when it is."""
    if not name or name in (".", ".."):
        return "is not a file name"
    if "/" in name or "\\" in name or "\0" in name:
        return "is not a file name inside the bundle (no directories, no absolute paths)"
    if len(name.encode("utf-8", errors="replace")) > 255:
        return "is longer than a file name can be (255 bytes)"
    return None


def member_path(directory: Path, name: str, missing: str = f"listed in {MANIFEST_FILE}") -> Path:
    """Where file `name` of a bundle really is, once known to be a regular file inside it.

    Refused, with one line and before anything is opened: a name that is not a plain file name
    (an absolute path, `..`, a subdirectory), a symbolic link that leads out of the bundle, a
    missing file, and anything but a regular file (a FIFO, a device, a directory).
    """
    problem = file_name_problem(name)
    if problem is not None:
        raise BundleError(
            f"{directory / MANIFEST_FILE}: 'files' names {quote(name)}, which {problem}"
        )
    path = directory / name
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(directory)):
        raise BundleError(f"{path}: a symbolic link out of the bundle; bundle files must be in it")
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise BundleError(f"{path}: missing ({missing})") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{path}: not a regular file; a bundle holds only regular files")
    return real


def read_member(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file, read through one descriptor that follows no symbolic link:
    exactly the size it had when opened, so a file that keeps growing is never read forever."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BundleError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path}: not a regular file; a bundle holds only regular files")
        if limit is not None and info.st_size > limit:
            raise BundleError(f"{path}: {info.st_size} bytes, more than the {limit} allowed")
        data = f.read(info.st_size)
    if len(data) != info.st_size:
        raise BundleError(f"{path}: shrank while it was read ({len(data)} of {info.st_size} bytes)")
    return data


class _Reader:
    """Typed access to the manifest's fields; every error names the manifest and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, message: str) -> BundleError:
        return BundleError(f"{self.path}: {message}")

    def get(self, obj: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
        field = f"{where}{key}"
        if key not in obj:
            raise self.fail(f"missing field {field!r}")
        value = obj[key]
        # bool is an int in Python; a JSON true is never a valid count.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"field {field!r} must be {_json_type(kind)}, not {quote(value)}")
        return value

    def positive(self, obj: dict[str, Any], key: str, where: str) -> int:
        value: int = self.get(obj, key, int, where)
        if value < 1:
            raise self.fail(f"field {where}{key!r} must be at least 1, not {value}")
        return value

    def file_name(self, obj: dict[str, Any], key: str, where: str) -> str:
        name: str = self.get(obj, key, str, where)
        if file_name_problem(name) is not None:
            raise self.fail(
                f"field {where}{key!r} must be a file name in the bundle, not {quote(name)}"
            )
        return name

    def names(self, obj: dict[str, Any], key: str, where: str) -> list[str]:
        value: list[Any] = self.get(obj, key, list, where)
        if not all(isinstance(v, str) for v in value):
            raise self.fail(f"field {where}{key!r} must be a list of strings, not {quote(value)}")
        return value


def _json_type(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(
        kind, kind.__name__
    )


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The parsed manifest.json of a bundle directory (parsed only, not validated)."""
    directory = Path(bundle_dir)
    if not directory.is_dir():
        raise BundleError(f"{directory}: not a bundle directory (it does not exist)")
    path = member_path(directory, MANIFEST_FILE, f"is {directory} a model bundle?")
    try:
        data = json.loads(read_member(path, MAX_MANIFEST_BYTES).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({quote(str(e), 200)})") from e
    if not isinstance(data, dict):
        raise BundleError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Read and validate a bundle: manifest fields, file hashes, tokenizer against architecture.

    Graph sessions are not created here (see `Bundle.open_session`), so the caller chooses the
    execution providers and threading.
    """
    directory = Path(bundle_dir)
    m = read_manifest(directory)
    r = _Reader(directory / MANIFEST_FILE)

    fmt = r.get(m, "format_version", int)
    if fmt != FORMAT_VERSION:
        raise r.fail(f"format_version {fmt} is not supported (expected {FORMAT_VERSION})")
    name: str = r.get(m, "name", str)
    if not name:
        raise r.fail("field 'name' must not be empty")
    version: str = r.get(m, "version", str)
    if not version:
        raise r.fail("field 'version' must not be empty")

    arch = r.get(m, "architecture", dict)
    cell: str = r.get(arch, "cell", str, "architecture.")
    if cell not in CELLS:
        raise r.fail(f"architecture.cell must be one of {', '.join(CELLS)}, not {cell!r}")
    layers = r.positive(arch, "layers", "architecture.")
    hidden = r.positive(arch, "hidden", "architecture.")
    vocab_size = r.positive(arch, "vocab_size", "architecture.")

    precision: str = r.get(m, "precision", str)
    if precision not in FLOAT_IO:
        raise r.fail(f"precision must be one of {', '.join(FLOAT_IO)}, not {precision!r}")
    r.get(m, "provenance", dict)
    r.get(m, "parity", dict)

    files: dict[str, Any] = r.get(m, "files", dict)
    for file, digest in files.items():
        problem = file_name_problem(file)
        if problem is not None:
            raise r.fail(f"'files' names {quote(file)}, which {problem}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise r.fail(f"files[{quote(file)}] must be a sha256 hex digest, not {quote(digest)}")

    state = _read_state(r, m, cell, layers, hidden)
    graphs = r.get(m, "graphs", dict)
    step_file = _read_graph(r, graphs, "step", state, directory, files)
    score_file, prefill_file = (
        _read_graph(r, graphs, kind, state, directory, files) if kind in graphs else None
        for kind in ("score", "prefill")
    )
    unknown = sorted(set(graphs) - set(GRAPH_KINDS))
    if unknown:
        raise r.fail(f"graphs has unknown entries {unknown}; known: {', '.join(GRAPH_KINDS)}")

    tok = r.get(m, "tokenizer", dict)
    tokenizer_kind: str = r.get(tok, "kind", str, "tokenizer.")
    if tokenizer_kind not in TOKENIZER_KINDS:
        raise r.fail(
            f"tokenizer.kind must be one of {', '.join(TOKENIZER_KINDS)}, not {tokenizer_kind!r}"
        )
    tokenizer_file = r.file_name(tok, "file", "tokenizer.")
    _require_listed(r, files, tokenizer_file, "tokenizer.file")
    special: dict[str, Any] = r.get(tok, "special_tokens", dict, "tokenizer.")
    for key, value in special.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise r.fail(
                f"tokenizer.special_tokens.{key} must be a token id below vocab_size "
                f"{vocab_size}, not {value!r}"
            )
    eos_id: int = r.get(special, "eos", int, "tokenizer.special_tokens.")

    continuous_cache = None
    if "continuous_cache" in m:
        block = r.get(m, "continuous_cache", dict)
        try:
            continuous_cache = CacheParams.from_dict(block)
        except ValueError as e:
            raise r.fail(f"continuous_cache: {e}") from e

    contents = _verify_files(directory, files)
    graph_files = [g for g in (step_file, score_file, prefill_file) if g is not None]
    external = sorted({loc for g in graph_files for loc in _check_external_data(g, contents)})
    held = {name: contents[name] for name in [*(g.name for g in graph_files), *external]}
    tokenizer = _load_tokenizer(directory / tokenizer_file, contents[tokenizer_file], vocab_size)

    return Bundle(
        path=directory,
        manifest=m,
        name=name,
        version=version,
        cell=cell,
        layers=layers,
        hidden=hidden,
        vocab_size=vocab_size,
        precision=precision,
        tokenizer=tokenizer,
        tokenizer_kind=tokenizer_kind,
        special_tokens=dict(special),
        eos_id=eos_id,
        state=state,
        step_graph=step_file,
        score_graph=score_file,
        prefill_graph=prefill_file,
        continuous_cache=continuous_cache,
        graph_bytes=GraphBytes(held, tuple(external)),
    )


def _read_state(
    r: _Reader, m: dict[str, Any], cell: str, layers: int, hidden: int
) -> tuple[StateSpec, ...]:
    entries: list[Any] = r.get(m, "state", list)
    expected = 2 if cell == "lstm" else 1
    if len(entries) != expected:
        raise r.fail(f"state lists {len(entries)} tensors; a {cell} has {expected}")
    specs = []
    for i, entry in enumerate(entries):
        where = f"state[{i}]."
        if not isinstance(entry, dict):
            raise r.fail(f"state[{i}] must be an object, not {entry!r}")
        shape = r.get(entry, "shape", list, where)
        if len(shape) != 3 or shape[0] != layers or shape[2] != hidden:
            raise r.fail(
                f"{where}shape {shape} does not match the architecture "
                f"[{layers}, 'batch', {hidden}]"
            )
        specs.append(
            StateSpec(
                name=r.get(entry, "name", str, where),
                input=r.get(entry, "input", str, where),
                output=r.get(entry, "output", str, where),
                layers=layers,
                hidden=hidden,
            )
        )
    return tuple(specs)


def _read_graph(
    r: _Reader,
    graphs: dict[str, Any],
    kind: str,
    state: tuple[StateSpec, ...],
    directory: Path,
    files: dict[str, Any],
) -> Path:
    where = f"graphs.{kind}."
    spec = r.get(graphs, kind, dict, "graphs.")
    file = r.file_name(spec, "file", where)
    _require_listed(r, files, file, f"{where}file")
    inputs = r.names(spec, "inputs", where)
    outputs = r.names(spec, "outputs", where)
    data_in = ["tokens", "targets"] if kind == "score" else ["tokens"]
    data_out = {"step": ["logits"], "score": ["target_logprobs"], "prefill": []}[kind] + [
        "features"
    ]
    want_in = data_in + [s.input for s in state]
    want_out = data_out + [s.output for s in state]
    # Score graphs exported before the continuous cache have no `features`.
    earlier = ["target_logprobs"] + [s.output for s in state] if kind == "score" else want_out
    if inputs != want_in:
        raise r.fail(f"{where}inputs {inputs} must be {want_in}")
    if outputs not in (want_out, earlier):
        raise r.fail(f"{where}outputs {outputs} must be {want_out}")
    return directory / file


def _require_listed(r: _Reader, files: dict[str, Any], file: str, field: str) -> None:
    if file not in files:
        raise r.fail(f"{field} {file!r} has no sha256 in 'files'")


def _verify_files(directory: Path, files: dict[str, Any]) -> dict[str, bytes]:
    """Every listed file's bytes, each read once and checked against its sha256.

    Every name is confined to the bundle (see `member_path`) before any file is read.
    """
    paths = {file: member_path(directory, file) for file in files}
    contents = {}
    for file, digest in files.items():
        data = read_member(paths[file])
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BundleError(
                f"{paths[file]}: sha256 {actual} does not match the manifest's {digest}; "
                "the file was changed or damaged after export"
            )
        contents[file] = data
    return contents


def _check_external_data(graph_file: Path, contents: dict[str, bytes]) -> set[str]:
    """The external data files a graph references, each checked to be a file of the bundle,
    present and hashed, with every tensor's bytes inside it."""
    locations = set()
    for ref in external_data(contents[graph_file.name], graph_file):
        location = ref.location
        if file_name_problem(location) is not None:
            raise BundleError(
                f"{graph_file}: external data location {quote(location)} is not a file name "
                "inside the bundle"
            )
        if location not in contents:
            path = graph_file.parent / location
            if not os.path.lexists(path):
                raise BundleError(
                    f"{path}: missing; {graph_file.name} keeps its weights there "
                    "(ONNX external data)"
                )
            raise BundleError(
                f"{graph_file}: references external data {quote(location)}, which has no "
                f"sha256 in {MANIFEST_FILE} 'files'"
            )
        size = len(contents[location])
        if ref.length is None or ref.offset + ref.length > size:
            raise BundleError(
                f"{graph_file}: tensor {quote(ref.tensor)} lies at bytes {ref.offset}-"
                f"{ref.offset + (ref.length or 0)} of {location!r}, which has "
                f"{size} bytes (the graph and the weights file do not belong together)"
            )
        locations.add(location)
    return locations


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor of a graph keeps its bytes (ONNX external data)."""

    tensor: str
    location: str
    offset: int
    length: int | None  # None: to the end of the file (never written by the exporter)


def external_data(graph: Path | bytes, shown: Path | None = None) -> list[ExternalRef]:
    """The external-data tensors of an ONNX file or its bytes, read without the `onnx` package.

    `shown` names the graph in errors when it is given as bytes.
    """
    where = graph if isinstance(graph, Path) else shown
    try:
        data = graph.read_bytes() if isinstance(graph, Path) else graph
        return _external_refs(memoryview(data), "model")
    except ValueError as e:
        raise BundleError(f"{where}: not an ONNX model ({e})") from e


def _external_refs(message: memoryview, kind: str) -> list[ExternalRef]:
    if kind == "tensor":
        name, entries = "", {}
        for number, value in _protobuf_fields(message):
            if number == _TENSOR_NAME and isinstance(value, memoryview):
                name = _text(value)
            elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
                entry = dict(_protobuf_fields(value))
                key, text = entry.get(1), entry.get(2, memoryview(b""))
                if isinstance(key, memoryview) and isinstance(text, memoryview):
                    entries[_text(key)] = _text(text)
        if "location" not in entries:
            return []
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError as e:
            raise ValueError(f"tensor {name!r} has a bad external data offset or length") from e
        return [ExternalRef(name, entries["location"], offset, length)]
    found: list[ExternalRef] = []
    children = _ONNX_FIELDS.get(kind, {})
    for number, value in _protobuf_fields(message):
        if number in children and isinstance(value, memoryview):
            found.extend(_external_refs(value, children[number]))
    return found


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", errors="replace")


def _protobuf_fields(message: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field; a length-delimited value is its bytes, unparsed."""
    pos, end = 0, len(message)
    while pos < end:
        key, pos = _varint(message, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview = 0
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(message, pos)
            value = message[pos : pos + length]
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"malformed protobuf: wire type {wire} at byte {pos}")
        if pos > end or number == 0:
            raise ValueError(f"malformed protobuf: truncated field {number}")
        yield number, value


def _varint(message: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(message) and shift < 64:
        byte = message[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("malformed protobuf: truncated varint")


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
