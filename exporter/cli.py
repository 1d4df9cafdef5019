"""`rnnlm export CHECKPOINT_DIR BUNDLE_DIR`: a checkpoint to a parity-checked model bundle."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from exporter.export import QUANTIZATIONS, ExportError, export_bundle
from server.bundle import BundleError, read_manifest
from server.word_search import lexicon_of
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
        help="leave out score.onnx (scoring then uses model.onnx)",
    )
    parser.add_argument(
        "--parity-rtol",
        type=float,
        default=1e-3,
        metavar="R",
        help="the parity check's relative tolerance: each onnxruntime output may differ from "
        "PyTorch's by the absolute tolerance + R x |PyTorch's| (default 0.001)",
    )
    parser.add_argument(
        "--parity-atol",
        type=float,
        default=1e-4,
        metavar="A",
        help="the parity check's absolute tolerance (default 0.0001). A refused export names "
        "the output and its largest error; raise this only for an error you accept (the "
        "manifest records the tolerances and the error)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="write an int8 quantized bundle, admitted only if its perplexity on "
        "held-out text stays within --max-perplexity-change of fp32",
    )
    parser.add_argument(
        "--calibration-text",
        metavar="FILE",
        help="held-out text to measure the int8 bundle on (default: the checkpoint's "
        "validation split, if its corpus is still there)",
    )
    parser.add_argument(
        "--max-perplexity-change",
        type=float,
        default=1.0,
        metavar="PCT",
        help="refuse an int8 bundle whose perplexity moves more than PCT percent (default 1)",
    )
    parser.add_argument(
        "--per-channel",
        action="store_true",
        help="int8 weights with a scale per output channel instead of per tensor (slower steps)",
    )
    parser.add_argument(
        "--per-tensor-activations",
        action="store_true",
        help="keep onnxruntime's activation scales, one for a whole run: long batch-1 runs "
        "(prefill, scoring) cost less, but a sequence's int8 results then depend on what shares "
        "its batch (default: a row at a time, docs/bundle.md)",
    )
    parser.add_argument(
        "--blocklist",
        metavar="FILE",
        help="words the server never suggests (one a line, UTF-8; '#' starts a comment), "
        "written into the bundle as blocklist.txt",
    )
    parser.add_argument(
        "--lexicon",
        metavar="FILE",
        help="a text (the training corpus, or a word list) whose words (letters, digits, "
        "apostrophes) are the only words a character or BPE model suggests, written into the "
        "bundle as lexicon.txt",
    )
    parser.add_argument(
        "--unknown-words",
        metavar="FILE",
        help="a word model's training text: the words it learned as <unk> (outside its "
        "vocabulary, or seen once with --unk-replace) and their counts, written into the bundle "
        "as unknown_words.txt; the server suggests them through <unk>'s probability",
    )


def run(args: argparse.Namespace) -> int:
    try:
        blocklist = None if args.blocklist is None else _read_text(args.blocklist, "--blocklist")
        lexicon = (
            None if args.lexicon is None else lexicon_of(_read_text(args.lexicon, "--lexicon"))
        )
        unknown_words = (
            None
            if args.unknown_words is None
            else _read_text(args.unknown_words, "--unknown-words")
        )
        path = export_bundle(
            args.checkpoint_dir,
            args.bundle_dir,
            name=args.name,
            version=args.version,
            force=args.force,
            score_graph=args.score_graph,
            rtol=args.parity_rtol,
            atol=args.parity_atol,
            quantize=args.quantize,
            calibration_text=args.calibration_text,
            max_perplexity_change=args.max_perplexity_change,
            per_channel=args.per_channel,
            per_tensor_activations=args.per_tensor_activations,
            blocklist=blocklist,
            lexicon=lexicon,
            unknown_words=unknown_words,
        )
    except (ExportError, CheckpointError, BundleError) as e:
        # One line, whatever the underlying library put in its message.
        print(f"rnnlm export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint_dir} -> {path}")
    manifest = read_manifest(path)
    if "quantization" in manifest:
        print(describe_quantization(manifest["quantization"]))
    return 0


def _read_text(file: str, option: str) -> str:
    try:
        with open(file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{option} {file}: cannot be read as UTF-8 text ({e})") from e


def describe_quantization(section: dict[str, Any]) -> str:
    """What was quantized, what stayed float (and why), and the measured quality."""
    q = section["quality"]
    lines = [
        f"int8: perplexity {q['fp32_perplexity']:.4f} -> {q['int8_perplexity']:.4f} "
        f"({q['perplexity_change_percent']:+.4f}%), top-1 agreement "
        f"{100 * q['top1_agreement']:.2f}% on {q['text']['tokens']} tokens of "
        f"{q['text']['file']}"
    ]
    ops = section["ops"]["step"]
    done = ", ".join(f"{op} x{v['count']} -> {v['as']}" for op, v in ops["quantized"].items())
    lines.append(f"int8: quantized {done or 'nothing'}")
    for op, v in ops["float"].items():
        lines.append(f"note: {op} x{v['count']} stays float32: {v['reason']}")
    return "\n".join(lines)
