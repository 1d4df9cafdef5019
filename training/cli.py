"""`rnnlm train`: the flags of `TrainOptions`, and errors as one line with exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.checkpoint import CheckpointError
from training.data import CorpusError
from training.model import CELLS
from training.tokenizer import KINDS
from training.train import OPTIMIZERS, RUN_FIELDS, TrainError, TrainOptions, train

DEFAULTS = TrainOptions()


def configure(parser: argparse.ArgumentParser) -> None:
    # Flags left out stay out of the namespace, so a resumed run can tell what was given.
    parser.argument_default = argparse.SUPPRESS
    d = DEFAULTS
    data = parser.add_argument_group("data")
    data.add_argument(
        "--corpus",
        type=Path,
        metavar="FILE",
        help="one text file, split by lines: 90%% train, 5%% valid, 5%% test",
    )
    data.add_argument(
        "--train", type=Path, metavar="FILE", help="training text (with --valid, --test)"
    )
    data.add_argument("--valid", type=Path, metavar="FILE", help="validation text")
    data.add_argument("--test", type=Path, metavar="FILE", help="test text")
    data.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="checkpoint directory to create (with --resume: default that directory)",
    )
    data.add_argument("--tokenizer", choices=KINDS, help=f"tokenizer kind (default {d.tokenizer})")
    data.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="vocabulary cap (default: word 10000, char all characters, bpe 4096)",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--cell", choices=CELLS, help=f"recurrent cell (default {d.cell})")
    model.add_argument(
        "--layers", type=int, metavar="N", help=f"stacked layers (default {d.layers})"
    )
    model.add_argument("--hidden", type=int, metavar="N", help=f"hidden size (default {d.hidden})")
    model.add_argument(
        "--embedding", type=int, metavar="N", help=f"embedding size (default {d.embedding})"
    )
    model.add_argument("--dropout", type=float, metavar="P", help=f"dropout (default {d.dropout})")
    model.add_argument(
        "--tied",
        action="store_true",
        help="tie the decoder to the embedding (projected if sizes differ)",
    )
    model.add_argument(
        "--residual", action="store_true", help="skip connections between stacked layers"
    )
    run_ = parser.add_argument_group("training")
    run_.add_argument("--bptt", type=int, metavar="T", help=f"BPTT window (default {d.bptt})")
    run_.add_argument(
        "--batch-size", type=int, metavar="B", help=f"parallel streams (default {d.batch_size})"
    )
    run_.add_argument(
        "--epochs", type=int, metavar="N", help="epochs (default 10, or the resumed run's)"
    )
    run_.add_argument(
        "--max-minutes", type=float, metavar="M", help="stop and save after M minutes of wall time"
    )
    run_.add_argument(
        "--max-steps", type=int, metavar="N", help="stop and save after N optimizer steps in all"
    )
    run_.add_argument("--lr", type=float, help="learning rate (default: adamw 2e-3, sgd 20)")
    run_.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {d.optimizer})")
    run_.add_argument(
        "--clip",
        type=float,
        metavar="NORM",
        help=f"gradient-norm clipping, 0 for none (default {d.clip})",
    )
    run_.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    run_.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run saved in DIR exactly where it stopped",
    )
    run_.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    run_.add_argument("--device", choices=("cpu", "cuda"), help=f"(default {d.device})")


def run(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        if "resume" in given:
            fixed = [k for k in given if k not in RUN_FIELDS]
            if fixed:
                flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
                raise TrainError(f"{flags}: cannot change when resuming; the checkpoint has them")
        out = train(TrainOptions(**given))
    except (TrainError, CorpusError, CheckpointError) as e:
        print(f"rnnlm train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"checkpoint: {out}")
    return 0
