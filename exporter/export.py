"""Checkpoint directory -> model bundle: ONNX graphs, tokenizer and manifest, parity-proven.

The graphs are made with the TorchScript exporter (`dynamo=False`). Measured here (torch 2.13,
onnxscript 0.7.2): it exports all four cells correctly with symbolic batch and time axes in well
under a second, while the dynamo exporter took about 5 s per graph and froze the time axis in the
output metadata (onnxruntime then warns on every run). Its one cost, a transposed copy of tied
weights, is undone by `share_tied_weights`.

Nothing is written until onnxruntime has matched PyTorch (`exporter.parity`); the bundle is then
written to a temporary directory beside the target, validated with the server's own loader, and
renamed into place.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from exporter.parity import ParityReport, check_parity
from server.bundle import FORMAT_VERSION, MANIFEST_FILE, BundleError, load_bundle, sha256_file
from training.checkpoint import Checkpoint, load_checkpoint
from training.model import RNNLM

OPSET = 17
STEP_FILE = "model.onnx"
SCORE_FILE = "score.onnx"
TOKENIZER_FILE = "tokenizer.json"


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


class ScoreGraph(nn.Module):
    """tokens, targets, *states -> log-prob of each target, *final states (the score graph)."""

    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, targets: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, final = self.model(tokens, state)
        logprobs = torch.log_softmax(logits, dim=-1)
        return (logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), *final)


def graph_io(model: RNNLM, graph: str) -> tuple[list[str], list[str]]:
    """The input and output names of a graph, in the order its `forward` takes and returns."""
    states = model.config.state_names
    state_in = [f"{s}0" for s in states]
    state_out = [f"{s}n" for s in states]
    if graph == "step":
        return ["tokens", *state_in], ["logits", "features", *state_out]
    return ["tokens", "targets", *state_in], ["target_logprobs", *state_out]


def export_graph(model: RNNLM, graph: str) -> bytes:
    """One graph as a self-contained ONNX model, with dynamic batch and time axes."""
    module: nn.Module = StepGraph(model) if graph == "step" else ScoreGraph(model)
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


def export_bundle(
    checkpoint_dir: str | Path,
    bundle_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    force: bool = False,
    score_graph: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> Path:
    """Export a checkpoint to a bundle directory and return its path.

    Raises `ExportError` (or the checkpoint's `CheckpointError`) with nothing written when the
    target exists and `force` is false, the checkpoint is bad, or parity fails.
    """
    target = Path(bundle_dir)
    if not version:
        raise ExportError("the version must not be empty")
    _check_target(target, force)
    ckpt = load_checkpoint(checkpoint_dir)
    model = ckpt.model.eval()
    graphs = ["step", "score"] if score_graph else ["step"]
    blobs = {graph: export_graph(model, graph) for graph in graphs}
    report = check_parity(model, blobs, rtol=rtol, atol=atol)
    if not report.passed:
        raise ExportError(
            f"onnxruntime does not match PyTorch: {report.failure} "
            f"(rtol {rtol}, atol {atol}); nothing was written"
        )
    manifest = build_manifest(
        ckpt, blobs, report, name=name or target.resolve().name, version=version
    )
    return _commit(target, ckpt, blobs, manifest, force)


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target}: exists and is not a directory")
    if target.exists() and not force:
        raise ExportError(f"{target}: already exists; pass --force to replace it")


def build_manifest(
    ckpt: Checkpoint, blobs: dict[str, bytes], report: ParityReport, *, name: str, version: str
) -> dict[str, Any]:
    """The manifest of docs/bundle.md, without the `files` hashes (added when written)."""
    c = ckpt.config
    prov = ckpt.provenance
    graph_files = {"step": STEP_FILE, "score": SCORE_FILE}
    graphs = {}
    for graph in blobs:
        inputs, outputs = graph_io(ckpt.model, graph)
        graphs[graph] = {"file": graph_files[graph], "inputs": inputs, "outputs": outputs}
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "architecture": {
            "cell": c.cell,
            "layers": c.layers,
            "hidden": c.hidden,
            "embedding": c.embedding,
            "vocab_size": c.vocab_size,
            "tied": c.tied,
            "residual": c.residual,
            "dropout": c.dropout,
        },
        "tokenizer": {
            "kind": ckpt.tokenizer_kind,
            "file": TOKENIZER_FILE,
            "special_tokens": {k: v for k, v in ckpt.special_tokens.items() if v is not None},
        },
        "precision": "fp32",
        "state": [
            {"name": s, "input": f"{s}0", "output": f"{s}n", "shape": [c.layers, "batch", c.hidden]}
            for s in c.state_names
        ],
        "graphs": graphs,
        "provenance": {
            "corpus_sha256": prov.get("corpus_sha256"),
            "tokens_seen": prov.get("tokens_seen"),
            "valid_perplexity": prov.get("valid_perplexity"),
            "test_perplexity": prov.get("test_perplexity"),
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "exporter": f"torch.onnx TorchScript, opset {OPSET}",
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": ort.__version__,
            "train_args": ckpt.train_args,
        },
        "parity": report.to_dict(),
    }


def _commit(
    target: Path,
    ckpt: Checkpoint,
    blobs: dict[str, bytes],
    manifest: dict[str, Any],
    force: bool,
) -> Path:
    """Write into a temporary directory beside `target`, validate it, then rename it in place."""
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old: Path | None = None
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the server's user
        files = {"step": STEP_FILE, "score": SCORE_FILE}
        for graph, blob in blobs.items():
            (staging / files[graph]).write_bytes(blob)
        shutil.copyfile(ckpt.tokenizer_path, staging / TOKENIZER_FILE)
        manifest["files"] = {
            f: sha256_file(staging / f)
            for f in sorted([files[g] for g in blobs] + [TOKENIZER_FILE])
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            bundle = load_bundle(staging)
            for graph in blobs:
                bundle.open_session(graph)
        except BundleError as e:
            raise ExportError(f"the written bundle does not pass the server's loader: {e}") from e
        _check_target(target, force)
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
