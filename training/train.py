"""The training loop: truncated BPTT with teacher forcing, evaluation, exact resume.

Read top to bottom: options, setup (corpus, tokenizer, model, optimizer), the loop over epochs
and BPTT windows, evaluation, and the checkpoint directory written after every epoch and at the
end. Everything a run needs to continue bit for bit (weights, optimizer, LR schedule, clipping
statistics, RNG states, data position and the carried recurrent state) is in that directory.

Started by torchrun, the same loop runs data-parallel (see `training.distributed`): each process
trains its own rows of the token stream and rank 0 alone writes. The data position and the
state of all rows are stored the same way whatever the number of processes, so a run resumes
on any number of them that divides its global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from training import checkpoint as ckpt
from training import distributed as ddp
from training.cache import describe as describe_cache
from training.cache import tune as tune_cache
from training.cache import write_block as write_cache_block
from training.clipping import AUTO, Clipper, make_clipper
from training.data import (
    SPLITS,
    CorpusError,
    batchify,
    encode,
    get_batch,
    load_corpus,
    num_windows,
    replace_rare,
    singletons,
)
from training.model import CELLS, RNNLM, ModelConfig, Regularization, State, detach_state
from training.plot import plot_metrics
from training.schedule import MIN_LR_RATIO, SCHEDULES, Schedule
from training.tokenizer import KINDS, fit_tokenizer, special_tokens

OPTIMIZERS = ("adamw", "sgd")
DEFAULT_EPOCHS = 10
DEFAULT_LR = {"adamw": 2e-3, "sgd": 20.0}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.01, "sgd": 0.0}
# Evaluation windows hold about this many tokens (at least --bptt long): the state is carried
# across windows either way, so longer ones only save per-call overhead.
EVAL_TOKENS = 2048
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TRAIN_RECORDS_PER_EPOCH = 10


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
)


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
    if o.max_minutes is not None and not o.max_minutes > 0:
        raise bad("max_minutes", "must be positive")
    cuts = list(o.adaptive_softmax)
    if cuts and (cuts != sorted(set(cuts)) or cuts[0] < 1):
        raise bad("adaptive_softmax", "must be cutoffs that increase strictly from 1")
    if o.adaptive_div < 1:
        raise bad("adaptive_div", "must be at least 1")


def _model_config(o: TrainOptions, vocab_size: int) -> ModelConfig:
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


def _train_args(o: TrainOptions) -> dict:
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
        value = saved.get(f.name, getattr(defaults, f.name))
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


def _check_out(out: Path, resume: Path | None) -> None:
    if resume is not None and out.resolve() == resume.resolve():
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(
            f"--out {out}: already exists and is not an empty directory; pick a new one, or "
            f"continue that run with --resume {out}"
        )


# -- the network's outputs ---------------------------------------------------------------


def backward_step(
    model: RNNLM,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    clip: float | Clipper,
    *,
    net: nn.Module | None = None,
    bf16: bool = False,
) -> tuple[float, float, State]:
    """Forward and backward over one window, gradients clipped; the optimizer step is left.

    `net` runs the forward when it is not `model` itself (DDP around it: the gradients are then
    averaged over the processes before they are measured and clipped, so the norm is global).
    `clip` is a threshold (0: none) or a clipper that sets one from the norm. Returns the loss,
    the gradient norm before clipping and the state to carry on.
    """
    # Truncated BPTT: keep the state's values, cut its graph to the previous window.
    state = detach_state(state)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        # Teacher forcing: the loss of each next token given the true ones before it.
        nll, state = (net or model)(x, state, y)
    loss = nll.mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # The norm before clipping: exploding or vanishing gradients show up here first.
    norm = torch.nn.utils.get_total_norm(grads)
    clipper = make_clipper(clip) if isinstance(clip, int | float) else clip
    limit = clipper.threshold(norm.item())
    if norm.item() > limit:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), limit, norm)
    # The carried state stays float32 (bf16 autocast returns it in bfloat16).
    return loss.item(), norm.item(), tuple(s.float() for s in state)


@torch.no_grad()
def evaluate(
    model: RNNLM, streams: torch.Tensor, bptt: int, group: ddp.Group | None = None
) -> float:
    """Mean negative log-likelihood per token over the streams, state carried throughout.

    In a distributed run each rank scores its share of the streams and the sums are added up,
    so every rank gets the same value as one process scoring them all.
    """
    group = group or ddp.Group()
    was_training = model.training
    model.eval()
    mine = ddp.eval_rows(streams, group)
    total, count = 0.0, 0
    if mine.size(0) > 0:
        window = max(bptt, EVAL_TOKENS // mine.size(0))
        state = model.initial_state(mine.size(0), mine.device)
        for i in range(num_windows(mine, window)):
            x, y = get_batch(mine, i, window)
            nll, state = model(x, state, y)
            total += nll.sum().item()
            count += y.numel()
    model.train(was_training)
    summed = ddp.all_sum([total, float(count)], group, streams.device)
    return summed[0] / summed[1]


def perplexity(loss: float) -> float:
    return math.exp(loss)


# -- running statistics ------------------------------------------------------------------


def new_meter() -> dict:
    return {
        "loss_sum": 0.0,
        "tokens": 0,
        "steps": 0,
        "gnorm_sum": 0.0,
        "gnorm_max": 0.0,
        "clip_sum": 0.0,
        "clipped": 0,
        "seconds": 0.0,
    }


def meter_update(
    m: dict, loss: float, tokens: int, gnorm: float, limit: float, seconds: float
) -> None:
    m["loss_sum"] += loss * tokens
    m["tokens"] += tokens
    m["steps"] += 1
    m["gnorm_sum"] += gnorm
    m["gnorm_max"] = max(m["gnorm_max"], gnorm)
    m["clip_sum"] += limit
    m["clipped"] += gnorm > limit
    m["seconds"] += seconds


def meter_summary(m: dict) -> dict:
    """Loss, gradient norms, the clipping threshold and the training speed since the reset."""
    loss = m["loss_sum"] / max(m["tokens"], 1)
    steps = max(m["steps"], 1)
    clip = m.get("clip_sum", math.inf) / steps
    return {
        "train_loss": loss,
        "train_perplexity": perplexity(loss),
        "grad_norm_mean": m["gnorm_sum"] / steps,
        "grad_norm_max": m["gnorm_max"],
        "clip_threshold_mean": clip if math.isfinite(clip) else None,
        "clipped_fraction": m.get("clipped", 0) / steps,
        "tokens_per_s": m["tokens"] / m["seconds"] if m.get("seconds") else None,
    }


# -- RNG state ---------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Give ranks other than 0 their own dropout masks (rank 0 keeps the run's RNG stream)."""
    torch.manual_seed(seed + 1_000_003 * rank + step)


# -- the checkpoint directory ------------------------------------------------------------


def read_metrics(directory: Path) -> list[dict]:
    path = directory / METRICS_FILE
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{path}: not JSON lines ({e})") from e


def save_checkpoint(
    out: Path,
    model: RNNLM,
    best: RNNLM,
    tokenizer: Tokenizer,
    kind: str,
    provenance: dict,
    train_args: dict,
    train_state: dict,
    metrics: list[dict],
) -> None:
    """Write the whole directory next to `out`, then swap it in: never a half-written one."""
    staged = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    try:
        ckpt.save_weights(best, staged / ckpt.WEIGHTS_FILE)
        ckpt.save_weights(model, staged / ckpt.LAST_WEIGHTS_FILE)
        torch.save(train_state, staged / ckpt.TRAIN_STATE_FILE)
        tokenizer.save(str(staged / ckpt.TOKENIZER_FILE))
        (staged / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in metrics))
        plot_metrics(metrics, staged / PLOT_FILE)
        ckpt.write_config(
            staged, model.config, kind, special_tokens(tokenizer, kind), provenance, train_args
        )
        ckpt.replace_directory(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged)


def _load_tokenizer(directory: Path) -> Tokenizer:
    path = directory / ckpt.TOKENIZER_FILE
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path}: missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise ckpt.CheckpointError(f"{path}: not a tokenizers file ({e})") from e


# -- the run -----------------------------------------------------------------------------


def train(options: TrainOptions) -> Path:
    """Train (or resume) as `options` say; returns the checkpoint directory it wrote.

    Under torchrun every process calls this with the same options; each returns once rank 0
    has written the final checkpoint.
    """
    paths = {name: getattr(options, name) for name in PATH_FIELDS}
    o = replace(options, **{k: None if v is None else Path(v) for k, v in paths.items()})  # type: ignore[arg-type]

    # Setup: everything that can fail on bad input happens before the first write.
    saved_config: dict = {}
    if o.resume is not None:
        saved_config = ckpt.read_config(o.resume)
        o = resumed_options(o, saved_config.get("train_args", {}), o.resume)
    try:
        check_options(o)
    except TypeError as e:
        if o.resume is None:
            raise
        raise ckpt.CheckpointError(
            f"{o.resume / ckpt.CONFIG_FILE}: a train_args value has the wrong type ({e})"
        ) from e
    _check_out(Path(o.out), o.resume)  # type: ignore[arg-type]
    group, created = ddp.join(o.device)
    mkldnn_before = torch.backends.mkldnn.enabled
    if o.mkldnn is not None:
        torch.backends.mkldnn.enabled = o.mkldnn  # type: ignore[assignment]  # a ContextProp
    try:
        return _train(o, saved_config, group)
    finally:
        torch.backends.mkldnn.enabled = mkldnn_before  # type: ignore[assignment]
        ddp.leave(created)


def _train(o: TrainOptions, saved_config: dict, group: ddp.Group) -> Path:
    out = Path(o.out)  # type: ignore[arg-type]
    epochs = o.epochs or DEFAULT_EPOCHS
    lr = o.lr if o.lr is not None else DEFAULT_LR[o.optimizer]
    weight_decay = (
        o.weight_decay if o.weight_decay is not None else DEFAULT_WEIGHT_DECAY[o.optimizer]
    )
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    device = ddp.device_for(group, o.device)

    resume_state: dict = {}
    if o.resume is not None:
        resume_state = ckpt.load_train_state(o.resume)
        # The carried state covers every row of the stream: [layers, global batch, hidden].
        try:
            global_batch = int(resume_state["hidden"][0].size(1))
        except (IndexError, AttributeError, TypeError) as e:
            raise ckpt.CheckpointError(
                f"{o.resume / ckpt.TRAIN_STATE_FILE}: the carried state is not a list of "
                f"tensors ({e})"
            ) from e
        if global_batch % group.world_size:
            raise TrainError(
                f"--resume {o.resume}: its {global_batch} streams (the global batch) do not "
                f"split evenly over {group.world_size} processes; resume on a number of "
                f"processes that divides {global_batch}"
            )
        o = replace(o, batch_size=global_batch // group.world_size)
    global_batch = o.batch_size * group.world_size

    corpus = load_corpus(o.corpus, o.train, o.valid, o.test, split=o.split)
    if o.resume is not None:
        tokenizer = _load_tokenizer(o.resume)
        saved_sha = saved_config.get("provenance", {}).get("corpus_sha256")
        if saved_sha != corpus.sha256:
            raise TrainError(
                f"--resume {o.resume}: the corpus changed since that run "
                f"(sha256 {corpus.sha256[:12]}..., the checkpoint has {str(saved_sha)[:12]}...)"
            )
    else:
        # Rank 0 fits the vocabulary and every rank uses that very tokenizer.
        fitted: str | ValueError | None = None
        if group.is_main:
            try:
                fitted = fit_tokenizer(o.tokenizer, corpus.train, o.vocab_size).to_str()
            except ValueError as e:
                fitted = e
        fitted = ddp.from_main(fitted, group)
        if isinstance(fitted, ValueError):
            raise TrainError(str(fitted)) from fitted
        tokenizer = Tokenizer.from_str(fitted)
    splits = {name: encode(tokenizer, getattr(corpus, name)) for name in ("train", "valid", "test")}

    def source(split: str) -> str:
        return f"--corpus {corpus.sources[split]}" if o.corpus else f"--{split} {getattr(o, split)}"

    need = global_batch * (o.bptt + 1)
    if splits["train"].numel() < need:
        processes = f" x {group.world_size} processes" if group.distributed else ""
        raise CorpusError(
            f"{source('train')}: the training split is too short, {splits['train'].numel()} "
            f"tokens; --batch-size {o.batch_size}{processes} x (--bptt {o.bptt} + 1) = {need} "
            "are needed for one batch (use a longer corpus or a smaller --batch-size or --bptt)"
        )
    for name in ("valid", "test"):
        if splits[name].numel() < 2:
            raise CorpusError(
                f"{source(name)}: the {name} split is too short, {splits[name].numel()} "
                "token(s); at least 2 are needed to score one prediction"
            )
    train_data = ddp.own_rows(batchify(splits["train"], global_batch), group).to(device)
    unk, rare = None, None  # with --unk-replace: the <unk> id and the words seen once
    if o.unk_replace > 0:
        specials = special_tokens(tokenizer, o.tokenizer)
        unk = specials["unk"]
        if unk is None:
            raise TrainError(
                "--unk-replace needs a tokenizer with an <unk> token (word or char), "
                f"not {o.tokenizer}"
            )
        rare = singletons(splits["train"], tokenizer.get_vocab_size(), (unk, specials["eos"]))

    def eval_streams(ids: torch.Tensor) -> torch.Tensor:
        # Columns of at least one full window where the split is long enough.
        columns = max(1, min(o.eval_batch_size, (ids.numel() - 1) // o.bptt))
        return batchify(ids, columns).to(device)

    valid_data, test_data = eval_streams(splits["valid"]), eval_streams(splits["test"])

    torch.manual_seed(o.seed)
    random.seed(o.seed)
    np.random.seed(o.seed)
    config = _model_config(o, tokenizer.get_vocab_size())
    regularization = Regularization(
        input_dropout=o.input_dropout,
        embed_dropout=o.embed_dropout,
        locked_dropout=o.locked_dropout,
        weight_drop=o.weight_drop,
    )
    model = RNNLM(config, regularization).to(device)
    best = RNNLM(config).to(device)
    best.load_state_dict(model.state_dict())
    net = ddp.wrap(model, group, device)  # every rank now holds rank 0's initial weights
    if o.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=weight_decay
        )
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_windows = num_windows(train_data, o.bptt)
    total_steps = epochs * n_windows
    if o.max_steps is not None:
        total_steps = min(total_steps, o.max_steps)
    schedule = Schedule(
        kind=o.schedule,
        lr=lr,
        min_lr=o.min_lr if o.min_lr is not None else lr * MIN_LR_RATIO,
        warmup_steps=o.warmup_steps,
        total_steps=total_steps,
        budget_s=None if o.max_minutes is None else o.max_minutes * 60,
    )
    clipper = make_clipper(o.clip)

    # Where the loop starts: the beginning, or exactly where the checkpoint stopped.
    epoch, window, step, tokens_seen = 1, 0, 0, 0
    hidden: State = model.initial_state(o.batch_size, device)
    best_valid_loss, best_epoch = math.inf, None
    meters = {"epoch": new_meter(), "interval": new_meter()}
    elapsed_before = 0.0
    metrics: list[dict] = []
    if o.resume is not None:
        ckpt.load_weights(model, o.resume / ckpt.LAST_WEIGHTS_FILE)
        ckpt.load_weights(best, o.resume / ckpt.WEIGHTS_FILE)
        try:
            if resume_state.get("best_weights") is not None:
                # The shipped weights were the ones at the stop; the recorded best is here.
                best.load_state_dict(resume_state["best_weights"])
            optimizer.load_state_dict(resume_state["optimizer"])
            schedule.load_state_dict(resume_state["scheduler"])
            clipper.load_state_dict(resume_state.get("clip", {}))
            rows = slice(group.rank * o.batch_size, (group.rank + 1) * o.batch_size)
            hidden = tuple(h[:, rows].to(device) for h in resume_state["hidden"])
            if [h.shape for h in hidden] != [h.shape for h in model.initial_state(o.batch_size)]:
                raise ValueError("the carried state does not match the model")
            set_rng_state(resume_state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ckpt.CheckpointError(
                f"{o.resume / ckpt.TRAIN_STATE_FILE}: does not fit this model ({e})"
            ) from e
        epoch, window = resume_state["epoch"], resume_state["window"]
        step, tokens_seen = resume_state["step"], resume_state["tokens_seen"]
        best_valid_loss, best_epoch = resume_state["best_valid_loss"], resume_state["best_epoch"]
        meters = resume_state["meters"]
        for m in meters.values():  # a checkpoint from before some statistics existed
            for key, zero in new_meter().items():
                m.setdefault(key, zero)
        elapsed_before = resume_state["elapsed_s"]
        metrics = read_metrics(o.resume)
    if not group.is_main:
        seed_rank(o.seed, group.rank, step)
    train_args = _train_args(replace(o, epochs=epochs, lr=lr, out=None, resume=None))
    record_every = max(1, n_windows // TRAIN_RECORDS_PER_EPOCH)
    talk = group.is_main and not o.quiet

    def log(message: str) -> None:
        if talk:
            tqdm.write(message, file=sys.stderr)

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - started

    def state_dict(best_weights: dict | None) -> dict:
        return {
            "epoch": epoch,
            "window": window,
            "step": step,
            "tokens_seen": tokens_seen,
            "hidden": [h.detach().cpu() for h in ddp.all_rows(hidden, group)],
            "best_valid_loss": best_valid_loss,
            "best_epoch": best_epoch,
            "best_weights": best_weights,
            "meters": meters,
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "clip": clipper.state_dict(),
            "rng": rng_state(),
            "elapsed_s": elapsed(),
        }

    # Training throughput of this invocation: optimizer steps only, evaluation excluded.
    run_tokens, run_seconds = 0, 0.0

    def provenance(
        valid_loss: float | None, test_loss: float | None, stopped: str, weights_from: str
    ) -> dict:
        return {
            "corpus_sha256": corpus.sha256,
            "corpus": corpus.sources,
            "split": o.split,
            "test_is_valid": corpus.test_is_valid,
            "tokens_seen": tokens_seen,
            "steps": step,
            "epochs_completed": epoch - 1,
            "best_epoch": best_epoch,
            "weights_from": weights_from,
            "valid_loss": valid_loss,
            "valid_perplexity": None if valid_loss is None else perplexity(valid_loss),
            "test_loss": test_loss,
            "test_perplexity": None if test_loss is None else perplexity(test_loss),
            "split_tokens": {name: int(ids.numel()) for name, ids in splits.items()},
            "train_tokens_per_s": run_tokens / run_seconds if run_seconds else None,
            "elapsed_s": elapsed(),
            "world_size": group.world_size,
            "global_batch": global_batch,
            "rank_divergence": ddp.divergence(model, group),
            "stopped": stopped,
            "torch_version": torch.__version__,
        }

    def save(
        valid_loss: float | None,
        test_loss: float | None,
        stopped: str,
        shipped: RNNLM | None = None,
        weights_from: str = "best epoch",
    ) -> None:
        # Every rank takes part (the state and the sync check are collective); rank 0 writes.
        shipped = shipped or best
        state = state_dict(None if shipped is best else best.state_dict())
        prov = provenance(valid_loss, test_loss, stopped, weights_from)
        if prov["rank_divergence"] > 0:
            raise TrainError(
                f"the processes' weights diverged (max |difference| {prov['rank_divergence']:.3g}"
                f" at step {step}); the distributed run is broken"
            )
        if group.is_main:
            save_checkpoint(
                out, model, shipped, tokenizer, o.tokenizer, prov, train_args, state, metrics
            )

    def before_step() -> tuple[str | None, float]:
        """Why to stop before the next step, if at all, and the schedule's clock (rank 0's
        elapsed time); in a distributed run every rank gets the same answers."""
        late = deadline is not None and time.monotonic() >= deadline
        values = [float(late), float(interrupted), elapsed() if group.is_main else 0.0]
        late_any, interrupted_any, clock = ddp.all_sum(values, group, device)
        if o.max_steps is not None and step >= o.max_steps:
            return "max_steps", clock
        if late_any:
            return "max_minutes", clock
        return ("interrupted" if interrupted_any else None), clock

    # The loop. Ctrl-C or SIGTERM (what schedulers send to preempt a job; torchrun passes either
    # on to its workers and kills them 30 s later) stops it between two steps, like
    # --max-minutes, so the saved state is one a resumed run continues exactly; a second signal
    # aborts at once.
    interrupted = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        log("interrupted: stopping after this step to save (Ctrl-C again to abort)")

    started = time.monotonic()
    # --max-minutes is the run's budget over all its invocations, as the cosine schedule sees it.
    deadline = None if o.max_minutes is None else started + o.max_minutes * 60 - elapsed_before
    stopped = "completed"
    in_main_thread = threading.current_thread() is threading.main_thread()
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous_handlers = (
        [signal.signal(sig, on_interrupt) for sig in stop_signals] if in_main_thread else []
    )
    model.train()
    try:
        while epoch <= epochs:
            epoch_data = train_data
            if rare is not None and unk is not None:
                epoch_data = replace_rare(train_data, rare, unk, o.unk_replace, o.seed + epoch)
            bar = tqdm(
                total=n_windows,
                initial=window,
                desc=f"epoch {epoch}/{epochs}",
                unit="batch",
                disable=not talk,
                leave=False,
                file=sys.stderr,
                mininterval=1.0,
            )
            while window < n_windows:
                reason, clock = before_step()
                if reason is not None:
                    stopped = reason
                    break
                for g in optimizer.param_groups:
                    g["lr"] = schedule.rate(step, clock)
                step_started = time.monotonic()
                x, y = get_batch(epoch_data, window, o.bptt)
                loss_value, gnorm, hidden = backward_step(
                    model, x, y, hidden, clipper, net=net, bf16=o.bf16
                )
                loss_value = ddp.all_sum([loss_value], group, device)[0] / group.world_size
                if not (math.isfinite(loss_value) and math.isfinite(gnorm)):
                    raise TrainError(
                        f"training diverged at step {step + 1} (epoch {epoch}): loss "
                        f"{loss_value}, gradient norm {gnorm}; lower --lr or --clip"
                    )
                optimizer.step()
                seconds = time.monotonic() - step_started
                limit = clipper.last
                tokens = y.numel() * group.world_size
                step += 1
                window += 1
                tokens_seen += tokens
                run_tokens += tokens
                run_seconds += seconds
                for m in meters.values():
                    meter_update(m, loss_value, tokens, gnorm, limit, seconds)
                bar.update()
                rate = meters["epoch"]["tokens"] / max(meters["epoch"]["seconds"], 1e-9)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:.0f}", refresh=False)
                if window % record_every == 0 or window == n_windows:
                    metrics.append(
                        {
                            "kind": "train",
                            "epoch": epoch,
                            "step": step,
                            "tokens_seen": tokens_seen,
                            "lr": optimizer.param_groups[0]["lr"],
                            **meter_summary(meters["interval"]),
                        }
                    )
                    meters["interval"] = new_meter()
            bar.close()
            if window < n_windows:
                break
            # End of an epoch: validate, schedule, keep the best, checkpoint.
            valid_loss = evaluate(model, valid_data, o.bptt, group)
            lr_used = optimizer.param_groups[0]["lr"]
            improved = valid_loss < best_valid_loss
            schedule.validated(improved)
            if improved:
                best_valid_loss, best_epoch = valid_loss, epoch
                best.load_state_dict(model.state_dict())
            summary = meter_summary(meters["epoch"])
            metrics.append(
                {
                    "kind": "epoch",
                    "epoch": epoch,
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "lr": lr_used,
                    **summary,
                    "valid_loss": valid_loss,
                    "valid_perplexity": perplexity(valid_loss),
                    "elapsed_s": elapsed(),
                }
            )
            log(
                f"epoch {epoch:3d} | train loss {summary['train_loss']:.3f} | valid loss "
                f"{valid_loss:.3f} ppl {perplexity(valid_loss):.2f} | grad norm mean "
                f"{summary['grad_norm_mean']:.3f} max {summary['grad_norm_max']:.3f} | "
                f"lr {lr_used:.3g} | {summary['tokens_per_s'] or 0:.0f} tok/s"
            )
            epoch, window = epoch + 1, 0
            hidden = model.initial_state(o.batch_size, device)
            meters = {"epoch": new_meter(), "interval": new_meter()}
            if epoch <= epochs:  # after the last epoch, the final save below follows at once
                save(best_valid_loss, None, "running")
    finally:
        for sig, handler in zip(stop_signals, previous_handlers, strict=False):
            signal.signal(sig, handler)

    # The end. Weights trained since the last validation (a run stopped mid-epoch) are
    # validated too, and shipped if better than the best epoch; the recorded best stays the
    # best epoch, so a resumed run picks its best exactly as an uninterrupted one would.
    shipped, weights_from = best, f"epoch {best_epoch}"
    valid_loss = best_valid_loss
    if window > 0 or best_epoch is None:
        current_loss = evaluate(model, valid_data, o.bptt, group)
        if current_loss < best_valid_loss:
            shipped, valid_loss = model, current_loss
            weights_from = f"step {step} ({stopped})"
    test_loss = valid_loss if corpus.test_is_valid else evaluate(shipped, test_data, o.bptt, group)
    metrics.append(
        {
            "kind": "test",
            "epoch": epoch - 1,
            "step": step,
            "tokens_seen": tokens_seen,
            "best_epoch": best_epoch,
            "weights_from": weights_from,
            "valid_loss": valid_loss,
            "valid_perplexity": perplexity(valid_loss),
            "test_loss": test_loss,
            "test_perplexity": perplexity(test_loss),
            "train_tokens_per_s": run_tokens / run_seconds if run_seconds else None,
        }
    )
    speed = f"{run_tokens / run_seconds:.0f} tok/s" if run_seconds else "no steps"
    log(
        f"done ({stopped}) after {step} steps | {speed} | weights from {weights_from} | valid "
        f"loss {valid_loss:.4f} ppl {perplexity(valid_loss):.2f} | test loss {test_loss:.4f} "
        f"ppl {perplexity(test_loss):.2f} | saved {out}"
    )
    save(valid_loss, test_loss, stopped, shipped, weights_from)
    if o.continuous_cache and group.is_main:
        test_ids = None if corpus.test_is_valid else splits["test"].to(device)
        never = tuple(i for i in special_tokens(tokenizer, o.tokenizer).values() if i is not None)
        block = tune_cache(shipped, splits["valid"].to(device), test_ids, never)
        write_cache_block(out, block)
        log(describe_cache(block))
    ddp.barrier(group)  # no rank returns before the checkpoint is complete
    return out
