"""Checkpoint directory -> model bundle: ONNX graphs, tokenizer and manifest, parity-proven.

The graphs are made with the TorchScript exporter (`dynamo=False`). Measured here (torch 2.13,
onnxscript 0.7.2): it exports all four cells correctly with symbolic batch and time axes in well
under a second, while the dynamo exporter took about 5 s per graph and froze the time axis in the
output metadata (onnxruntime then warns on every run). Its one cost, a transposed copy of tied
weights, is undone by `share_tied_weights`.

Nothing is written until onnxruntime has matched PyTorch (`exporter.parity`) and, for an int8
bundle, the quantized graphs have passed the quality check (`exporter.quantize`). The weights
both graphs hold are written once, as ONNX external data in `weights.bin` that both graphs
point into (`share_weights`). The manifest, graph names and state tensors are the bundle
contract's (`rnnlm.bundle`); `write_bundle` writes the bundle into a temporary directory beside
the target, validates it with the server's own loader, and renames it into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import warnings
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from tokenizers import Tokenizer
from torch import Tensor, nn

from exporter.parity import ParityReport, check_parity
from exporter.quantize import (
    EVAL_CHUNK,
    EvaluationText,
    QuantizationError,
    activation_fields,
    evaluation_text,
    measure_quality,
    quantize_graph,
    worst_change,
)
from exporter.unknown_words import UnknownWordsError, unknown_words_of
from rnnlm.bundle import (
    BLOCKLIST_FILE,
    GRAPH_FILES,
    LEXICON_FILE,
    MANIFEST_FILE,
    STATE_NAMES,
    TOKENIZER_FILE,
    UNKNOWN_WORDS_FILE,
    WEIGHTS_FILE,
    make_manifest,
    state_specs,
    with_file_hashes,
)
from rnnlm.bundle import graph_io as contract_graph_io
from server.bundle import BundleError, load_bundle
from training.checkpoint import Checkpoint, load_checkpoint
from training.model import RNNLM, ModelConfig

OPSET = 17
QUANTIZATIONS = ("int8",)
# Shared tensors smaller than this stay inline (as onnx's own external-data writer does).
EXTERNAL_MIN_BYTES = 1024
# Offsets of tensors in weights.bin are multiples of the page size, so they can be mapped.
EXTERNAL_ALIGNMENT = 4096
TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                      "uint64_data")  # fmt: skip


class ExportError(Exception):
    """The export cannot proceed or did not prove parity; nothing has been written."""


class StepGraph(nn.Module):
    """tokens, *states -> logits, features, *final states (the bundle's step graph)."""

    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        features, final = self.model.features(tokens, state)
        return (self.model.logits(features), features, *final)


class PrefillGraph(nn.Module):
    """tokens, *states -> features, *final states: the step graph without its output layer,
    for prompt and context chunks whose logits nobody reads (and for embeddings). The output
    layer is most of a step's work (a `[T, H] x [H, V]` product): a 128-token chunk of the
    default model takes 2.0 ms instead of 5.2."""

    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        features, final = self.model.features(tokens, state)
        return (features, *final)


class ScoreGraph(nn.Module):
    """tokens, targets, *states -> log-prob of each target, features, *final states (the score
    graph; the features are what a continuous cache recalls by)."""

    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, targets: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        features, final = self.model.features(tokens, state)
        logprobs = torch.log_softmax(self.model.logits(features), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (picked, features, *final)


GRAPH_MODULES: dict[str, type[nn.Module]] = {
    "step": StepGraph, "prefill": PrefillGraph, "score": ScoreGraph
}  # fmt: skip


def graph_io(model: RNNLM, graph: str) -> tuple[list[str], list[str]]:
    """The input and output names of a graph (the bundle contract's), in the order its
    `forward` takes and returns them."""
    c = model.config
    if c.state_names != STATE_NAMES[c.cell]:  # the model's state order is the contract's
        raise ExportError(f"a {c.cell} model's states {c.state_names} are not the bundle's")
    return contract_graph_io(graph, state_specs(c.cell, c.layers, c.hidden))


def export_graph(model: RNNLM, graph: str) -> bytes:
    """One graph as a self-contained ONNX model, with dynamic batch and time axes."""
    module: nn.Module = GRAPH_MODULES[graph](model)
    inputs, outputs = graph_io(model, graph)
    # Batch and time >= 2 in the example, so no axis can be specialised to 1.
    batch, time = 2, 3
    example: list[Tensor] = [torch.zeros(batch, time, dtype=torch.long)]
    if graph == "score":
        example.append(torch.zeros(batch, time, dtype=torch.long))
    example.extend(model.initial_state(batch))
    axes: dict[str, dict[int, str]] = {}
    for name in inputs[: len(example) - len(model.config.state_names)]:
        axes[name] = {0: "batch", 1: "time"}
    for name in outputs[: len(outputs) - len(model.config.state_names)]:
        axes[name] = {0: "batch", 1: "time"}
    for name in inputs + outputs:
        axes.setdefault(name, {1: "batch"})
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated; the choice is deliberate (see module docstring).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    if model.config.tied:
        share_tied_weights(proto)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def share_tied_weights(proto: onnx.ModelProto) -> None:
    """Replace each initializer that is the transpose of another by a Transpose node.

    The TorchScript exporter folds the tied decoder weight into a transposed copy of the
    embedding, doubling the largest tensor in the file; onnxruntime folds the Transpose back
    when it creates the session, so the file stays small and the runtime graph is unchanged.
    """
    graph = proto.graph
    matrices = {
        init.name: numpy_helper.to_array(init) for init in graph.initializer if len(init.dims) == 2
    }
    replaced: dict[str, str] = {}  # transposed copy -> the initializer it is made from
    for name, array in matrices.items():
        for source, other in matrices.items():
            if (
                source != name
                and source not in replaced
                and name not in replaced.values()
                and other.shape == array.shape[::-1]
                and np.array_equal(other.T, array)
            ):
                replaced[name] = source
                break
    if not replaced:
        return
    kept = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name, source in replaced.items():
        graph.node.insert(0, helper.make_node("Transpose", [source], [name], perm=[1, 0]))


def align_transposed_weights(blobs: dict[str, bytes]) -> None:
    """Store each weight in the layout the step graph stores it in, so graphs share it.

    With tied weights the step graph keeps the output layer's `[H, V]` matrix and makes the
    embedding from it (`share_tied_weights`); a graph without the output layer (prefill) has
    the embedding as its own `[V, H]` initializer, the same numbers transposed, which
    `share_weights` (by content) would write a second time. Such an initializer becomes a
    Transpose of a copy in the step graph's layout, folded away again by onnxruntime.
    """
    step = onnx.load_from_string(blobs["step"])
    layouts = {
        numpy_helper.to_array(t).tobytes() for t in step.graph.initializer if len(t.dims) == 2
    }
    for graph, blob in blobs.items():
        if graph == "step":
            continue
        proto = onnx.load_from_string(blob)
        changed = False
        for tensor in proto.graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.ndim != 2 or array.tobytes() in layouts:
                continue
            stored = np.ascontiguousarray(array.T)
            if stored.tobytes() not in layouts:
                continue
            source = _unused_name(proto.graph, f"{tensor.name}.T")
            proto.graph.node.insert(
                0, helper.make_node("Transpose", [source], [tensor.name], perm=[1, 0])
            )
            tensor.CopyFrom(numpy_helper.from_array(stored, source))
            changed = True
        if changed:
            onnx.checker.check_model(proto)
            blobs[graph] = proto.SerializeToString()


def _unused_name(graph: onnx.GraphProto, name: str) -> str:
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {o for node in graph.node for o in node.output}
    while name in taken:
        name += "_"
    return name


def share_weights(graphs: dict[str, onnx.ModelProto]) -> bytes | None:
    """Move every initializer held more than once (by content) into one external-data blob.

    Each such tensor is written once; every initializer with that content, in any graph, is
    pointed at the same offset and length of `WEIGHTS_FILE`. The rest stays inline. Returns the
    blob, or None when nothing is shared (then every graph stays self-contained).
    """

    def content(tensor: onnx.TensorProto) -> tuple[int, tuple[int, ...], bytes]:
        return (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())

    keys: dict[tuple[str, int], str] = {}  # (graph, initializer index) -> content key
    raw: dict[str, bytes] = {}
    for graph, proto in graphs.items():
        for index, tensor in enumerate(proto.graph.initializer):
            if tensor.data_type == onnx.TensorProto.STRING:
                continue
            kind, dims, data = content(tensor)
            if len(data) >= EXTERNAL_MIN_BYTES:
                key = hashlib.sha256(repr((kind, dims)).encode() + data).hexdigest()
                keys[graph, index] = key
                raw.setdefault(key, data)
    seen = Counter(keys.values())
    blob = bytearray()
    offsets: dict[str, int] = {}
    for (graph, index), key in keys.items():
        if seen[key] < 2:
            continue
        tensor = graphs[graph].graph.initializer[index]
        if key not in offsets:
            blob.extend(bytes(-len(blob) % EXTERNAL_ALIGNMENT))
            offsets[key] = len(blob)
            blob.extend(raw[key])
        for field in (*TENSOR_DATA_FIELDS, "external_data"):
            tensor.ClearField(field)
        for k, v in (("location", WEIGHTS_FILE), ("offset", offsets[key]),
                     ("length", len(raw[key]))):  # fmt: skip
            tensor.external_data.add(key=k, value=str(v))
        tensor.data_location = onnx.TensorProto.EXTERNAL
    return bytes(blob) if offsets else None


def bundle_files(blobs: dict[str, bytes]) -> dict[str, bytes]:
    """The graph files (and `WEIGHTS_FILE` when the graphs share weights) by file name."""
    protos = {graph: onnx.load_from_string(blob) for graph, blob in blobs.items()}
    weights = share_weights(protos)
    files = {GRAPH_FILES[graph]: proto.SerializeToString() for graph, proto in protos.items()}
    if weights is not None:
        files[WEIGHTS_FILE] = weights
    return files


def export_bundle(
    checkpoint_dir: str | Path,
    bundle_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    force: bool = False,
    score_graph: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    quantize: str | None = None,
    calibration_text: str | Path | None = None,
    max_perplexity_change: float = 1.0,
    per_channel: bool = False,
    per_tensor_activations: bool = False,
    blocklist: str | None = None,
    lexicon: str | None = None,
    unknown_words: str | None = None,
) -> Path:
    """Export a checkpoint to a bundle directory and return its path.

    `quantize="int8"` writes an int8 bundle, measured on held-out text
    (`calibration_text`, else the checkpoint's validation split) and refused when any graph's
    perplexity moves more than `max_perplexity_change` percent. `per_channel` quantizes weights
    with a scale per output channel instead of per tensor, and `per_tensor_activations` keeps
    onnxruntime's run-wide activation scales, whose results depend on the batch (see
    `exporter.quantize`).
    `blocklist` (words never suggested, one a line) is written as the bundle's `blocklist.txt`,
    with the other files, hashed and validated with them; `lexicon` (the words a character or
    BPE model's searched suggestions are drawn from, one a line) likewise as `lexicon.txt`;
    `unknown_words` (a word model's training text) as `unknown_words.txt`, the words the model
    learned as `<unk>` with their counts (exporter/unknown_words.py).

    Raises `ExportError` (or the checkpoint's `CheckpointError`) with nothing written when the
    target exists and `force` is false, the checkpoint is bad, parity fails, or the int8 bundle
    cannot be measured or is refused.
    """
    target = Path(bundle_dir)
    _check_options(
        version,
        quantize,
        calibration_text,
        {"--per-channel": per_channel, "--per-tensor-activations": per_tensor_activations},
        max_perplexity_change,
        rtol,
        atol,
    )
    check_target(target, force)
    ckpt = load_checkpoint(checkpoint_dir)
    model = ckpt.model.eval()
    # Before any graph is made: a missing text is the quickest failure.
    held_out = _held_out_text(ckpt, calibration_text) if quantize is not None else None
    unknown = None if unknown_words is None else _unknown_words(ckpt, unknown_words)
    blobs, report = _parity_checked_graphs(model, score_graph, rtol, atol)
    quantization = None
    if held_out is not None:
        blobs, quantization = _quantize(
            ckpt, blobs, held_out, max_perplexity_change, per_channel, per_tensor_activations
        )
    manifest = build_manifest(
        ckpt,
        blobs,
        report,
        name=name or target.resolve().name,
        version=version,
        quantization=quantization,
        blocklist=blocklist is not None,
        lexicon=lexicon is not None,
        unk_tokens=None if unknown is None else unknown[1],
    )
    files = {**bundle_files(blobs), TOKENIZER_FILE: ckpt.tokenizer_path.read_bytes()}
    if unknown is not None:
        files[UNKNOWN_WORDS_FILE] = unknown[0].encode("utf-8")
    if blocklist is not None:
        files[BLOCKLIST_FILE] = blocklist.encode("utf-8")
    if lexicon is not None:
        files[LEXICON_FILE] = lexicon.encode("utf-8")
    return write_bundle(target, files, manifest, force=force)


def _parity_checked_graphs(
    model: RNNLM, score_graph: bool, rtol: float, atol: float
) -> tuple[dict[str, bytes], ParityReport]:
    """The fp32 graphs by name, once onnxruntime has matched PyTorch on them (else
    `ExportError`), and the parity report."""
    graphs = ["step", "prefill", "score"] if score_graph else ["step", "prefill"]
    blobs = {graph: export_graph(model, graph) for graph in graphs}
    align_transposed_weights(blobs)
    report = check_parity(model, blobs, rtol=rtol, atol=atol)
    if not report.passed:
        raise ExportError(
            f"onnxruntime does not match PyTorch: {report.failure} "
            f"(rtol {rtol}, atol {atol}; --parity-rtol and --parity-atol set them); nothing "
            "was written"
        )
    return blobs, report


def check_version_and_gate(version: str | None, max_perplexity_change: float) -> None:
    """Refuse an empty version (None: the command's default, which is not) and a perplexity
    gate that is not a percentage >= 0 (the export's and `rnnlm int8-rows`' options)."""
    if version is not None and not version:
        raise ExportError("the version must not be empty")
    if not max_perplexity_change >= 0:  # NaN fails too
        raise ExportError(
            f"--max-perplexity-change must be a percentage >= 0, not {max_perplexity_change}"
        )


def _check_options(
    version: str,
    quantize: str | None,
    calibration_text: str | Path | None,
    int8_flags: dict[str, bool],
    max_perplexity_change: float,
    rtol: float,
    atol: float,
) -> None:
    """Refuse export options that cannot be honoured, before anything is loaded."""
    check_version_and_gate(version, max_perplexity_change)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, not {quantize!r}")
    given = [flag for flag, on in int8_flags.items() if on]
    if quantize is None and (calibration_text is not None or given):
        option = "--calibration-text" if calibration_text is not None else given[0]
        raise ExportError(f"{option} is only used with --quantize int8")
    for flag, value in (("--parity-rtol", rtol), ("--parity-atol", atol)):
        if not 0 <= value < 1:  # NaN fails too; 1 or more would pass any output
            raise ExportError(f"{flag} must be >= 0 and < 1, not {value}")


def _unknown_words(ckpt: Checkpoint, text: str) -> tuple[str, int]:
    """The unknown-words file of a word model's training text, and its `<unk>` tokens."""
    if ckpt.tokenizer_kind != "word":
        raise ExportError(
            f"--unknown-words is for word models; this checkpoint's tokenizer is "
            f"{ckpt.tokenizer_kind!r}; nothing was written"
        )
    specials = {k: v for k, v in ckpt.special_tokens.items() if v is not None}
    unk_replace = float(ckpt.train_args.get("unk_replace") or 0.0)
    tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_path))
    try:
        return unknown_words_of(tokenizer, specials, text, unk_replace)
    except UnknownWordsError as e:
        raise ExportError(f"--unknown-words: {e}; nothing was written") from e


def _held_out_text(ckpt: Checkpoint, calibration_text: str | Path | None) -> EvaluationText:
    """The text an int8 bundle is measured on (`evaluation_text`), its errors as ExportError."""
    eos = ckpt.special_tokens.get("eos")
    if eos is None:
        raise ExportError(f"{ckpt.path / 'config.json'}: the tokenizer has no eos token id")
    try:
        return evaluation_text(ckpt, calibration_text, eos)
    except QuantizationError as e:
        raise ExportError(f"{e}; nothing was written") from e


def _quantize(
    ckpt: Checkpoint,
    blobs: dict[str, bytes],
    held_out: EvaluationText,
    max_change: float,
    per_channel: bool,
    per_tensor_activations: bool,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The int8 graphs and the manifest's `quantization` section, or `ExportError` if refused."""
    c = ckpt.config
    int8, ops = {}, {}
    for graph, blob in blobs.items():
        int8[graph], ops[graph] = quantize_graph(blob, c.cell, per_channel, per_tensor_activations)
    shapes = [(c.layers, c.hidden)] * len(c.state_names)
    quality = measure_quality(blobs, int8, held_out.ids, shapes)
    text = held_out.record
    if worst_change(quality) > max_change:
        hint = "" if per_channel else " (--per-channel may lose less)"
        raise ExportError(
            f"the int8 bundle is refused: perplexity moves {worst_change(quality):.4g}% (fp32 "
            f"{quality['fp32_perplexity']:.6g} -> int8 {quality['int8_perplexity']:.6g} on "
            f"{text['tokens']} tokens of {text['file']}), more than --max-perplexity-change "
            f"{max_change:g}%{hint}; nothing was written"
        )
    section = {
        "method": "onnxruntime.quantization.quantize_dynamic after quant_pre_process "
        "(ORT_ENABLE_BASIC folding)",
        "weights": "int8, symmetric (the embedding table: uint8, asymmetric)",
        **activation_fields(per_tensor_activations),
        "per_channel": per_channel,
        "ops": ops,
        "quality": {
            "text": text,
            "batch": 1,
            "chunk": EVAL_CHUNK,
            **quality,
            "max_perplexity_change_percent": max_change,
        },
    }
    return int8, section


def check_target(target: Path, force: bool) -> None:
    """`ExportError` unless `target` can be written: absent, or a directory and `force`."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target}: exists and is not a directory")
    if target.exists() and not force:
        raise ExportError(f"{target}: already exists; pass --force to replace it")


def core_architecture(c: ModelConfig) -> dict[str, Any]:
    """The manifest's architecture keys every bundle records, exported or imported."""
    return {
        "cell": c.cell,
        "layers": c.layers,
        "hidden": c.hidden,
        "embedding": c.embedding,
        "vocab_size": c.vocab_size,
        "tied": c.tied,
    }


def toolchain(exporter: str | None = None) -> dict[str, str]:
    """The provenance's record of how the graphs were made (by default `torch.onnx`, as
    `rnnlm export` makes them) and the versions of torch, onnx and onnxruntime."""
    return {
        "exporter": exporter or f"torch.onnx TorchScript, opset {OPSET}",
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
    }


def build_manifest(
    ckpt: Checkpoint,
    blobs: dict[str, bytes],
    report: ParityReport,
    *,
    name: str,
    version: str,
    quantization: dict[str, Any] | None = None,
    blocklist: bool = False,
    lexicon: bool = False,
    unk_tokens: int | None = None,
) -> dict[str, Any]:
    """The manifest of docs/bundle.md, without the `files` hashes (added when written);
    `blocklist`, `lexicon`: the bundle has a `blocklist.txt`, a `lexicon.txt`; `unk_tokens`:
    it has an `unknown_words.txt` of that many `<unk>` tokens."""
    c = ckpt.config
    prov = ckpt.provenance
    parity = report.to_dict()
    if quantization is not None:
        parity["applies_to"] = (
            "the fp32 graphs the int8 graphs were quantized from; the int8 graphs are held to "
            "quantization.quality instead"
        )
    return make_manifest(
        name=name,
        version=version,
        architecture={
            **core_architecture(c),
            "residual": c.residual,
            "dropout": c.dropout,
            "adaptive_cutoffs": list(c.adaptive_cutoffs),
            "adaptive_div": c.adaptive_div,
        },
        tokenizer_kind=ckpt.tokenizer_kind,
        special_tokens={k: v for k, v in ckpt.special_tokens.items() if v is not None},
        precision="fp32" if quantization is None else "int8",
        graphs=list(blobs),
        provenance={
            "corpus_sha256": prov.get("corpus_sha256"),
            "tokens_seen": prov.get("tokens_seen"),
            # Each text as one document from eos, as Score reads it (docs/training.md, "Losses");
            # a checkpoint from before that measure has only the figures in eval streams.
            "valid_perplexity": (
                prov.get("valid_document_perplexity") or prov.get("valid_perplexity")
            ),
            "test_perplexity": prov.get("test_document_perplexity") or prov.get("test_perplexity"),
            "valid_perplexity_in_streams": prov.get("valid_perplexity"),
            "test_perplexity_in_streams": prov.get("test_perplexity"),
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **toolchain(),
            "train_args": ckpt.train_args,
        },
        parity=parity,
        sections={
            key: value
            for key, value in (
                ("continuous_cache", ckpt.continuous_cache),
                ("quantization", quantization),
                ("blocklist", {"file": BLOCKLIST_FILE} if blocklist else None),
                ("lexicon", {"file": LEXICON_FILE} if lexicon else None),
                (
                    "unknown_words",
                    None
                    if unk_tokens is None
                    else {"file": UNKNOWN_WORDS_FILE, "unk_tokens": unk_tokens},
                ),
            )
            if value is not None
        },
    )


def write_bundle(
    target: Path, files: dict[str, bytes], manifest: dict[str, Any], *, force: bool = False
) -> Path:
    """Write a bundle and return its path: `files` by file name (graphs, `weights.bin`, the
    tokenizer) and `manifest` (`rnnlm.bundle.make_manifest`; the file hashes are added here).

    The manifest is held to the bundle contract before anything is written; the files go into
    a temporary directory beside `target`, are validated by the server's own loader (every
    graph opened in onnxruntime), and are renamed into place. On any failure nothing is left
    behind. An existing `target` is replaced only with `force`. Importers write through this.
    """
    try:
        manifest = with_file_hashes(manifest, files)
    except BundleError as e:
        raise ExportError(f"the manifest does not follow the bundle contract: {e}") from e
    check_target(target, force)
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old: Path | None = None
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the server's user
        for file, data in files.items():
            (staging / file).write_bytes(data)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            bundle = load_bundle(staging)
            for graph in manifest["graphs"]:
                bundle.open_session(graph)
        except BundleError as e:
            raise ExportError(f"the written bundle does not pass the server's loader: {e}") from e
        check_target(target, force)
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            old.rmdir()
            target.rename(old)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not target.exists():
            old.rename(target)
            old = None
        for parent in created:
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
