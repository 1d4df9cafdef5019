"""The training loop: truncated BPTT with teacher forcing, evaluation, exact resume.

Read top to bottom: options, setup (corpus, tokenizer, model, optimizer), the loop over epochs
and BPTT windows, evaluation, and the checkpoint directory written after every epoch and at the
end. Everything a run needs to continue bit for bit (weights, optimizer, LR schedule, RNG
states, data position and the carried recurrent state) is in that directory.
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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from training import checkpoint as ckpt
from training.data import (
    CorpusError,
    batchify,
    encode,
    get_batch,
    load_corpus,
    num_windows,
)
from training.model import CELLS, RNNLM, ModelConfig, State, detach_state
from training.plot import plot_metrics
from training.tokenizer import KINDS, fit_tokenizer, special_tokens

OPTIMIZERS = ("adamw", "sgd")
DEFAULT_EPOCHS = 10
DEFAULT_LR = {"adamw": 2e-3, "sgd": 20.0}
WEIGHT_DECAY = 0.01  # AdamW only
LR_DECAY = 0.25  # the LR is multiplied by this after an epoch that does not improve validation
EVAL_BATCH_SIZE = 10
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TRAIN_RECORDS_PER_EPOCH = 10


class TrainError(Exception):
    """A bad option or an impossible run; the message names the option and the value."""


@dataclass
class TrainOptions:
    """The `rnnlm train` flags, one field each (`--batch-size` is `batch_size`)."""

    out: Path | None = None  # required, except with `resume` (then it defaults to that directory)
    corpus: Path | None = None  # split by lines 90/5/5, or give train, valid and test
    train: Path | None = None
    valid: Path | None = None
    test: Path | None = None
    tokenizer: str = "word"
    vocab_size: int | None = None  # None: word 10000, char every character, bpe 4096
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embedding: int = 256
    dropout: float = 0.2
    tied: bool = False
    residual: bool = False
    bptt: int = 35
    batch_size: int = 20
    epochs: int | None = None  # None: 10 for a new run, the checkpoint's when resuming
    max_minutes: float | None = None  # stop (and save) after this much wall time
    max_steps: int | None = None  # stop (and save) after this many optimizer steps in all
    lr: float | None = None  # None: 2e-3 for adamw, 20 for sgd
    optimizer: str = "adamw"
    clip: float = 0.25  # gradient-norm clipping; 0 turns it off (the norm is still logged)
    seed: int = 1111
    resume: Path | None = None
    threads: int | None = None  # torch intra-op threads; None: torch's default
    device: str = "cpu"
    quiet: bool = False  # no progress bar and no per-epoch lines


PATH_FIELDS = ("out", "corpus", "train", "valid", "test", "resume")
# These describe the run's length and place, so a resumed run may change them; every other
# field comes from the checkpoint.
RUN_FIELDS = ("out", "resume", "epochs", "max_minutes", "max_steps", "threads", "device", "quiet")


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
    if o.tokenizer not in KINDS:
        raise bad("tokenizer", f"must be one of {', '.join(KINDS)}")
    if o.cell not in CELLS:
        raise bad("cell", f"must be one of {', '.join(CELLS)}")
    if o.optimizer not in OPTIMIZERS:
        raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    if o.device not in ("cpu", "cuda"):
        raise bad("device", "must be cpu or cuda")
    if o.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    for name in ("layers", "hidden", "embedding", "bptt", "batch_size"):
        if getattr(o, name) < 1:
            raise bad(name, "must be at least 1")
    for name in ("vocab_size", "epochs", "max_steps", "threads"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise bad(name, "must be at least 1")
    if not 0.0 <= o.dropout < 1.0:
        raise bad("dropout", "must be in [0, 1)")
    if o.lr is not None and not (o.lr > 0 and math.isfinite(o.lr)):
        raise bad("lr", "must be a positive number")
    if not (o.clip >= 0 and math.isfinite(o.clip)):
        raise bad("clip", "must be 0 (off) or a positive number")
    if o.max_minutes is not None and not o.max_minutes > 0:
        raise bad("max_minutes", "must be positive")


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
        if f.name not in saved:
            raise ckpt.CheckpointError(
                f"{directory / ckpt.CONFIG_FILE}: train_args lacks {f.name!r}"
            )
        value = saved[f.name]
        if f.name in PATH_FIELDS and value is not None:
            value = Path(value)
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


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Teacher forcing: cross-entropy of each next token given the true ones before it."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction
    )


def backward_step(
    model: RNNLM, x: torch.Tensor, y: torch.Tensor, state: State, clip: float
) -> tuple[float, float, State]:
    """Forward and backward over one window, gradients clipped; the optimizer step is left.

    Returns the loss, the gradient norm before clipping and the state to carry on.
    """
    # Truncated BPTT: keep the state's values, cut its graph to the previous window.
    state = detach_state(state)
    logits, state = model(x, state)
    loss = loss_fn(logits, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    # The norm before clipping: exploding or vanishing gradients show up here first.
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    return loss.item(), gnorm.item(), state


@torch.no_grad()
def evaluate(model: RNNLM, streams: torch.Tensor, bptt: int) -> float:
    """Mean negative log-likelihood per token over the streams, state carried throughout."""
    was_training = model.training
    model.eval()
    state = model.initial_state(streams.size(0), streams.device)
    total, count = 0.0, 0
    for i in range(num_windows(streams, bptt)):
        x, y = get_batch(streams, i, bptt)
        logits, state = model(x, state)
        total += loss_fn(logits, y, reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(loss)


# -- running statistics ------------------------------------------------------------------


def new_meter() -> dict:
    return {"loss_sum": 0.0, "tokens": 0, "steps": 0, "gnorm_sum": 0.0, "gnorm_max": 0.0}


def meter_update(m: dict, loss: float, tokens: int, gnorm: float) -> None:
    m["loss_sum"] += loss * tokens
    m["tokens"] += tokens
    m["steps"] += 1
    m["gnorm_sum"] += gnorm
    m["gnorm_max"] = max(m["gnorm_max"], gnorm)


def meter_summary(m: dict) -> dict:
    loss = m["loss_sum"] / max(m["tokens"], 1)
    return {
        "train_loss": loss,
        "train_perplexity": perplexity(loss),
        "grad_norm_mean": m["gnorm_sum"] / max(m["steps"], 1),
        "grad_norm_max": m["gnorm_max"],
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
    """Train (or resume) as `options` say; returns the checkpoint directory it wrote."""
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
    out = Path(o.out)  # type: ignore[arg-type]
    epochs = o.epochs or DEFAULT_EPOCHS
    lr = o.lr if o.lr is not None else DEFAULT_LR[o.optimizer]
    _check_out(out, o.resume)
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    device = torch.device(o.device)

    corpus = load_corpus(o.corpus, o.train, o.valid, o.test)
    if o.resume is not None:
        tokenizer = _load_tokenizer(o.resume)
        saved_sha = saved_config.get("provenance", {}).get("corpus_sha256")
        if saved_sha != corpus.sha256:
            raise TrainError(
                f"--resume {o.resume}: the corpus changed since that run "
                f"(sha256 {corpus.sha256[:12]}..., the checkpoint has {str(saved_sha)[:12]}...)"
            )
    else:
        try:
            tokenizer = fit_tokenizer(o.tokenizer, corpus.train, o.vocab_size)
        except ValueError as e:
            raise TrainError(str(e)) from e
    splits = {name: encode(tokenizer, getattr(corpus, name)) for name in ("train", "valid", "test")}

    def source(split: str) -> str:
        return f"--corpus {corpus.sources[split]}" if o.corpus else f"--{split} {getattr(o, split)}"

    need = o.batch_size * (o.bptt + 1)
    if splits["train"].numel() < need:
        raise CorpusError(
            f"{source('train')}: the training split is too short, {splits['train'].numel()} "
            f"tokens; --batch-size {o.batch_size} x (--bptt {o.bptt} + 1) = {need} are needed "
            "for one batch (use a longer corpus or a smaller --batch-size or --bptt)"
        )
    for name in ("valid", "test"):
        if splits[name].numel() < 2:
            raise CorpusError(
                f"{source(name)}: the {name} split is too short, {splits[name].numel()} "
                "token(s); at least 2 are needed to score one prediction"
            )
    train_data = batchify(splits["train"], o.batch_size).to(device)

    def eval_streams(ids: torch.Tensor) -> torch.Tensor:
        # Columns of at least one full window where the split is long enough.
        columns = max(1, min(EVAL_BATCH_SIZE, (ids.numel() - 1) // o.bptt))
        return batchify(ids, columns).to(device)

    valid_data, test_data = eval_streams(splits["valid"]), eval_streams(splits["test"])

    torch.manual_seed(o.seed)
    random.seed(o.seed)
    np.random.seed(o.seed)
    config = ModelConfig(
        cell=o.cell,
        vocab_size=tokenizer.get_vocab_size(),
        embedding=o.embedding,
        hidden=o.hidden,
        layers=o.layers,
        dropout=o.dropout,
        tied=o.tied,
        residual=o.residual,
    )
    model = RNNLM(config).to(device)
    best = RNNLM(config).to(device)
    best.load_state_dict(model.state_dict())
    if o.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY
        )
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=LR_DECAY, patience=0
    )

    # Where the loop starts: the beginning, or exactly where the checkpoint stopped.
    epoch, window, step, tokens_seen = 1, 0, 0, 0
    hidden: State = model.initial_state(o.batch_size, device)
    best_valid_loss, best_epoch = math.inf, None
    meters = {"epoch": new_meter(), "interval": new_meter()}
    elapsed_before = 0.0
    metrics: list[dict] = []
    if o.resume is not None:
        resume_state = ckpt.load_train_state(o.resume)
        ckpt.load_weights(model, o.resume / ckpt.LAST_WEIGHTS_FILE)
        ckpt.load_weights(best, o.resume / ckpt.WEIGHTS_FILE)
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            hidden = tuple(h.to(device) for h in resume_state["hidden"])
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
        elapsed_before = resume_state["elapsed_s"]
        metrics = read_metrics(o.resume)
    train_args = _train_args(replace(o, epochs=epochs, lr=lr, out=None, resume=None))
    n_windows = num_windows(train_data, o.bptt)
    record_every = max(1, n_windows // TRAIN_RECORDS_PER_EPOCH)

    def log(message: str) -> None:
        if not o.quiet:
            tqdm.write(message, file=sys.stderr)

    def state_dict() -> dict:
        return {
            "epoch": epoch,
            "window": window,
            "step": step,
            "tokens_seen": tokens_seen,
            "hidden": [h.detach().cpu() for h in hidden],
            "best_valid_loss": best_valid_loss,
            "best_epoch": best_epoch,
            "meters": meters,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "elapsed_s": elapsed_before + time.monotonic() - started,
        }

    def provenance(valid_loss: float | None, test_loss: float | None, stopped: str) -> dict:
        return {
            "corpus_sha256": corpus.sha256,
            "corpus": corpus.sources,
            "tokens_seen": tokens_seen,
            "steps": step,
            "epochs_completed": epoch - 1,
            "best_epoch": best_epoch,
            "valid_loss": valid_loss,
            "valid_perplexity": None if valid_loss is None else perplexity(valid_loss),
            "test_loss": test_loss,
            "test_perplexity": None if test_loss is None else perplexity(test_loss),
            "split_tokens": {name: int(ids.numel()) for name, ids in splits.items()},
            "stopped": stopped,
            "torch_version": torch.__version__,
        }

    def save(valid_loss: float | None, test_loss: float | None, stopped: str) -> None:
        save_checkpoint(
            out,
            model,
            best,
            tokenizer,
            o.tokenizer,
            provenance(valid_loss, test_loss, stopped),
            train_args,
            state_dict(),
            metrics,
        )

    # The loop. Ctrl-C stops it between two steps, like --max-minutes, so the saved state is
    # one a resumed run continues exactly; a second Ctrl-C aborts at once.
    interrupted = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        log("interrupted: stopping after this step to save (Ctrl-C again to abort)")

    started = time.monotonic()
    deadline = None if o.max_minutes is None else started + o.max_minutes * 60
    stopped = "completed"
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
    model.train()
    try:
        while epoch <= epochs:
            bar = tqdm(
                total=n_windows,
                initial=window,
                desc=f"epoch {epoch}/{epochs}",
                unit="batch",
                disable=o.quiet,
                leave=False,
                file=sys.stderr,
                mininterval=1.0,
            )
            epoch_started, epoch_tokens = time.monotonic(), 0
            while window < n_windows:
                if o.max_steps is not None and step >= o.max_steps:
                    stopped = "max_steps"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stopped = "max_minutes"
                    break
                if interrupted:
                    stopped = "interrupted"
                    break
                x, y = get_batch(train_data, window, o.bptt)
                loss_value, gnorm, hidden = backward_step(model, x, y, hidden, o.clip)
                if not (math.isfinite(loss_value) and math.isfinite(gnorm)):
                    raise TrainError(
                        f"training diverged at step {step + 1} (epoch {epoch}): loss "
                        f"{loss_value}, gradient norm {gnorm}; lower --lr or --clip"
                    )
                optimizer.step()
                step += 1
                window += 1
                tokens_seen += y.numel()
                epoch_tokens += y.numel()
                for m in meters.values():
                    meter_update(m, loss_value, y.numel(), gnorm)
                rate = epoch_tokens / max(time.monotonic() - epoch_started, 1e-9)
                bar.update()
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:.0f}", refresh=False)
                if window % record_every == 0 or window == n_windows:
                    metrics.append(
                        {
                            "kind": "train",
                            "epoch": epoch,
                            "step": step,
                            "tokens_seen": tokens_seen,
                            "lr": optimizer.param_groups[0]["lr"],
                            "tokens_per_s": rate,
                            **meter_summary(meters["interval"]),
                        }
                    )
                    meters["interval"] = new_meter()
            bar.close()
            if window < n_windows:
                break
            # End of an epoch: validate, schedule, keep the best, checkpoint.
            valid_loss = evaluate(model, valid_data, o.bptt)
            lr_used = optimizer.param_groups[0]["lr"]
            scheduler.step(valid_loss)
            if valid_loss < best_valid_loss:
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
                    "elapsed_s": elapsed_before + time.monotonic() - started,
                }
            )
            log(
                f"epoch {epoch:3d} | train loss {summary['train_loss']:.3f} | valid loss "
                f"{valid_loss:.3f} ppl {perplexity(valid_loss):.2f} | grad norm mean "
                f"{summary['grad_norm_mean']:.3f} max {summary['grad_norm_max']:.3f} | "
                f"lr {lr_used:.3g}"
            )
            epoch, window = epoch + 1, 0
            hidden = model.initial_state(o.batch_size, device)
            meters = {"epoch": new_meter(), "interval": new_meter()}
            if epoch <= epochs:  # after the last epoch, the final save below follows at once
                save(best_valid_loss, None, "running")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)

    # The end: test the best-on-validation weights. A run stopped before its first epoch ended
    # has no best yet; it ships its current weights, which are not recorded as a best, so a
    # resumed run still picks its best exactly as an uninterrupted one would.
    if best_epoch is None:
        best.load_state_dict(model.state_dict())
        valid_loss = evaluate(best, valid_data, o.bptt)
    else:
        valid_loss = best_valid_loss
    test_loss = evaluate(best, test_data, o.bptt)
    metrics.append(
        {
            "kind": "test",
            "epoch": epoch - 1,
            "step": step,
            "tokens_seen": tokens_seen,
            "best_epoch": best_epoch,
            "valid_loss": valid_loss,
            "valid_perplexity": perplexity(valid_loss),
            "test_loss": test_loss,
            "test_perplexity": perplexity(test_loss),
        }
    )
    log(
        f"done ({stopped}) after {step} steps | valid ppl {perplexity(valid_loss):.2f} | test loss "
        f"{test_loss:.3f} ppl {perplexity(test_loss):.2f} | saved {out}"
    )
    save(valid_loss, test_loss, stopped)
    return out
