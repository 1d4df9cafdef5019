"""An imported model -> a bundle: parity against the source, test perplexity, manifest, commit.

Every importer hands over an `Imported`: the bundle's ONNX graphs, the source as a parity
`Reference`, the tokenizer and where the model came from. Nothing is written until the graphs
have matched the source on random and real inputs (`importers.parity`); the manifest is made by
the bundle contract (`rnnlm.bundle.make_manifest`) and the bundle written by `rnnlm export`'s
`write_bundle`, so an imported bundle is validated by the server's loader exactly as an exported
one is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from exporter.export import (
    ExportError,
    bundle_files,
    check_target,
    core_architecture,
    toolchain,
    write_bundle,
)
from exporter.parity import ParityReport
from importers.errors import ImportFailure
from importers.parity import Reference, check_source_parity, stream_perplexity
from rnnlm.bundle import TOKENIZER_FILE, BundleError, make_manifest, sha256_file
from training.model import ModelConfig

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


@dataclass(frozen=True)
class Written:
    """A written bundle and what the user should know about it."""

    path: Path
    notes: list[str]


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


def check_destination(target: Path, version: str, force: bool) -> None:
    """Refuse a bundle that cannot be written, before any slow loading or proving."""
    if not version:
        raise ImportFailure("the version must not be empty")
    try:
        check_target(target, force)
    except ExportError as e:
        raise ImportFailure(str(e)) from e


def write_imported(
    imported: Imported,
    bundle_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    force: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Written:
    """Prove parity, score the test text, and write the bundle: its path and the notes."""
    target = Path(bundle_dir)
    check_destination(target, version, force)
    c = imported.config
    shapes = [(c.layers, c.hidden)] * len(c.state_names)
    report, blobs, dropped = _prove(imported, shapes, rtol, atol)
    notes = [*imported.notes, *dropped]
    manifest = make_manifest(
        name=name or target.resolve().name,
        version=version,
        architecture={**core_architecture(c), **imported.architecture},
        tokenizer_kind=imported.tokenizer_kind,
        special_tokens=imported.special_tokens,
        precision="fp32",
        graphs=list(blobs),
        provenance=_provenance(imported, shapes, notes),
        parity={
            **report.to_dict(),
            "against": "the source model in its own framework (provenance.source)",
        },
    )
    files = {**bundle_files(blobs), TOKENIZER_FILE: imported.tokenizer.to_str().encode()}
    try:
        return Written(write_bundle(target, files, manifest, force=force), notes)
    except (ExportError, BundleError) as e:
        raise ImportFailure(str(e)) from e


def _prove(
    imported: Imported, shapes: list[tuple[int, int]], rtol: float, atol: float
) -> tuple[ParityReport, dict[str, bytes], list[str]]:
    """Each graph's parity with the source: the report, the graphs that passed and a note for
    each left out. A derived prefill or score graph that fails is left out when
    `imported.optional_graphs` (the server then runs its work on the step graph); any other
    failure stops the import."""
    report = ParityReport(rtol=rtol, atol=atol)
    passed: dict[str, bytes] = {}
    dropped: list[str] = []
    for graph, blob in imported.blobs.items():
        one = check_source_parity(
            imported.reference,
            {graph: blob},
            vocab=imported.config.vocab_size,
            state_shapes=shapes,
            real_ids=imported.real_ids[:PARITY_TEXT_TOKENS],
            rtol=rtol,
            atol=atol,
        )
        if not one.passed and graph != "step" and imported.optional_graphs:
            dropped.append(
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
        passed[graph] = blob
    return report, passed, dropped


def _provenance(
    imported: Imported, shapes: list[tuple[int, int]], notes: list[str]
) -> dict[str, Any]:
    """Where the model came from, how its graphs were made, and its test perplexity measured
    as `Score` measures a document (one stream from the eos state), with the source model."""
    prov: dict[str, Any] = {
        "source": imported.source,
        "imported_by": f"rnnlm import {imported.source['format']}",
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **toolchain(imported.exporter),
    }
    if imported.test_ids:
        eos = imported.special_tokens["eos"]
        prov["test_perplexity"] = stream_perplexity(
            imported.reference, imported.test_ids, eos, shapes
        )
        prov["test_perplexity_measured"] = {
            "text": imported.test_file,
            "tokens": len(imported.test_ids),
            "how": "the source model, one stream from the eos state, as Score scores a text",
        }
    if notes:
        prov["notes"] = notes
    return prov
