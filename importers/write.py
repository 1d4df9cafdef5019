"""An imported model -> a bundle: parity against the source, test perplexity, manifest, commit.

Every importer hands over an `Imported`: the bundle's ONNX graphs, the source as a parity
`Reference`, the tokenizer and where the model came from. Nothing is written until the graphs
have matched the source on random and real inputs (`importers.parity`); the manifest is built
and the bundle committed by `rnnlm export`'s own functions, so an imported bundle is validated
by the server's loader exactly as an exported one is.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from tokenizers import Tokenizer

from exporter.export import (
    ExportError,
    _check_target,
    build_manifest,
    bundle_files,
    write_bundle,
)
from exporter.parity import ParityReport
from importers.errors import ImportFailure
from importers.parity import Reference, check_source_parity, stream_perplexity
from rnnlm.bundle import TOKENIZER_FILE
from server.bundle import BundleError, sha256_file
from training.checkpoint import Checkpoint
from training.model import RNNLM, ModelConfig

# Real text fed to the parity check (tokens from the start of the source's own text).
PARITY_TEXT_TOKENS = 400


@dataclass
class Imported:
    """What an importer read, ready to be proved and written."""

    source_path: Path
    source: dict[str, Any]  # the manifest's provenance.source: format, file, sha256, details
    config: ModelConfig  # cell, vocabulary, sizes (what the manifest's architecture records)
    blobs: dict[str, bytes]  # graph kind -> ONNX bytes
    reference: Reference
    tokenizer: Tokenizer
    tokenizer_kind: str
    special_tokens: dict[str, int]
    real_ids: list[int] = field(default_factory=list)  # the source's own text, for parity
    test_ids: list[int] | None = None  # the source's test text, scored for the manifest
    test_file: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)  # overrides (unknown sizes)
    exporter: str | None = None  # how the graphs were made, when not by `rnnlm export`
    notes: list[str] = field(default_factory=list)  # what the user should know
    # Whether a prefill or score graph that fails parity is left out rather than fatal (graphs
    # derived from a source graph; `rnnlm export`'s own graphs must all pass).
    optional_graphs: bool = False


def source_record(fmt: str, path: Path, **details: Any) -> dict[str, Any]:
    """The provenance of an imported file: its format, path, size and sha256."""
    return {
        "format": fmt,
        "file": str(path.resolve()),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        **details,
    }


def read_text(path: Path) -> str:
    """A text file the import scores, or `ImportFailure` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ImportFailure(f"{path}: cannot be read as UTF-8 text ({e})") from e


def write_imported(
    imported: Imported,
    bundle_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    force: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Path:
    """Prove parity, score the test text, and write the bundle; return its path."""
    target = Path(bundle_dir)
    if not version:
        raise ImportFailure("the version must not be empty")
    try:
        _check_target(target, force)
    except ExportError as e:
        raise ImportFailure(str(e)) from e
    c = imported.config
    shapes = [(c.layers, c.hidden)] * len(c.state_names)
    report = _prove(imported, shapes, rtol, atol)
    provenance: dict[str, Any] = {}
    if imported.test_ids:
        eos = imported.special_tokens["eos"]
        provenance["test_perplexity"] = stream_perplexity(
            imported.reference, imported.test_ids, eos, shapes
        )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / TOKENIZER_FILE
        imported.tokenizer.save(str(tokenizer_path))
        ckpt = Checkpoint(
            path=imported.source_path,
            # build_manifest reads only the model's config (its state names).
            model=cast(RNNLM, SimpleNamespace(config=c)),
            config=c,
            tokenizer_path=tokenizer_path,
            tokenizer_kind=imported.tokenizer_kind,
            special_tokens=dict(imported.special_tokens),
            provenance=provenance,
        )
        manifest = build_manifest(
            ckpt, imported.blobs, report, name=name or target.resolve().name, version=version
        )
        _describe_import(manifest, imported)
        try:
            files = {**bundle_files(imported.blobs), TOKENIZER_FILE: tokenizer_path.read_bytes()}
            return write_bundle(target, files, manifest, force=force)
        except (ExportError, BundleError) as e:
            raise ImportFailure(str(e)) from e


def _prove(
    imported: Imported, shapes: list[tuple[int, int]], rtol: float, atol: float
) -> ParityReport:
    """Each graph's parity with the source. A derived prefill or score graph that fails is left
    out when `imported.optional_graphs` (the server then runs its work on the step graph, and
    the notes say so); any other failure stops the import."""
    report = ParityReport(rtol=rtol, atol=atol)
    for graph in list(imported.blobs):
        one = check_source_parity(
            imported.reference,
            {graph: imported.blobs[graph]},
            vocab=imported.config.vocab_size,
            state_shapes=shapes,
            real_ids=imported.real_ids[:PARITY_TEXT_TOKENS],
            rtol=rtol,
            atol=atol,
        )
        if not one.passed and graph != "step" and imported.optional_graphs:
            del imported.blobs[graph]
            imported.notes.append(
                f"the {graph} graph derived from the source does not match it ({one.failure}); "
                f"it is left out and the server runs {graph} work on the step graph"
            )
            continue
        if not one.passed:
            raise ImportFailure(
                f"onnxruntime does not match the source model: {one.failure} "
                f"(rtol {rtol}, atol {atol}); nothing was written"
            )
        report.cases.extend(one.cases)
        report.max_abs_error = max(report.max_abs_error, one.max_abs_error)
    return report


def _describe_import(manifest: dict[str, Any], imported: Imported) -> None:
    """Record where the model came from, how the test perplexity and parity were measured."""
    manifest["architecture"].update(imported.architecture)
    prov = manifest["provenance"]
    prov["source"] = imported.source
    prov["imported_by"] = f"rnnlm import {imported.source['format']}"
    if imported.exporter is not None:
        prov["exporter"] = imported.exporter
    if imported.test_ids:
        prov["test_perplexity_measured"] = {
            "text": imported.test_file,
            "tokens": len(imported.test_ids),
            "how": "the source model, one stream from the eos state, as Score scores a text",
        }
    if imported.notes:
        prov["notes"] = list(imported.notes)
    manifest["parity"]["against"] = "the source model in its own framework (provenance.source)"
