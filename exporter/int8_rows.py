"""`rnnlm int8-rows BUNDLE_DIR NEW_BUNDLE_DIR --text FILE`: an int8 bundle whose activations are
quantized per tensor (every int8 bundle written before `exporter.rowwise` was the export's
default) rewritten so that a row's results do not depend on what shares its batch.

The bundle's own int8 weights are kept, so no checkpoint is needed. The rewritten graphs are
measured against the bundle's on held-out text (perplexity of the step and score graphs, top-1
agreement, as the export's int8 gate does) and refused when the perplexity moves more than
`--max-perplexity-change` percent; nothing is written then. The new bundle's manifest keeps the
old one's provenance and quality figures and records the rewrite under `quantization.rewrite`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx

from exporter.export import (
    ExportError,
    bundle_files,
    check_target,
    check_version_and_gate,
    write_bundle,
)
from exporter.quantize import (
    QUANTIZED_AS,
    QuantizationError,
    activation_fields,
    file_evaluation_text,
    measure_quality,
    worst_change,
)
from exporter.rowwise import RowwiseError, rowwise
from rnnlm.bundle import GRAPH_FILES, MANIFEST_FILE, WEIGHTS_FILE
from server.bundle import Bundle, BundleError, load_bundle

# measure_quality's figures, named for what is compared here: the bundle's graphs and the
# rewritten ones (the other figures, the changes and the agreement, keep their names).
_BEFORE_AFTER = {
    "fp32_perplexity": "before_perplexity",
    "int8_perplexity": "after_perplexity",
    "score_graph_int8_perplexity": "score_graph_after_perplexity",
}


def rewrite_bundle(
    source: str | Path,
    target: str | Path,
    *,
    text: str | Path,
    version: str | None = None,
    max_perplexity_change: float = 1.0,
    force: bool = False,
) -> Path:
    """Write `target`: the int8 bundle `source` with its graphs rewritten by `rowwise`, and
    `version` (default: the old one + "-rows"). `ExportError` with nothing written when the
    source is not such a bundle, a graph cannot be rewritten, or the perplexity moves too far."""
    check_version_and_gate(version, max_perplexity_change)
    check_target(Path(target), force)  # before the work: a refusal is quickest here
    bundle = load_bundle(source)
    quantization = bundle.manifest.get("quantization")
    if bundle.precision != "int8" or not isinstance(quantization, dict):
        raise ExportError(f"{source}: a {bundle.precision} bundle; only int8 bundles are rewritten")
    if bundle.batch_independent:
        raise ExportError(f"{source}: its activations are already quantized a row at a time")
    before = {g: onnx.load(str(bundle.graph_file(g))) for g in bundle.manifest["graphs"]}
    try:
        after = {graph: rowwise(model) for graph, model in before.items()}
    except RowwiseError as e:
        raise ExportError(f"{source}: {e}; nothing was written") from e
    blobs = {graph: model.SerializeToString() for graph, model in after.items()}
    rewrite = _measure(bundle, before, blobs, text, max_perplexity_change)
    manifest = _manifest(bundle, quantization, rewrite, version or f"{bundle.version}-rows")
    files = bundle_files(blobs)
    for name in bundle.manifest["files"]:
        if name not in (*GRAPH_FILES.values(), WEIGHTS_FILE, MANIFEST_FILE):
            files[name] = (bundle.path / name).read_bytes()  # the tokenizer and word lists
    return write_bundle(Path(target), files, manifest, force=force)


def _measure(
    bundle: Bundle,
    before: dict[str, onnx.ModelProto],
    after: dict[str, bytes],
    text: str | Path,
    max_change: float,
) -> dict[str, Any]:
    """The rewrite's figures against the bundle's own graphs, or `ExportError` if refused."""
    try:
        held_out = file_evaluation_text(bundle.tokenizer, text, bundle.eos_id, "--text")
    except QuantizationError as e:
        raise ExportError(f"{e}; nothing was written") from e
    shapes = [(s.layers, s.hidden) for s in bundle.state]
    old = {graph: model.SerializeToString() for graph, model in before.items()}
    quality = measure_quality(old, after, held_out.ids, shapes)
    if worst_change(quality) > max_change:
        raise ExportError(
            f"the rewritten graphs are refused: perplexity moves {worst_change(quality):.4g}% "
            f"({quality['fp32_perplexity']:.6g} -> {quality['int8_perplexity']:.6g} on "
            f"{held_out.record['tokens']} tokens of {held_out.record['file']}), more than "
            f"--max-perplexity-change {max_change:g}%; nothing was written"
        )
    renamed = {_BEFORE_AFTER.get(key, key): value for key, value in quality.items()}
    return {
        "tool": "rnnlm int8-rows (exporter.rowwise)",
        "from_version": bundle.version,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "text": held_out.record,
        **renamed,
        "max_perplexity_change_percent": max_change,
    }


def _manifest(
    bundle: Bundle, quantization: dict[str, Any], rewrite: dict[str, Any], version: str
) -> dict[str, Any]:
    manifest = copy.deepcopy(bundle.manifest)
    manifest.pop("files", None)
    manifest["version"] = version
    section = manifest["quantization"] = copy.deepcopy(quantization)
    section.update(activation_fields(per_tensor=False))
    for ops in section.get("ops", {}).values():
        for op, record in ops.get("quantized", {}).items():
            record["as"] = QUANTIZED_AS.get(op, record.get("as"))
    section["rewrite"] = rewrite
    return manifest


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle_dir", metavar="BUNDLE_DIR", help="an int8 bundle")
    parser.add_argument("new_bundle_dir", metavar="NEW_BUNDLE_DIR", help="the bundle to write")
    parser.add_argument(
        "--text",
        required=True,
        metavar="FILE",
        help="held-out text the rewritten graphs are measured on against the bundle's own",
    )
    parser.add_argument("--version", help="the new bundle's version (default: VERSION-rows)")
    parser.add_argument(
        "--max-perplexity-change",
        type=float,
        default=1.0,
        metavar="PCT",
        help="refuse the rewrite if its perplexity moves more than PCT percent (default 1)",
    )
    parser.add_argument("--force", action="store_true", help="replace NEW_BUNDLE_DIR")


def run(args: argparse.Namespace) -> int:
    try:
        path = rewrite_bundle(
            args.bundle_dir,
            args.new_bundle_dir,
            text=args.text,
            version=args.version,
            max_perplexity_change=args.max_perplexity_change,
            force=args.force,
        )
    except (ExportError, BundleError) as e:
        print(f"rnnlm int8-rows: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    r = load_bundle(path).manifest["quantization"]["rewrite"]
    print(
        f"rewrote {args.bundle_dir} -> {path}: perplexity {r['before_perplexity']:.4f} -> "
        f"{r['after_perplexity']:.4f} ({r['perplexity_change_percent']:+.4f}%), top-1 "
        f"agreement {100 * r['top1_agreement']:.2f}% on {r['text']['tokens']} tokens"
    )
    return 0
