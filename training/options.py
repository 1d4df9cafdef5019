"""The `rnnlm train` options: one field per flag, their defaults and checks, and how a resumed run
merges its flags with the checkpoint's.

Every check runs before anything is read or written, so a bad value is one line naming the flag
and the value, and nothing is left behind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.clipping import AUTO
from training.data import SPLITS
from training.model import CELLS, ModelConfig
from training.recurrent_norm import CAPPABLE
from training.schedule import SCHEDULES
from training.tokenizer import KINDS

OPTIMIZERS = ("adamw", "sgd")
DEFAULT_EPOCHS = 10
DEFAULT_LR = {"adamw": 2e-3, "sgd": 20.0}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.01, "sgd": 0.0}


class TrainError(Exception):
    """A bad option or an impossible run; the message names the option and the value."""


@dataclass
class TrainOptions:
    """The `rnnlm train` flags, one field each (`--batch-size` is `batch_size`)."""

    out: Path | None = None  # required, except with `resume` (then it defaults to that directory)
    corpus: Path | None = None  # split as `split` says, or give train, valid and test
    train: Path | None = None
    valid: Path | None = None
    test: Path | None = None
    split: str = "lines"  # --corpus: "lines" 90/5/5 by lines, "nanogpt" 90/10 by characters
    tokenizer: str = "word"
    vocab_size: int | None = None  # None: word 10000, char every character, bpe 4096
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embedding: int = 256
    dropout: float = 0.2  # between layers and before the decoder
    input_dropout: float | None = None  # on the embedding output; None: `dropout`
    embed_dropout: float = 0.0  # drops whole vocabulary entries of the embedding
    locked_dropout: bool = False  # variational dropout: one mask per sequence for all steps
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights
    # Each epoch, words seen once in training become <unk> with this probability: they stand
    # in for the words a held-out text has that training never saw (Good-Turing).
    unk_replace: float = 0.0
    tied: bool = False
    residual: bool = False
    adaptive_softmax: tuple[int, ...] = ()  # its cutoffs; (): a full softmax
    adaptive_div: int = 4
    bptt: int = 35
    batch_size: int = 20  # per process; the global batch is this x the number of processes
    eval_batch_size: int = 10  # contiguous streams the validation and test text is cut into
    epochs: int | None = None  # None: 10 for a new run, the checkpoint's when resuming
    max_minutes: float | None = None  # stop (and save) after this much wall time
    max_steps: int | None = None  # stop (and save) after this many optimizer steps in all
    lr: float | None = None  # None: 2e-3 for adamw, 20 for sgd
    optimizer: str = "adamw"
    weight_decay: float | None = None  # None: 0.01 for adamw, 0 for sgd
    schedule: str = "plateau"
    warmup_steps: int = 0
    min_lr: float | None = None  # the end of the cosine; None: lr x 0.1
    clip: float | str = 0.25  # gradient-norm clipping; 0 turns it off, "auto" from the norms
    # The largest singular value each Elman layer's recurrent matrix may have (0: no cap);
    # None: the cell's default, 0.6 for rnn_relu (training/recurrent_norm.py), else none.
    recurrent_norm: float | None = None
    bf16: bool = False  # bfloat16 autocast for the training forward (evaluation stays fp32)
    # After training, tune a continuous cache on the validation text (training/cache.py).
    continuous_cache: bool = False
    seed: int = 1111
    resume: Path | None = None
    threads: int | None = None  # torch intra-op threads; None: torch's default
    mkldnn: bool | None = None  # oneDNN kernels on or off; None: torch's default (on)
    device: str = "cpu"
    quiet: bool = False  # no progress bar and no per-epoch lines
    preset: str | None = None  # informative: the preset these options started from


PATH_FIELDS = ("out", "corpus", "train", "valid", "test", "resume")
# These describe the run's length, place and speed, so a resumed run may change them; every
# other field comes from the checkpoint.
RUN_FIELDS = (
    "out",
    "resume",
    "epochs",
    "max_minutes",
    "max_steps",
    "threads",
    "mkldnn",
    "device",
    "quiet",
)
# Fields added after the first checkpoints were written: a checkpoint without them ran with
# these fields' defaults, so it resumes with them.
LATER_FIELDS = (
    "split",
    "input_dropout",
    "embed_dropout",
    "locked_dropout",
    "weight_drop",
    "eval_batch_size",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "min_lr",
    "bf16",
    "preset",
    "adaptive_softmax",
    "adaptive_div",
    "unk_replace",
    "continuous_cache",
    "recurrent_norm",
)
# What a checkpoint from before a field ran with, where that is not the field's default now.
LATER_VALUES = {"recurrent_norm": 0.0}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(o: TrainOptions) -> None:
    """Reject bad values before anything is read or written."""

    def bad(name: str, why: str) -> TrainError:
        return TrainError(f"{_flag(name)} {why}, not {getattr(o, name)!r}")

    if o.out is None and o.resume is None:
        raise TrainError("--out DIR is required (where the checkpoint goes)")
    split_files = {name: getattr(o, name) for name in ("train", "valid", "test")}
    given = [name for name, path in split_files.items() if path is not None]
    if o.corpus is not None and given:
        raise TrainError("give either --corpus or --train/--valid/--test, not both")
    if o.corpus is None and not given:
        raise TrainError("no corpus: give --corpus FILE, or --train, --valid and --test")
    if o.corpus is None and len(given) < 3:
        missing = ", ".join(_flag(n) for n in split_files if n not in given)
        raise TrainError(f"--train, --valid and --test go together; missing {missing}")
    if o.split not in SPLITS:
        raise bad("split", f"must be one of {', '.join(SPLITS)}")
    if o.split != "lines" and o.corpus is None:
        raise TrainError(f"--split {o.split} splits one --corpus file; it was not given")
    for name, choices in (
        ("tokenizer", KINDS),
        ("cell", CELLS),
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
    ):
        if getattr(o, name) not in choices:
            raise bad(name, f"must be one of {', '.join(choices)}")
    if o.device not in ("cpu", "cuda"):
        raise bad("device", "must be cpu or cuda")
    if o.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    for name in ("layers", "hidden", "embedding", "bptt", "batch_size", "eval_batch_size"):
        if getattr(o, name) < 1:
            raise bad(name, "must be at least 1")
    for name in ("vocab_size", "epochs", "max_steps", "threads"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise bad(name, "must be at least 1")
    if not 0.0 <= o.unk_replace <= 1.0:
        raise bad("unk_replace", "must be in [0, 1]")
    if o.warmup_steps < 0:
        raise bad("warmup_steps", "must be 0 (none) or more")
    for name in ("dropout", "input_dropout", "embed_dropout", "weight_drop"):
        value = getattr(o, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise bad(name, "must be in [0, 1)")
    for name in ("lr", "min_lr"):
        value = getattr(o, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise bad(name, "must be a positive number")
    if o.min_lr is not None and o.schedule != "cosine":
        raise TrainError(f"--min-lr is the end of the cosine schedule; --schedule is {o.schedule}")
    if o.weight_decay is not None and not (o.weight_decay >= 0 and math.isfinite(o.weight_decay)):
        raise bad("weight_decay", "must be 0 or a positive number")
    if o.clip != AUTO and not (
        isinstance(o.clip, int | float) and o.clip >= 0 and math.isfinite(o.clip)
    ):
        raise bad("clip", f"must be 0 (off), a positive number or {AUTO!r}")
    if o.recurrent_norm is not None:
        if not (o.recurrent_norm >= 0 and math.isfinite(o.recurrent_norm)):
            raise bad("recurrent_norm", "must be 0 (no cap) or a positive number")
        if o.recurrent_norm > 0 and o.cell not in CAPPABLE:
            raise TrainError(
                f"--recurrent-norm caps the recurrent matrix of {' and '.join(CAPPABLE)}; "
                f"--cell is {o.cell}"
            )
    if o.max_minutes is not None and not o.max_minutes > 0:
        raise bad("max_minutes", "must be positive")
    cuts = list(o.adaptive_softmax)
    if cuts and (cuts != sorted(set(cuts)) or cuts[0] < 1):
        raise bad("adaptive_softmax", "must be cutoffs that increase strictly from 1")
    if o.adaptive_div < 1:
        raise bad("adaptive_div", "must be at least 1")


def model_config(o: TrainOptions, vocab_size: int) -> ModelConfig:
    """The network the options describe, for a tokenizer of `vocab_size` ids."""
    try:
        return ModelConfig(
            cell=o.cell,
            vocab_size=vocab_size,
            embedding=o.embedding,
            hidden=o.hidden,
            layers=o.layers,
            dropout=o.dropout,
            tied=o.tied,
            residual=o.residual,
            adaptive_cutoffs=tuple(o.adaptive_softmax),
            adaptive_div=o.adaptive_div,
        )
    except ValueError as e:  # what only the vocabulary size can tell (the adaptive cutoffs)
        raise TrainError(f"--adaptive-softmax / --adaptive-div: {e}") from e


def train_args(o: TrainOptions) -> dict:
    """The options as JSON (paths as strings), stored in config.json for resume."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()}


def resumed_options(o: TrainOptions, saved: dict, directory: Path) -> TrainOptions:
    """The checkpoint's options, with this run's run-length fields; conflicts are errors."""
    defaults = TrainOptions()
    merged = {}
    for f in fields(TrainOptions):
        if f.name in RUN_FIELDS:
            continue
        if f.name not in saved and f.name not in LATER_FIELDS:
            raise ckpt.CheckpointError(
                f"{directory / ckpt.CONFIG_FILE}: train_args lacks {f.name!r}"
            )
        value = saved.get(f.name, LATER_VALUES.get(f.name, getattr(defaults, f.name)))
        if f.name in PATH_FIELDS and value is not None:
            value = Path(value)
        if isinstance(value, list):  # JSON has no tuples
            value = tuple(value)
        mine = getattr(o, f.name)
        if mine != getattr(defaults, f.name) and mine != value:
            raise TrainError(
                f"{_flag(f.name)} {mine!r} conflicts with the checkpoint being resumed "
                f"({value!r}); only {', '.join(_flag(n) for n in RUN_FIELDS[2:])} can change"
            )
        merged[f.name] = value
    epochs = o.epochs if o.epochs is not None else saved.get("epochs")
    return replace(o, **merged, epochs=epochs, out=o.out or o.resume)


def check_out(out: Path, resume: Path | None) -> None:
    if resume is not None and out.resolve() == resume.resolve():
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(
            f"--out {out}: already exists and is not an empty directory; pick a new one, or "
            f"continue that run with --resume {out}"
        )
