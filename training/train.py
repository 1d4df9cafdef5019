"""The training loop: truncated BPTT with teacher forcing, evaluation, exact resume.

Read top to bottom, as pytorch/examples' `word_language_model` and nanoGPT's `train.py` read:
`setup` builds what a run works with (`Run`: data, model, optimizer, schedule), `Progress` is
where the run stands and saves itself, and the loop is `train_epoch` (one BPTT window after
another), `end_epoch` (validate, keep the best, checkpoint) and `finish` (choose the weights
to ship, test them, write the final checkpoint). Everything a run needs to continue bit for
bit (weights, optimizer, LR schedule, clipping statistics, RNG states, data position and the
carried recurrent state) is in the checkpoint directory.

Started by torchrun, the same loop runs data-parallel (see `training.distributed`): each process
trains its own rows of the token stream and rank 0 alone writes. The data position and the
state of all rows are stored the same way whatever the number of processes, so a run resumes
on any number of them that divides its global batch.
"""

from __future__ import annotations

import functools
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

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
from training.clipping import Clipper, make_clipper
from training.console import epoch_progress
from training.data import (
    Corpus,
    CorpusError,
    batchify,
    encode,
    get_batch,
    load_corpus,
    num_windows,
    replace_rare,
    singletons,
)
from training.evaluation import evaluate, score_document
from training.meters import meter_summary, meter_update, new_meter, new_meters, perplexity
from training.model import RNNLM, Regularization, State, detach_state, recurrent_layer
from training.options import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    OPTIMIZERS,
    PATH_FIELDS,
    RUN_FIELDS,
    TrainError,
    TrainOptions,
    check_options,
    check_out,
    model_config,
    resumed_options,
    train_args,
)
from training.plot import plot_metrics, run_title
from training.recurrent_norm import cap_recurrent_norm, default_limit, spectral_norms
from training.rng import rng_state, seed_rank, set_rng_state
from training.schedule import MIN_LR_RATIO, Schedule
from training.tokenizer import fit_tokenizer, special_tokens

__all__ = [
    "OPTIMIZERS",
    "RUN_FIELDS",
    "TrainError",
    "TrainOptions",
    "backward_step",
    "check_options",
    "train",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TRAIN_RECORDS_PER_EPOCH = 10


# -- one step ------------------------------------------------------------------------------


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


@functools.cache
def onednn_bf16(cell: str) -> bool:
    """Whether this CPU's oneDNN runs `cell`'s recurrent layers under bfloat16 autocast. Its
    LSTM needs AVX-512: on an AVX2-only CPU oneDNN cannot create the bf16 primitive, and torch
    raises at the first forward (its GRU and RNN run there). PyTorch's own kernels,
    `--no-mkldnn`, run bf16 anywhere, many times slower than float32 on oneDNN."""
    with torch.random.fork_rng(devices=[]):  # the probe's initial weights draw from a fork
        layer = recurrent_layer(cell, 4, 4)
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = True  # type: ignore[assignment]  # a ContextProp
    try:
        with torch.autocast("cpu", torch.bfloat16):
            layer(torch.zeros(1, 2, 4))
    except RuntimeError:
        return False
    finally:
        torch.backends.mkldnn.enabled = before  # type: ignore[assignment]
    return True


def bf16_runs(cell: str, device: str, mkldnn: bool | None = None) -> bool:
    """Whether bf16 autocast can train `cell` on `device` with oneDNN on or off (`mkldnn`;
    None: torch's switch as it is)."""
    on = torch.backends.mkldnn.enabled if mkldnn is None else mkldnn
    return device != "cpu" or not on or onednn_bf16(cell)


def _check_bf16(o: TrainOptions) -> None:
    if o.bf16 and not bf16_runs(o.cell, o.device):
        raise TrainError(
            f"--bf16: this CPU's oneDNN has no bfloat16 {o.cell} kernel (it needs AVX-512): "
            "train in float32 (--no-bf16), or on PyTorch's own kernels (--no-mkldnn, many "
            "times slower)"
        )


# -- setup -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The corpus as token ids: whole splits, this rank's training rows and the eval streams."""

    corpus: Corpus
    tokenizer: Tokenizer
    splits: dict[str, torch.Tensor]  # split -> its ids as one stream, on the CPU
    train: torch.Tensor  # this rank's rows of the training stream `[batch, n]`
    valid: torch.Tensor  # `--eval-batch-size` contiguous streams
    test: torch.Tensor
    unk: int | None = None  # with --unk-replace: the <unk> id and the words seen once
    rare: torch.Tensor | None = None

    def for_epoch(self, epoch: int, o: TrainOptions) -> torch.Tensor:
        """The training rows of `epoch`: with --unk-replace, its words seen once as <unk>."""
        if self.rare is None or self.unk is None:
            return self.train
        return replace_rare(self.train, self.rare, self.unk, o.unk_replace, o.seed + epoch)


@dataclass
class Run:
    """What a run works with, set up once: options, data, the network and its optimizer."""

    o: TrainOptions
    out: Path
    epochs: int
    group: ddp.Group
    device: torch.device
    data: Data
    model: RNNLM  # the weights being trained
    best: RNNLM  # the best on validation so far
    net: nn.Module  # what runs the training forward: `model`, or DDP around it
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    clipper: Clipper
    n_windows: int  # BPTT windows per epoch
    train_args: dict  # the options as config.json records them

    @property
    def global_batch(self) -> int:
        return self.o.batch_size * self.group.world_size

    @property
    def record_every(self) -> int:
        """Windows between two `train` metrics records."""
        return max(1, self.n_windows // TRAIN_RECORDS_PER_EPOCH)

    def log(self, message: str) -> None:
        if self.group.is_main and not self.o.quiet:
            tqdm.write(message, file=sys.stderr)

    def initial_state(self) -> State:
        return self.model.initial_state(self.o.batch_size, self.device)


def resume_batch(o: TrainOptions, group: ddp.Group) -> tuple[TrainOptions, dict]:
    """The resumed run's training state, and the options with the per-process batch that
    splits its streams over this run's processes; a new run's options as they are."""
    if o.resume is None:
        return o, {}
    state = ckpt.load_train_state(o.resume)
    # The carried state covers every row of the stream: [layers, global batch, hidden].
    try:
        global_batch = int(state["hidden"][0].size(1))
    except (IndexError, AttributeError, TypeError) as e:
        raise ckpt.CheckpointError(
            f"{o.resume / ckpt.TRAIN_STATE_FILE}: the carried state is not a list of tensors ({e})"
        ) from e
    if global_batch % group.world_size:
        raise TrainError(
            f"--resume {o.resume}: its {global_batch} streams (the global batch) do not "
            f"split evenly over {group.world_size} processes; resume on a number of "
            f"processes that divides {global_batch}"
        )
    return replace(o, batch_size=global_batch // group.world_size), state


def load_tokenizer(
    o: TrainOptions, corpus: Corpus, saved_config: dict, group: ddp.Group
) -> Tokenizer:
    """The resumed run's tokenizer (its corpus unchanged), or one fitted on the training text:
    rank 0 fits the vocabulary and every rank uses that very tokenizer."""
    if o.resume is not None:
        tokenizer = _read_tokenizer(o.resume)
        saved_sha = saved_config.get("provenance", {}).get("corpus_sha256")
        if saved_sha != corpus.sha256:
            raise TrainError(
                f"--resume {o.resume}: the corpus changed since that run "
                f"(sha256 {corpus.sha256[:12]}..., the checkpoint has {str(saved_sha)[:12]}...)"
            )
        return tokenizer
    fitted: str | ValueError | None = None
    if group.is_main:
        try:
            fitted = fit_tokenizer(o.tokenizer, corpus.train, o.vocab_size).to_str()
        except ValueError as e:
            fitted = e
    fitted = ddp.from_main(fitted, group)
    if isinstance(fitted, ValueError):
        raise TrainError(str(fitted)) from fitted
    return Tokenizer.from_str(fitted)


def _read_tokenizer(directory: Path) -> Tokenizer:
    path = directory / ckpt.TOKENIZER_FILE
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path}: missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise ckpt.CheckpointError(f"{path}: not a tokenizers file ({e})") from e


def check_lengths(o: TrainOptions, corpus: Corpus, splits: dict, group: ddp.Group) -> None:
    """Every split long enough: one training batch, one held-out prediction."""

    def source(split: str) -> str:
        return f"--corpus {corpus.sources[split]}" if o.corpus else f"--{split} {getattr(o, split)}"

    need = o.batch_size * group.world_size * (o.bptt + 1)
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


def load_data(o: TrainOptions, saved_config: dict, group: ddp.Group, device: torch.device) -> Data:
    """Read and split the corpus, tokenize it and lay it out as streams."""
    corpus = load_corpus(o.corpus, o.train, o.valid, o.test, split=o.split)
    tokenizer = load_tokenizer(o, corpus, saved_config, group)
    splits = {name: encode(tokenizer, getattr(corpus, name)) for name in ("train", "valid", "test")}
    check_lengths(o, corpus, splits, group)
    train_rows = batchify(splits["train"], o.batch_size * group.world_size)
    unk, rare = None, None
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

    return Data(
        corpus=corpus,
        tokenizer=tokenizer,
        splits=splits,
        train=ddp.own_rows(train_rows, group).to(device),
        valid=eval_streams(splits["valid"]),
        test=eval_streams(splits["test"]),
        unk=unk,
        rare=rare,
    )


def setup(o: TrainOptions, saved_config: dict, group: ddp.Group) -> tuple[Run, dict]:
    """The run and, when resuming, the training state it continues from."""
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    device = ddp.device_for(group, o.device)
    o, resume_state = resume_batch(o, group)
    data = load_data(o, saved_config, group, device)
    epochs = o.epochs or DEFAULT_EPOCHS
    lr = o.lr if o.lr is not None else DEFAULT_LR[o.optimizer]
    if o.recurrent_norm is None:
        o = replace(o, recurrent_norm=default_limit(o.cell))

    torch.manual_seed(o.seed)
    random.seed(o.seed)
    np.random.seed(o.seed)
    config = model_config(o, data.tokenizer.get_vocab_size())
    regularization = Regularization(
        input_dropout=o.input_dropout,
        embed_dropout=o.embed_dropout,
        locked_dropout=o.locked_dropout,
        weight_drop=o.weight_drop,
    )
    model = RNNLM(config, regularization).to(device)
    best = RNNLM(config).to(device)
    cap_recurrent_norm(model, o.recurrent_norm or 0.0)  # a ReLU RNN: from rho x identity
    best.load_state_dict(model.state_dict())
    net = ddp.wrap(model, group, device)  # every rank now holds rank 0's initial weights
    n_windows = num_windows(data.train, o.bptt)
    run = Run(
        o=o,
        out=Path(o.out),  # type: ignore[arg-type]
        epochs=epochs,
        group=group,
        device=device,
        data=data,
        model=model,
        best=best,
        net=net,
        optimizer=make_optimizer(model, o, lr),
        schedule=make_schedule(o, lr, epochs * n_windows),
        clipper=make_clipper(o.clip),
        n_windows=n_windows,
        train_args=train_args(replace(o, epochs=epochs, lr=lr, out=None, resume=None)),
    )
    return run, resume_state


def make_optimizer(model: RNNLM, o: TrainOptions, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD over `model` at `lr`, with --weight-decay or the optimizer's default."""
    weight_decay = (
        o.weight_decay if o.weight_decay is not None else DEFAULT_WEIGHT_DECAY[o.optimizer]
    )
    kind = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.SGD
    return kind(model.parameters(), lr=lr, weight_decay=weight_decay)


def make_schedule(o: TrainOptions, lr: float, total_steps: int) -> Schedule:
    """The learning-rate schedule over `total_steps` (capped by --max-steps) or --max-minutes."""
    if o.max_steps is not None:
        total_steps = min(total_steps, o.max_steps)
    return Schedule(
        kind=o.schedule,
        lr=lr,
        min_lr=o.min_lr if o.min_lr is not None else lr * MIN_LR_RATIO,
        warmup_steps=o.warmup_steps,
        total_steps=total_steps,
        budget_s=None if o.max_minutes is None else o.max_minutes * 60,
    )


# -- where the run stands ------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run stands: the data position, the carried state, the best so far, the
    statistics and the metrics records. It saves itself with the run's optimizer, schedule,
    clipping and RNG states (`train_state`) and comes back from them (`resume`)."""

    hidden: State  # the carried recurrent state of this rank's rows
    epoch: int = 1
    window: int = 0  # the next BPTT window of the epoch
    step: int = 0
    tokens_seen: int = 0
    best_valid_loss: float = math.inf
    best_epoch: int | None = None
    meters: dict = field(default_factory=new_meters)
    metrics: list[dict] = field(default_factory=list)
    elapsed_before: float = 0.0  # the wall time of the invocations before this one
    started: float = field(default_factory=time.monotonic)
    # Training throughput of this invocation: optimizer steps only, evaluation excluded.
    run_tokens: int = 0
    run_seconds: float = 0.0

    def elapsed(self) -> float:
        """The run's wall time over all its invocations."""
        return self.elapsed_before + time.monotonic() - self.started

    def tokens_per_s(self) -> float | None:
        return self.run_tokens / self.run_seconds if self.run_seconds else None

    def advance(self, loss: float, tokens: int, gnorm: float, limit: float, seconds: float) -> None:
        """Count one optimizer step over `tokens` tokens."""
        self.step += 1
        self.window += 1
        self.tokens_seen += tokens
        self.run_tokens += tokens
        self.run_seconds += seconds
        for m in self.meters.values():
            meter_update(m, loss, tokens, gnorm, limit, seconds)

    def next_epoch(self, hidden: State) -> None:
        self.epoch, self.window, self.hidden = self.epoch + 1, 0, hidden
        self.meters = new_meters()

    def record(self, kind: str, **figures: object) -> None:
        """Append a metrics record stamped with the position."""
        position = {"kind": kind, "epoch": self.epoch, "step": self.step}
        self.metrics.append({**position, "tokens_seen": self.tokens_seen, **figures})

    def train_state(self, run: Run, best_weights: dict | None) -> dict:
        """What `train_state.pt` holds. Collective: every rank calls it (the state of all
        rows is gathered)."""
        return {
            "epoch": self.epoch,
            "window": self.window,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "hidden": [h.detach().cpu() for h in ddp.all_rows(self.hidden, run.group)],
            "best_valid_loss": self.best_valid_loss,
            "best_epoch": self.best_epoch,
            "best_weights": best_weights,
            "meters": self.meters,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.schedule.state_dict(),
            "clip": run.clipper.state_dict(),
            "rng": rng_state(),
            "elapsed_s": self.elapsed(),
        }

    @classmethod
    def resume(cls, run: Run, state: dict) -> Progress:
        """The progress saved in `run.o.resume`, with the run's weights, optimizer, schedule,
        clipping and RNG states put back as they were."""
        directory = run.o.resume
        assert directory is not None
        ckpt.load_weights(run.model, directory / ckpt.LAST_WEIGHTS_FILE)
        ckpt.load_weights(run.best, directory / ckpt.WEIGHTS_FILE)
        try:
            if state.get("best_weights") is not None:
                # The shipped weights were the ones at the stop; the recorded best is here.
                run.best.load_state_dict(state["best_weights"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.schedule.load_state_dict(state["scheduler"])
            run.clipper.load_state_dict(state.get("clip", {}))
            batch, rank = run.o.batch_size, run.group.rank
            rows = slice(rank * batch, (rank + 1) * batch)
            hidden = tuple(h[:, rows].to(run.device) for h in state["hidden"])
            if [h.shape for h in hidden] != [h.shape for h in run.initial_state()]:
                raise ValueError("the carried state does not match the model")
            set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ckpt.CheckpointError(
                f"{directory / ckpt.TRAIN_STATE_FILE}: does not fit this model ({e})"
            ) from e
        meters = state["meters"]
        for m in meters.values():  # a checkpoint from before some statistics existed
            for key, zero in new_meter().items():
                m.setdefault(key, zero)
        return cls(
            hidden=hidden,
            epoch=state["epoch"],
            window=state["window"],
            step=state["step"],
            tokens_seen=state["tokens_seen"],
            best_valid_loss=state["best_valid_loss"],
            best_epoch=state["best_epoch"],
            meters=meters,
            metrics=read_metrics(directory),
            elapsed_before=state["elapsed_s"],
        )


def start(run: Run, resume_state: dict) -> Progress:
    """The progress the loop starts from: the beginning, or exactly where the checkpoint
    stopped."""
    if run.o.resume is not None:
        progress = Progress.resume(run, resume_state)
    else:
        progress = Progress(hidden=run.initial_state())
    if not run.group.is_main:
        seed_rank(run.o.seed, run.group.rank, progress.step)
    return progress


# -- the loop ------------------------------------------------------------------------------


class StopSignals:
    """Ctrl-C or SIGTERM (what schedulers send to preempt a job; torchrun passes either on to
    its workers and kills them 30 s later) asks the loop to stop between two steps, like
    --max-minutes, so the saved state is one a resumed run continues exactly; a second signal
    aborts at once. Handlers are installed only in the main thread (Python's rule)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run: Run) -> None:
        self.run = run
        self.requested = False
        self._previous: list = []

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = [signal.signal(sig, self._on_signal) for sig in self.SIGNALS]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in zip(self.SIGNALS, self._previous, strict=False):
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.run.log("interrupted: stopping after this step to save (Ctrl-C again to abort)")


def before_step(run: Run, p: Progress, signals: StopSignals) -> tuple[str | None, float]:
    """Why to stop before the next step, if at all, and the schedule's clock (rank 0's elapsed
    time); in a distributed run every rank gets the same answers."""
    o = run.o
    late = o.max_minutes is not None and p.elapsed() >= o.max_minutes * 60
    clock = p.elapsed() if run.group.is_main else 0.0
    late_any, interrupted_any, clock = ddp.all_sum(
        [float(late), float(signals.requested), clock], run.group, run.device
    )
    if o.max_steps is not None and p.step >= o.max_steps:
        return "max_steps", clock
    if late_any:
        return "max_minutes", clock
    return ("interrupted" if interrupted_any else None), clock


def train_step(run: Run, p: Progress, data: torch.Tensor, clock: float) -> float:
    """One optimizer step on window `p.window` of `data`; returns its loss (all ranks')."""
    for g in run.optimizer.param_groups:
        g["lr"] = run.schedule.rate(p.step, clock)
    started = time.monotonic()
    x, y = get_batch(data, p.window, run.o.bptt)
    loss, gnorm, p.hidden = backward_step(
        run.model, x, y, p.hidden, run.clipper, net=run.net, bf16=run.o.bf16
    )
    group = run.group
    loss = ddp.all_sum([loss], group, run.device)[0] / group.world_size
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise TrainError(
            f"training diverged at step {p.step + 1} (epoch {p.epoch}): loss "
            f"{loss}, gradient norm {gnorm}; lower --lr or --clip"
        )
    run.optimizer.step()
    cap_recurrent_norm(run.model, run.o.recurrent_norm or 0.0)
    seconds = time.monotonic() - started
    p.advance(loss, y.numel() * group.world_size, gnorm, run.clipper.last, seconds)
    return loss


def train_epoch(run: Run, p: Progress, signals: StopSignals) -> str | None:
    """Train the rest of epoch `p.epoch`, window by window with the state carried; returns
    why it stopped before the epoch's end, or None at the end."""
    data = run.data.for_epoch(p.epoch, run.o)
    shown = run.group.is_main and not run.o.quiet
    desc = f"epoch {p.epoch}/{run.epochs}"
    bar = epoch_progress(run.n_windows, p.window, desc, run.record_every, shown)
    try:
        while p.window < run.n_windows:
            reason, clock = before_step(run, p, signals)
            if reason is not None:
                return reason
            loss = train_step(run, p, data, clock)
            rate = p.meters["epoch"]["tokens"] / max(p.meters["epoch"]["seconds"], 1e-9)
            bar.update(p.window, loss, rate)
            if p.window % run.record_every == 0 or p.window == run.n_windows:
                lr = run.optimizer.param_groups[0]["lr"]
                p.record("train", lr=lr, **meter_summary(p.meters["interval"]))
                p.meters["interval"] = new_meter()
    finally:
        bar.close()
    return None


def end_epoch(run: Run, p: Progress) -> None:
    """Validate, step the schedule, keep the best weights, log, and checkpoint."""
    valid_loss = evaluate(run.model, run.data.valid, run.o.bptt, run.group)
    lr = run.optimizer.param_groups[0]["lr"]
    improved = valid_loss < p.best_valid_loss
    run.schedule.validated(improved)
    if improved:
        p.best_valid_loss, p.best_epoch = valid_loss, p.epoch
        run.best.load_state_dict(run.model.state_dict())
    summary = meter_summary(p.meters["epoch"])
    ppl = perplexity(valid_loss)
    p.record("epoch", lr=lr, **summary, valid_loss=valid_loss, valid_perplexity=ppl,
             elapsed_s=p.elapsed())  # fmt: skip
    run.log(
        f"epoch {p.epoch:3d} | train loss {summary['train_loss']:.3f} | valid loss "
        f"{valid_loss:.3f} ppl {ppl:.2f} | grad norm mean {summary['grad_norm_mean']:.3f} max "
        f"{summary['grad_norm_max']:.3f} | lr {lr:.3g} | {summary['tokens_per_s'] or 0:.0f} tok/s"
    )
    p.next_epoch(run.initial_state())
    if p.epoch <= run.epochs:  # after the last epoch, the final save follows at once
        save(run, p, Figures(valid_loss=p.best_valid_loss), "running")


# -- the end and the checkpoint ------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """The held-out losses a checkpoint records for the weights it ships (None: not measured):
    in `--eval-batch-size` streams from the zero state (what chooses the weights), and each text
    as one document from the eos state (what the server's `Score` gives)."""

    valid_loss: float | None = None
    test_loss: float | None = None
    valid_document_loss: float | None = None
    test_document_loss: float | None = None

    def perplexities(self) -> dict:
        out: dict = {}
        for name in ("valid", "test", "valid_document", "test_document"):
            loss = getattr(self, f"{name}_loss")
            out[f"{name}_loss"] = loss
            out[f"{name}_perplexity"] = None if loss is None else perplexity(loss)
        return out


def choose_shipped(run: Run, p: Progress, stopped: str) -> tuple[RNNLM, float, str]:
    """The weights to ship, their validation loss and where they come from.

    Weights trained since the last validation (a run stopped mid-epoch) are validated too, and
    shipped if better than the best epoch; the recorded best stays the best epoch, so a resumed
    run picks its best exactly as an uninterrupted one would.
    """
    shipped, valid_loss, weights_from = run.best, p.best_valid_loss, f"epoch {p.best_epoch}"
    if p.window > 0 or p.best_epoch is None:
        current_loss = evaluate(run.model, run.data.valid, run.o.bptt, run.group)
        if current_loss < p.best_valid_loss:
            shipped, valid_loss = run.model, current_loss
            weights_from = f"step {p.step} ({stopped})"
    return shipped, valid_loss, weights_from


def measure(run: Run, shipped: RNNLM, valid_loss: float) -> Figures:
    """The shipped weights' test loss in streams, and (rank 0) both texts as documents."""
    o, data = run.o, run.data
    same = data.corpus.test_is_valid  # the nanoGPT split: the test text is the validation text
    test_loss = valid_loss if same else evaluate(shipped, data.test, o.bptt, run.group)
    eos = special_tokens(data.tokenizer, o.tokenizer).get("eos")
    if not run.group.is_main or eos is None:
        return Figures(valid_loss=valid_loss, test_loss=test_loss)
    valid_doc = score_document(shipped, data.splits["valid"].to(run.device), eos)
    test_doc = (
        valid_doc if same else score_document(shipped, data.splits["test"].to(run.device), eos)
    )
    return Figures(valid_loss, test_loss, valid_doc, test_doc)


def finish(run: Run, p: Progress, stopped: str) -> Path:
    """Choose the weights to ship, test them, log, and write the final checkpoint."""
    shipped, valid_loss, weights_from = choose_shipped(run, p, stopped)
    figures = measure(run, shipped, valid_loss)
    p.metrics.append(
        {
            "kind": "test",
            "epoch": p.epoch - 1,
            "step": p.step,
            "tokens_seen": p.tokens_seen,
            "best_epoch": p.best_epoch,
            "weights_from": weights_from,
            **figures.perplexities(),
            "train_tokens_per_s": p.tokens_per_s(),
        }
    )
    run.log(summary_line(run, p, stopped, weights_from, figures))
    save(run, p, figures, stopped, shipped, weights_from)
    o, data = run.o, run.data
    if o.continuous_cache and run.group.is_main:
        test_ids = None if data.corpus.test_is_valid else data.splits["test"].to(run.device)
        specials = special_tokens(data.tokenizer, o.tokenizer).values()
        never = tuple(i for i in specials if i is not None)
        block = tune_cache(shipped, data.splits["valid"].to(run.device), test_ids, never)
        write_cache_block(run.out, block)
        run.log(describe_cache(block))
    ddp.barrier(run.group)  # no rank returns before the checkpoint is complete
    return run.out


def summary_line(run: Run, p: Progress, stopped: str, weights_from: str, f: Figures) -> str:
    speed = f"{p.tokens_per_s():.0f} tok/s" if p.run_seconds else "no steps"
    ppl = f.perplexities()
    line = (
        f"done ({stopped}) after {p.step} steps | {speed} | weights from {weights_from} | valid "
        f"loss {f.valid_loss:.4f} ppl {ppl['valid_perplexity']:.2f} | test loss "
        f"{f.test_loss:.4f} ppl {ppl['test_perplexity']:.2f}"
    )
    if f.valid_document_loss is not None:
        line += (
            f" | as one document (as Score reads it): valid ppl "
            f"{ppl['valid_document_perplexity']:.2f} test ppl {ppl['test_document_perplexity']:.2f}"
        )
    return f"{line} | saved {run.out}"


def provenance(
    run: Run, p: Progress, figures: Figures, stopped: str, shipped: RNNLM, weights_from: str
) -> dict:
    """config.json's provenance: where the weights came from and what they score."""
    corpus = run.data.corpus
    return {
        "corpus_sha256": corpus.sha256,
        "corpus": corpus.sources,
        "split": run.o.split,
        "test_is_valid": corpus.test_is_valid,
        "tokens_seen": p.tokens_seen,
        "steps": p.step,
        "epochs_completed": p.epoch - 1,
        "best_epoch": p.best_epoch,
        "weights_from": weights_from,
        **figures.perplexities(),
        "recurrent_spectral_norm": spectral_norms(shipped),
        "split_tokens": {name: int(ids.numel()) for name, ids in run.data.splits.items()},
        "train_tokens_per_s": p.tokens_per_s(),
        "elapsed_s": p.elapsed(),
        "world_size": run.group.world_size,
        "global_batch": run.global_batch,
        "rank_divergence": ddp.divergence(run.model, run.group),
        "stopped": stopped,
        "torch_version": torch.__version__,
    }


def save(
    run: Run,
    p: Progress,
    figures: Figures,
    stopped: str,
    shipped: RNNLM | None = None,
    weights_from: str = "best epoch",
) -> None:
    """Checkpoint: every rank takes part (the state and the sync check are collective); rank 0
    writes. `shipped` (default: the best) becomes model.safetensors."""
    shipped = shipped or run.best
    state = p.train_state(run, None if shipped is run.best else run.best.state_dict())
    prov = provenance(run, p, figures, stopped, shipped, weights_from)
    if prov["rank_divergence"] > 0:
        raise TrainError(
            f"the processes' weights diverged (max |difference| {prov['rank_divergence']:.3g}"
            f" at step {p.step}); the distributed run is broken"
        )
    if run.group.is_main:
        save_checkpoint(
            run.out,
            run.model,
            shipped,
            run.data.tokenizer,
            run.o.tokenizer,
            prov,
            run.train_args,
            state,
            p.metrics,
        )


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
        plot_metrics(metrics, staged / PLOT_FILE, run_title(out.name, train_args))
        ckpt.write_config(
            staged, model.config, kind, special_tokens(tokenizer, kind), provenance, train_args
        )
        ckpt.replace_directory(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged)


# -- the run -----------------------------------------------------------------------------


def train(options: TrainOptions) -> Path:
    """Train (or resume) as `options` say; returns the checkpoint directory it wrote.

    Under torchrun every process calls this with the same options; each returns once rank 0
    has written the final checkpoint.
    """
    paths = {name: getattr(options, name) for name in PATH_FIELDS}
    o = replace(options, **{k: None if v is None else Path(v) for k, v in paths.items()})  # type: ignore[arg-type]

    # Everything that can fail on bad input happens before the first write.
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
    check_out(Path(o.out), o.resume)  # type: ignore[arg-type]
    group, created = ddp.join(o.device)
    mkldnn_before = torch.backends.mkldnn.enabled
    if o.mkldnn is not None:
        torch.backends.mkldnn.enabled = o.mkldnn  # type: ignore[assignment]  # a ContextProp
    try:
        _check_bf16(o)
        return _train(o, saved_config, group)
    finally:
        torch.backends.mkldnn.enabled = mkldnn_before  # type: ignore[assignment]
        ddp.leave(created)


def _train(o: TrainOptions, saved_config: dict, group: ddp.Group) -> Path:
    run, resume_state = setup(o, saved_config, group)
    progress = start(run, resume_state)
    stopped = "completed"
    with StopSignals(run) as signals:
        run.model.train()
        while progress.epoch <= run.epochs:
            reason = train_epoch(run, progress, signals)
            if reason is not None:
                stopped = reason
                break
            end_epoch(run, progress)
    return finish(run, progress, stopped)
