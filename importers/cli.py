"""`rnnlm import FORMAT SOURCE BUNDLE_DIR`: a model made elsewhere to a parity-checked bundle.

Formats: `pytorch-examples` (pytorch/examples word_language_model), `onnx` (any ONNX RNN LM with
its state as inputs and outputs, such as k2-fsa icefall's) and `flair` (flair character LMs).
See docs/importing.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from importers.errors import ImportFailure
from importers.write import Imported, check_destination, write_imported
from training.model import CELLS
from training.tokenizer import KINDS as TOKENIZER_KINDS


def configure(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    examples = formats.add_parser(
        "pytorch-examples", help="a pytorch/examples word_language_model checkpoint"
    )
    examples.add_argument("checkpoint", metavar="CHECKPOINT", type=Path,
                          help="what its main.py --save wrote, or a state_dict")  # fmt: skip
    _common(examples)
    examples.add_argument("--data", required=True, type=Path, metavar="DIR",
                          help="its data folder: train.txt, valid.txt, test.txt")  # fmt: skip
    examples.add_argument("--cell", choices=CELLS,
                          help="the cell when the file cannot say (RNN state_dict)")  # fmt: skip

    onnx = formats.add_parser("onnx", help="an ONNX RNN LM with its state as inputs and outputs")
    onnx.add_argument("model", metavar="MODEL.onnx", type=Path)
    _common(onnx)
    onnx.add_argument("--tokenizer", required=True, type=Path, metavar="FILE",
                      help="a Hugging Face tokenizers file whose ids the model reads")  # fmt: skip
    onnx.add_argument("--state", required=True, action="append", metavar="IN:OUT",
                      help="a state input and the output that carries it on (repeat per "
                      "state; LSTM: h first, then c)")  # fmt: skip
    onnx.add_argument("--tokens", required=True, metavar="NAME",
                      help="the token input, int64 [batch, 1]")  # fmt: skip
    out = onnx.add_mutually_exclusive_group(required=True)
    out.add_argument("--logits", metavar="NAME", help="the next-token logits output")
    out.add_argument("--log-probs", metavar="NAME", help="the next-token log-probs output")
    onnx.add_argument("--eos-id", type=int,
                      help="the end-of-sentence id (default: eos_id metadata)")  # fmt: skip
    onnx.add_argument("--cell", choices=CELLS,
                      help="the cell (default: lstm for two states)")  # fmt: skip
    onnx.add_argument("--tokenizer-kind", choices=TOKENIZER_KINDS,
                      help="default: WordLevel: word, BPE: bpe")  # fmt: skip
    onnx.add_argument("--test-text", type=Path, metavar="FILE",
                      help="text to score for the manifest's test perplexity")  # fmt: skip

    flair = formats.add_parser("flair", help="a flair character language model (.pt)")
    flair.add_argument("checkpoint", metavar="CHECKPOINT", type=Path)
    _common(flair)
    flair.add_argument("--test-text", type=Path, metavar="FILE",
                       help="text to score for the manifest's test perplexity")  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle_dir", metavar="BUNDLE_DIR", help="the bundle directory to write")
    parser.add_argument("--name", help="model name in the manifest (default: BUNDLE_DIR's name)")
    parser.add_argument("--version", default="1", help="model version in the manifest")
    parser.add_argument("--force", action="store_true", help="replace an existing BUNDLE_DIR")


def _read(args: argparse.Namespace) -> Imported:
    """The chosen importer's result (each importer module is loaded only when chosen)."""
    if args.format == "pytorch-examples":
        from importers.examples import import_examples

        return import_examples(args.checkpoint, args.data, args.cell)
    if args.format == "onnx":
        from importers.onnx_lm import OnnxSpec, import_onnx

        spec = OnnxSpec.from_args(args)
        return import_onnx(args.model, args.tokenizer, spec, args.test_text)
    from importers.flair import import_flair

    return import_flair(args.checkpoint, args.test_text)


def run(args: argparse.Namespace) -> int:
    try:
        check_destination(Path(args.bundle_dir), args.version, args.force)  # before the loading
        imported = _read(args)
        written = write_imported(
            imported, args.bundle_dir, name=args.name, version=args.version, force=args.force
        )
    except ImportFailure as e:
        # One line, whatever the underlying library put in its message.
        print(f"rnnlm import: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"imported {args.format} {imported.source_path} -> {written.path}")
    for note in written.notes:
        print(f"note: {note}")
    return 0
