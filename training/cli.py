"""`rnnlm train`: the flags of `TrainOptions`, presets, multi-process launch, and errors as one
line with exit code 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from training.checkpoint import CheckpointError
from training.clipping import AUTO
from training.data import SPLITS, CorpusError
from training.distributed import launched_world_size
from training.model import CELLS
from training.presets import PRESETS, preset_options
from training.schedule import SCHEDULES
from training.tokenizer import KINDS
from training.train import OPTIMIZERS, RUN_FIELDS, TrainError, TrainOptions, train

DEFAULTS = TrainOptions()


def clip_value(text: str) -> float | str:
    """`--clip`: a number, or "auto" for a threshold from the running gradient norms."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or {AUTO!r}, not {text!r}") from None


def cutoffs_value(text: str) -> tuple[int, ...]:
    """`--adaptive-softmax`: increasing ids like "2000" or "1000,4000", or "none" (off)."""
    if text == "none":
        return ()
    try:
        cuts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be token ids separated by commas (e.g. 2000 or 1000,4000) or none, not {text!r}"
        ) from None
    if list(cuts) != sorted(set(cuts)) or cuts[0] < 1:
        raise argparse.ArgumentTypeError(f"cutoffs must increase strictly from 1, not {text!r}")
    return cuts


def configure(parser: argparse.ArgumentParser) -> None:
    # Flags left out stay out of the namespace, so presets and resumed runs can tell what was
    # given.
    parser.argument_default = argparse.SUPPRESS
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="start from a named recipe (docs/training.md); flags given explicitly override it",
    )
    _data_flags(parser.add_argument_group("data"))
    _model_flags(parser.add_argument_group("model"))
    _regularization_flags(
        parser.add_argument_group("regularization (training only; the exported model has none)")
    )
    training = parser.add_argument_group("training")
    _length_flags(training)
    _optimization_flags(training)
    _execution_flags(parser.add_argument_group("execution"))


def _data_flags(group: argparse._ArgumentGroup) -> None:
    """The corpus or split files, the checkpoint directory and the tokenizer."""
    d = DEFAULTS
    group.add_argument(
        "--corpus", type=Path, metavar="FILE", help="one text file, split as --split says"
    )
    group.add_argument(
        "--split",
        choices=SPLITS,
        help="how --corpus is split: lines (90%% train, 5%% valid, 5%% test, by lines) or "
        "nanogpt (the first 90%% of the characters train, the rest validates; no test split, "
        f"the test figures are the validation ones) (default {d.split})",
    )
    group.add_argument(
        "--train", type=Path, metavar="FILE", help="training text (with --valid, --test)"
    )
    group.add_argument("--valid", type=Path, metavar="FILE", help="validation text")
    group.add_argument("--test", type=Path, metavar="FILE", help="test text")
    group.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="checkpoint directory to create (with --resume: default that directory)",
    )
    group.add_argument("--tokenizer", choices=KINDS, help=f"tokenizer kind (default {d.tokenizer})")
    group.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="vocabulary cap (default: word 10000, char all characters, bpe 4096)",
    )


def _model_flags(group: argparse._ArgumentGroup) -> None:
    """The architecture: cell, sizes, tying, residual, adaptive softmax."""
    d = DEFAULTS
    on_off = argparse.BooleanOptionalAction
    group.add_argument("--cell", choices=CELLS, help=f"recurrent cell (default {d.cell})")
    group.add_argument(
        "--layers", type=int, metavar="N", help=f"stacked layers (default {d.layers})"
    )
    group.add_argument("--hidden", type=int, metavar="N", help=f"hidden size (default {d.hidden})")
    group.add_argument(
        "--embedding", type=int, metavar="N", help=f"embedding size (default {d.embedding})"
    )
    group.add_argument(
        "--tied",
        action=on_off,
        help="tie the decoder to the embedding (projected if sizes differ) (default off)",
    )
    group.add_argument(
        "--residual", action=on_off, help="skip connections between stacked layers (default off)"
    )
    group.add_argument(
        "--adaptive-softmax",
        type=cutoffs_value,
        metavar="CUTOFFS",
        help="an adaptive softmax cut at these ids (e.g. 2000): ids below the first cutoff get "
        "a full-width output, rarer ones narrower ones; much faster with a large vocabulary; "
        "none: a full softmax (default none)",
    )
    group.add_argument(
        "--adaptive-div",
        type=int,
        metavar="N",
        help=f"each adaptive tail cluster is this many times narrower than the one before "
        f"(default {d.adaptive_div})",
    )


def _regularization_flags(group: argparse._ArgumentGroup) -> None:
    """Dropouts, DropConnect and unk replacement."""
    d = DEFAULTS
    on_off = argparse.BooleanOptionalAction
    group.add_argument(
        "--dropout",
        type=float,
        metavar="P",
        help=f"dropout between layers and before the decoder (default {d.dropout})",
    )
    group.add_argument(
        "--input-dropout",
        type=float,
        metavar="P",
        help="dropout on the embedding output (default: --dropout)",
    )
    group.add_argument(
        "--embed-dropout",
        type=float,
        metavar="P",
        help=f"drop whole vocabulary entries of the embedding (default {d.embed_dropout})",
    )
    group.add_argument(
        "--locked-dropout",
        action=on_off,
        help="variational dropout: one mask per sequence, the same at every step (default off)",
    )
    group.add_argument(
        "--weight-drop",
        type=float,
        metavar="P",
        help=f"DropConnect on the hidden-to-hidden weights (default {d.weight_drop})",
    )
    group.add_argument(
        "--unk-replace",
        type=float,
        metavar="P",
        help="each epoch, replace words seen once in training by <unk> with probability P, so "
        "the model learns how often unseen words come (word and char tokenizers) "
        f"(default {d.unk_replace})",
    )


def _length_flags(group: argparse._ArgumentGroup) -> None:
    """The training group's windows, batches and how long the run lasts."""
    d = DEFAULTS
    group.add_argument("--bptt", type=int, metavar="T", help=f"BPTT window (default {d.bptt})")
    group.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help=f"parallel streams per process (default {d.batch_size})",
    )
    group.add_argument(
        "--eval-batch-size",
        type=int,
        metavar="B",
        help="contiguous streams the validation and test text is cut into, each scored with "
        f"its state carried; 1 scores it as one stream (default {d.eval_batch_size})",
    )
    group.add_argument(
        "--epochs", type=int, metavar="N", help="epochs (default 10, or the resumed run's)"
    )
    group.add_argument(
        "--max-minutes",
        type=float,
        metavar="M",
        help="stop and save when the run's wall time (over all its invocations) reaches M",
    )
    group.add_argument(
        "--max-steps", type=int, metavar="N", help="stop and save after N optimizer steps in all"
    )


def _optimization_flags(group: argparse._ArgumentGroup) -> None:
    """The training group's optimizer, schedule, clipping, norm cap, bf16, cache, seed, resume."""
    d = DEFAULTS
    on_off = argparse.BooleanOptionalAction
    group.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {d.optimizer})")
    group.add_argument("--lr", type=float, help="learning rate (default: adamw 2e-3, sgd 20)")
    group.add_argument(
        "--weight-decay",
        type=float,
        metavar="W",
        help="weight decay (default: adamw 0.01, decoupled; sgd 0)",
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="plateau: lr / 4 after a validation that does not improve; cosine: down to "
        "--min-lr over the run (steps or --max-minutes, whichever ends first); constant "
        f"(default {d.schedule})",
    )
    group.add_argument(
        "--warmup-steps",
        type=int,
        metavar="N",
        help=f"linear learning-rate warm-up over the first N steps (default {d.warmup_steps})",
    )
    group.add_argument(
        "--min-lr", type=float, metavar="LR", help="where the cosine ends (default lr x 0.1)"
    )
    group.add_argument(
        "--clip",
        type=clip_value,
        metavar="NORM",
        help="gradient-norm clipping: a threshold, 0 for none, or auto (2 x the median of the "
        f"last 200 norms) (default {d.clip})",
    )
    group.add_argument(
        "--recurrent-norm",
        type=float,
        metavar="RHO",
        help="after every step, scale each Elman layer's recurrent matrix down to spectral norm "
        "RHO, so the state stays bounded over streams of any length; 0: no cap (default: 0.6 "
        "for rnn_relu, none for the other cells)",
    )
    group.add_argument(
        "--bf16",
        action=on_off,
        help="bfloat16 autocast in the training forward; evaluation stays fp32 (default off)",
    )
    group.add_argument(
        "--continuous-cache",
        action=on_off,
        help="after training, tune a continuous cache (a recall of the text's recent words) on "
        "the validation text; the bundle ships it for Score (default off)",
    )
    group.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    group.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run saved in DIR exactly where it stopped",
    )


def _execution_flags(group: argparse._ArgumentGroup) -> None:
    """Threads, kernels, device, progress output and processes."""
    d = DEFAULTS
    on_off = argparse.BooleanOptionalAction
    group.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    group.add_argument(
        "--mkldnn",
        action=on_off,
        help="oneDNN (MKLDNN) CPU kernels on or off (default: torch's, on)",
    )
    group.add_argument("--device", choices=("cpu", "cuda"), help=f"(default {d.device})")
    group.add_argument(
        "--quiet", action="store_true", help="no progress bar and no per-epoch lines"
    )
    group.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel in N processes (runs torchrun; the global batch is "
        "--batch-size x N)",
    )


def torchrun_command(nproc: int, given: dict[str, Any]) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m training FLAGS`, the flags from `given`."""
    flags: list[str] = []
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags.extend([flag, str(value)])
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "training",
        *flags,
    ]


def _launch(nproc: int, given: dict[str, Any]) -> int:
    if nproc < 1:
        raise TrainError(f"--nproc must be at least 1, not {nproc}")
    if given.get("device") == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise TrainError(
                f"--nproc {nproc} with --device cuda needs a GPU per process; "
                f"{torch.cuda.device_count()} are visible"
            )
    process = subprocess.Popen(torchrun_command(nproc, given))
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            # torchrun got the same Ctrl-C and passes it on to the workers, which stop and
            # save; killing it now (as subprocess.call would) would orphan them.
            continue


def _note(message: str) -> None:
    print(f"rnnlm train: note: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k != "command"}
    nproc = given.pop("nproc", 1)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if nproc != 1 and launched_world_size() == 1:
            return _launch(nproc, given)
        if "resume" in given:
            fixed = [k for k in given if k not in RUN_FIELDS]
            if fixed:
                flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
                raise TrainError(f"{flags}: cannot change when resuming; the checkpoint has them")
        out = train(preset_options(given.pop("preset", None), given, _note))
    except (TrainError, CorpusError, CheckpointError) as e:
        who = f"rnnlm train (rank {rank})" if launched_world_size() > 1 else "rnnlm train"
        print(f"{who}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"checkpoint: {out}")
    return 0
