"""The model bundle contract: the one definition of what a bundle is.

The manifest's schema, the graph files and their input and output names, the state tensors, the
file hashes and every check a bundle must pass are defined here, and only here. The exporter
and the importers write bundles with `make_manifest` and `with_file_hashes`; the server reads
them with `load_manifest` and `read_files` (`server.bundle.load_bundle`), and checks each
onnxruntime session with `check_graph_io`. Standard library only: no torch, no onnx, no
onnxruntime, not even numpy, so every side can import it. docs/bundle.md describes the format.

Every file a manifest names is confined to the bundle directory: a plain file name, a regular
file once symbolic links are resolved, inside the bundle, read once through one descriptor. A
graph's external data files are listed by reading the ONNX protobuf directly (`external_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "weights.bin"  # the weights the graphs share (ONNX external data)
GRAPH_FILES = {"step": "model.onnx", "score": "score.onnx", "prefill": "prefill.onnx"}
BLOCKLIST_FILE = "blocklist.txt"  # optional: words never suggested, one a line (UTF-8)
LEXICON_FILE = "lexicon.txt"  # optional: the words char/BPE suggestions are drawn from
# Optional: a word model's words outside its vocabulary, with their counts (word<TAB>count).
UNKNOWN_WORDS_FILE = "unknown_words.txt"
GRAPH_KINDS = tuple(GRAPH_FILES)  # step is required; score and prefill are optional
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",), "rnn_tanh": ("h",), "rnn_relu": ("h",)}
TOKENIZER_KINDS = ("word", "char", "bpe")
# Precision of the weights -> the element type of the graphs' float inputs and outputs.
FLOAT_IO = {"fp32": "tensor(float)", "int8": "tensor(float)"}
INT_IO = "tensor(int64)"
MAX_MANIFEST_BYTES = 4 * 2**20
# A bundle's text files (its tokenizer and word lists) are parsed whole in memory: the bound
# refuses a manifest that names the wrong file (a corpus for its word list) before it is read.
# Graphs and their weights have none: a model's size is its own.
MAX_TEXT_FILE_BYTES = 256 * 2**20
QUOTE_CHARS = 60  # the most of a value from a bundle that an error message quotes
_HEX64 = re.compile("[0-9a-f]{64}")


class BundleError(Exception):
    """A bundle is missing, incomplete, tampered with or inconsistent; the message names a file."""


# -- names ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor `[layers, batch, hidden]`: its graph input and output names."""

    name: str
    input: str
    output: str
    layers: int
    hidden: int


def state_specs(cell: str, layers: int, hidden: int) -> tuple[StateSpec, ...]:
    """The state tensors of a cell, in the order the graphs take and return them."""
    return tuple(StateSpec(n, f"{n}0", f"{n}n", layers, hidden) for n in STATE_NAMES[cell])


def graph_io(graph: str, state: Sequence[StateSpec]) -> tuple[list[str], list[str]]:
    """The input and output names of graph `step`, `score` or `prefill`, in order: the data
    tensors first, then the state tensors in the order of `state`."""
    data_in = ["tokens", "targets"] if graph == "score" else ["tokens"]
    data_out = {"step": ["logits"], "score": ["target_logprobs"], "prefill": []}[graph]
    inputs = data_in + [s.input for s in state]
    return inputs, [*data_out, "features", *(s.output for s in state)]


def accepted_outputs(graph: str, state: Sequence[StateSpec]) -> list[list[str]]:
    """The output lists a manifest may give a graph: score graphs exported before the
    continuous cache have no `features`."""
    outputs = graph_io(graph, state)[1]
    if graph != "score":
        return [outputs]
    return [outputs, [o for o in outputs if o != "features"]]


def expected_io(
    graph: str, precision: str, state: Sequence[StateSpec], hidden: int, vocab_size: int
) -> dict[str, tuple[str, list[int | None]]]:
    """Each input and output name of a graph -> (element type, dims; None where dynamic)."""
    fp = FLOAT_IO[precision]
    io: dict[str, tuple[str, list[int | None]]] = {"tokens": (INT_IO, [None, None])}
    for s in state:
        io[s.input] = io[s.output] = (fp, [s.layers, None, s.hidden])
    io["features"] = (fp, [None, None, hidden])
    if graph == "step":
        io["logits"] = (fp, [None, None, vocab_size])
    elif graph == "score":
        io["targets"] = (INT_IO, [None, None])
        io["target_logprobs"] = (fp, [None, None])
    return io


# -- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    """One graph of a manifest: its file and its input and output names, in order."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the facts every reader of a bundle relies on, and the raw JSON
    (`data`) for the informative sections (provenance, parity, quantization, ...)."""

    path: Path
    data: dict[str, Any]
    name: str
    version: str
    cell: str
    layers: int
    hidden: int
    vocab_size: int
    precision: str
    tokenizer_kind: str
    tokenizer_file: str
    special_tokens: dict[str, int]
    eos_id: int
    state: tuple[StateSpec, ...]
    graphs: dict[str, GraphSpec]
    files: dict[str, str]  # file name -> sha256
    blocklist_file: str | None = None  # the optional `blocklist` section's file
    lexicon_file: str | None = None  # the optional `lexicon` section's file
    # The optional `unknown_words` section: its file, and how many <unk> tokens the model
    # learned from (the counts' denominator).
    unknown_words_file: str | None = None
    unk_tokens: int = 0

    def expected_io(self, graph: str) -> dict[str, tuple[str, list[int | None]]]:
        return expected_io(graph, self.precision, self.state, self.hidden, self.vocab_size)

    @property
    def text_files(self) -> frozenset[str]:
        """The files read as text: the tokenizer and the word lists."""
        named = (self.tokenizer_file, self.blocklist_file, self.lexicon_file)
        return frozenset(f for f in (*named, self.unknown_words_file) if f is not None)


def make_manifest(
    *,
    name: str,
    version: str,
    architecture: Mapping[str, Any],
    tokenizer_kind: str,
    special_tokens: Mapping[str, int],
    precision: str,
    graphs: Iterable[str],
    provenance: Mapping[str, Any],
    parity: Mapping[str, Any],
    sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest without its `files` (see `with_file_hashes`): the graph files, their input and
    output names and the state tensors follow from the architecture, so a writer names none.

    `architecture` has at least `cell`, `layers`, `hidden` and `vocab_size`; its other keys
    are informative. `sections` adds optional top-level sections (`continuous_cache`,
    `quantization`, ...).
    """
    layers, hidden = architecture["layers"], architecture["hidden"]
    state = state_specs(architecture["cell"], layers, hidden)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "architecture": dict(architecture),
        "tokenizer": {
            "kind": tokenizer_kind,
            "file": TOKENIZER_FILE,
            "special_tokens": dict(special_tokens),
        },
        "precision": precision,
        "state": [
            {
                "name": s.name,
                "input": s.input,
                "output": s.output,
                "shape": [layers, "batch", hidden],
            }
            for s in state
        ],
        "graphs": {},
        "provenance": dict(provenance),
        "parity": dict(parity),
    }
    for graph in graphs:
        inputs, outputs = graph_io(graph, state)
        manifest["graphs"][graph] = {
            "file": GRAPH_FILES[graph],
            "inputs": inputs,
            "outputs": outputs,
        }
    manifest.update(sections or {})
    return manifest


def with_file_hashes(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    """`manifest` with the sha256 of every file of the bundle, validated against the contract
    (so a writer learns of a schema error before anything is written)."""
    complete = {**manifest, "files": {f: sha256_bytes(files[f]) for f in sorted(files)}}
    parse_manifest(complete, Path(MANIFEST_FILE))
    return complete


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


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """The validated manifest of a bundle directory (no other file is read)."""
    directory = Path(bundle_dir)
    return parse_manifest(read_manifest(directory), directory / MANIFEST_FILE)


def parse_manifest(m: dict[str, Any], path: Path) -> Manifest:
    """Validate a manifest's fields, types and cross-references; errors name `path`."""
    r = _Reader(path)
    fmt = r.get(m, "format_version", int)
    if fmt != FORMAT_VERSION:
        raise r.fail(f"format_version {fmt} is not supported (expected {FORMAT_VERSION})")
    name, version = r.text(m, "name"), r.text(m, "version")
    arch = r.get(m, "architecture", dict)
    cell: str = r.get(arch, "cell", str, "architecture.")
    if cell not in CELLS:
        raise r.fail(f"architecture.cell must be one of {', '.join(CELLS)}, not {quote(cell)}")
    layers = r.positive(arch, "layers", "architecture.")
    hidden = r.positive(arch, "hidden", "architecture.")
    vocab_size = r.positive(arch, "vocab_size", "architecture.")
    precision: str = r.get(m, "precision", str)
    if precision not in FLOAT_IO:
        raise r.fail(f"precision must be one of {', '.join(FLOAT_IO)}, not {quote(precision)}")
    r.get(m, "provenance", dict)
    r.get(m, "parity", dict)
    files = _read_files_section(r, m)
    state = _read_state(r, m, cell, layers, hidden)
    graphs = _read_graphs(r, m, state, files)
    tokenizer_kind, tokenizer_file, special = _read_tokenizer(r, m, vocab_size, files)
    if "continuous_cache" in m:
        r.get(m, "continuous_cache", dict)  # its settings are the server's to read
    blocklist_file = None
    if "blocklist" in m:
        blocklist = r.get(m, "blocklist", dict)
        blocklist_file = r.file_name(blocklist, "file", "blocklist.", files)
    lexicon_file = None
    if "lexicon" in m:
        lexicon_file = r.file_name(r.get(m, "lexicon", dict), "file", "lexicon.", files)
    unknown_words_file, unk_tokens = None, 0
    if "unknown_words" in m:
        unknown = r.get(m, "unknown_words", dict)
        unknown_words_file = r.file_name(unknown, "file", "unknown_words.", files)
        unk_tokens = r.positive(unknown, "unk_tokens", "unknown_words.")
    return Manifest(
        path=path,
        data=m,
        name=name,
        version=version,
        cell=cell,
        layers=layers,
        hidden=hidden,
        vocab_size=vocab_size,
        precision=precision,
        tokenizer_kind=tokenizer_kind,
        tokenizer_file=tokenizer_file,
        special_tokens=special,
        eos_id=special["eos"],
        state=state,
        graphs=graphs,
        files=files,
        blocklist_file=blocklist_file,
        lexicon_file=lexicon_file,
        unknown_words_file=unknown_words_file,
        unk_tokens=unk_tokens,
    )


def add_blocklist(bundle_dir: str | Path, words: str) -> None:
    """Write `words` (one a line) as the bundle's blocklist and list it in the manifest."""
    _add_word_file(Path(bundle_dir), "blocklist", BLOCKLIST_FILE, words)


def add_lexicon(bundle_dir: str | Path, words: str) -> None:
    """Write `words` (one a line) as the bundle's lexicon and list it in the manifest."""
    _add_word_file(Path(bundle_dir), "lexicon", LEXICON_FILE, words)


def add_unknown_words(bundle_dir: str | Path, words: str, unk_tokens: int) -> None:
    """Write `words` (word<TAB>count a line) as the bundle's unknown words, `unk_tokens` the
    <unk> tokens its model learned from, and list them in the manifest."""
    extra = {"unk_tokens": unk_tokens}
    _add_word_file(Path(bundle_dir), "unknown_words", UNKNOWN_WORDS_FILE, words, extra)


def _add_word_file(
    directory: Path, section: str, name: str, words: str, extra: dict[str, Any] | None = None
) -> None:
    manifest = read_manifest(directory)
    data = words.encode("utf-8")
    files = {**manifest.get("files", {}), name: sha256_bytes(data)}
    complete = {**manifest, section: {"file": name, **(extra or {})}, "files": files}
    parse_manifest(complete, directory / MANIFEST_FILE)
    (directory / name).write_bytes(data)
    (directory / MANIFEST_FILE).write_text(json.dumps(complete, indent=2) + "\n", "utf-8")


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

    def text(self, obj: dict[str, Any], key: str) -> str:
        value: str = self.get(obj, key, str)
        if not value:
            raise self.fail(f"field {key!r} must not be empty")
        return value

    def positive(self, obj: dict[str, Any], key: str, where: str) -> int:
        value: int = self.get(obj, key, int, where)
        if value < 1:
            raise self.fail(f"field {where}{key!r} must be at least 1, not {value}")
        return value

    def file_name(self, obj: dict[str, Any], key: str, where: str, files: dict[str, str]) -> str:
        """A field naming a file of the bundle, which `files` must list."""
        name: str = self.get(obj, key, str, where)
        if file_name_problem(name) is not None:
            raise self.fail(
                f"field {where}{key!r} must be a file name in the bundle, not {quote(name)}"
            )
        if name not in files:
            raise self.fail(f"{where}{key} {quote(name)} has no sha256 in 'files'")
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


def _read_files_section(r: _Reader, m: dict[str, Any]) -> dict[str, str]:
    files: dict[str, Any] = r.get(m, "files", dict)
    for file, digest in files.items():
        problem = file_name_problem(file)
        if problem is not None:
            raise r.fail(f"'files' names {quote(file)}, which {problem}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise r.fail(f"files[{quote(file)}] must be a sha256 hex digest, not {quote(digest)}")
    return dict(files)


def _read_state(
    r: _Reader, m: dict[str, Any], cell: str, layers: int, hidden: int
) -> tuple[StateSpec, ...]:
    entries: list[Any] = r.get(m, "state", list)
    expected = len(STATE_NAMES[cell])
    if len(entries) != expected:
        raise r.fail(f"state lists {len(entries)} tensors; a {cell} has {expected}")
    specs = []
    for i, entry in enumerate(entries):
        where = f"state[{i}]."
        if not isinstance(entry, dict):
            raise r.fail(f"state[{i}] must be an object, not {quote(entry)}")
        shape = r.get(entry, "shape", list, where)
        if len(shape) != 3 or shape[0] != layers or shape[2] != hidden:
            raise r.fail(
                f"{where}shape {quote(shape)} does not match the architecture "
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


def _read_graphs(
    r: _Reader, m: dict[str, Any], state: tuple[StateSpec, ...], files: dict[str, str]
) -> dict[str, GraphSpec]:
    graphs = r.get(m, "graphs", dict)
    specs = {}
    for kind in GRAPH_KINDS:
        if kind == "step" or kind in graphs:
            where = f"graphs.{kind}."
            spec = r.get(graphs, kind, dict, "graphs.")
            file = r.file_name(spec, "file", where, files)
            inputs = r.names(spec, "inputs", where)
            outputs = r.names(spec, "outputs", where)
            want_in, want_out = graph_io(kind, state)
            if inputs != want_in:
                raise r.fail(f"{where}inputs {quote(inputs)} must be {want_in}")
            if outputs not in accepted_outputs(kind, state):
                raise r.fail(f"{where}outputs {quote(outputs, 200)} must be {want_out}")
            specs[kind] = GraphSpec(file, tuple(inputs), tuple(outputs))
    unknown = sorted(set(graphs) - set(GRAPH_KINDS))
    if unknown:
        raise r.fail(
            f"graphs has unknown entries {quote(unknown)}; known: {', '.join(GRAPH_KINDS)}"
        )
    return specs


def _read_tokenizer(
    r: _Reader, m: dict[str, Any], vocab_size: int, files: dict[str, str]
) -> tuple[str, str, dict[str, int]]:
    tok = r.get(m, "tokenizer", dict)
    kind: str = r.get(tok, "kind", str, "tokenizer.")
    if kind not in TOKENIZER_KINDS:
        raise r.fail(
            f"tokenizer.kind must be one of {', '.join(TOKENIZER_KINDS)}, not {quote(kind)}"
        )
    file = r.file_name(tok, "file", "tokenizer.", files)
    special: dict[str, Any] = r.get(tok, "special_tokens", dict, "tokenizer.")
    for key, value in special.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise r.fail(
                f"tokenizer.special_tokens.{key[:QUOTE_CHARS]} must be a token id below vocab_size "
                f"{vocab_size}, not {quote(value)}"
            )
    r.get(special, "eos", int, "tokenizer.special_tokens.")
    return kind, file, dict(special)


# -- the files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleBytes:
    """The verified bytes of every file a manifest lists, and the external data files (ONNX
    external data) its graphs reference."""

    contents: dict[str, bytes]
    external: tuple[str, ...]


def read_files(directory: Path, manifest: Manifest) -> BundleBytes:
    """Read every listed file once and check it against its sha256, then check that each
    graph's external data is a hashed file of the bundle with every tensor's bytes inside it.

    Every name is confined to the bundle (`member_path`) before any file is opened.
    """
    paths = {file: member_path(directory, file) for file in manifest.files}
    contents = {}
    texts = manifest.text_files
    for file, digest in manifest.files.items():
        data = read_member(paths[file], MAX_TEXT_FILE_BYTES if file in texts else None)
        actual = sha256_bytes(data)
        if actual != digest:
            raise BundleError(
                f"{directory / file}: sha256 {actual} does not match the manifest's {digest}; "
                "the file was changed or damaged after export"
            )
        contents[file] = data
    external: set[str] = set()
    for spec in manifest.graphs.values():
        external |= _check_external_data(directory / spec.file, contents)
    return BundleBytes(contents, tuple(sorted(external)))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`value` quoted for an error message: `repr` of at most `limit` characters (or bytes) of
    it, the rest summarised. The one rule for quoting what a bundle or a request holds."""
    if isinstance(value, str | bytes) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
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


def member_path(
    directory: Path, name: str, missing: str = f"listed in {MANIFEST_FILE}", kind: str = "bundle"
) -> Path:
    """Where file `name` of a bundle (or other `kind` of directory: a model repository) really
    is, once known to be a regular file inside it.

    Refused, with one line and before anything is opened: a name that is not a plain file name
    (an absolute path, `..`, a subdirectory), a symbolic link that leads out of the directory, a
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
        raise BundleError(f"{path}: a symbolic link out of the {kind}; {kind} files must be in it")
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise BundleError(f"{path}: missing ({missing})") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{path}: not a regular file; {kind} files must be regular files")
    return real


def read_member(path: Path, limit: int | None = None, kind: str = "bundle") -> bytes:
    """The bytes of a regular file (of a bundle, or other `kind` of directory), read through one
    descriptor that follows no symbolic link: exactly the size it had when opened, so a file
    that keeps growing is never read forever, and never more than `limit` bytes."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BundleError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path}: not a regular file; {kind} files must be regular files")
        if limit is not None and info.st_size > limit:
            raise BundleError(f"{path}: {info.st_size} bytes, more than the {limit} allowed")
        data = f.read(info.st_size)
    if len(data) != info.st_size:
        raise BundleError(f"{path}: shrank while it was read ({len(data)} of {info.st_size} bytes)")
    return data


# -- graphs: external data, and the inputs and outputs onnxruntime reports --------------------


def check_graph_io(
    path: Path, graph: str, manifest: Manifest, inputs: Sequence[Any], outputs: Sequence[Any]
) -> None:
    """Hold a loaded graph's inputs and outputs (onnxruntime's `NodeArg`s: `name`, `type`,
    `shape`) to the manifest: names in order, element types, ranks, and every fixed dimension
    (`layers` and `hidden` of the states, `V` of `logits`, `H` of `features`)."""
    spec = manifest.graphs[graph]
    expected = manifest.expected_io(graph)
    for kind, names, args in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        actual = [a.name for a in args]
        if actual != list(names):
            raise BundleError(
                f"{path}: graph {kind} {quote(actual, 200)} do not match the manifest's "
                f"{list(names)}"
            )
        for arg in args:
            _check_arg(path, arg, *expected[arg.name])


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
        return _tensor_ref(message)
    found: list[ExternalRef] = []
    children = _ONNX_FIELDS.get(kind, {})
    for number, value in _protobuf_fields(message):
        if number in children and isinstance(value, memoryview):
            found.extend(_external_refs(value, children[number]))
    return found


def _tensor_ref(message: memoryview) -> list[ExternalRef]:
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
        raise ValueError(f"tensor {quote(name)} has a bad external data offset or length") from e
    return [ExternalRef(name, entries["location"], offset, length)]


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
