"""`rnnlm export CHECKPOINT_DIR BUNDLE_DIR`: a checkpoint to a parity-checked model bundle."""

from __future__ import annotations

import argparse
import sys

from exporter.export import ExportError, export_bundle
from server.bundle import BundleError
from training.checkpoint import CheckpointError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="a `rnnlm train` output")
    parser.add_argument("bundle_dir", metavar="BUNDLE_DIR", help="the bundle directory to write")
    parser.add_argument("--name", help="model name in the manifest (default: BUNDLE_DIR's name)")
    parser.add_argument("--version", default="1", help="model version in the manifest")
    parser.add_argument("--force", action="store_true", help="replace an existing BUNDLE_DIR")
    parser.add_argument(
        "--no-score-graph",
        dest="score_graph",
        action="store_false",
        help="leave out score.onnx (a smaller bundle; scoring then uses model.onnx)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        path = export_bundle(
            args.checkpoint_dir,
            args.bundle_dir,
            name=args.name,
            version=args.version,
            force=args.force,
            score_graph=args.score_graph,
        )
    except (ExportError, CheckpointError, BundleError) as e:
        # One line, whatever the underlying library put in its message.
        print(f"rnnlm export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint_dir} -> {path}")
    return 0
