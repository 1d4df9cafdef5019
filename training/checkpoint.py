"""The checkpoint directory: the contract between the trainer and the exporter.

A checkpoint directory holds

- `config.json`: format version, the `ModelConfig`, the tokenizer kind and special token ids,
  the training arguments and provenance (corpus sha256, tokens seen, validation and test
  perplexity), and the continuous cache's tuned settings and figures when it was tuned
  (`training/cache.py`);
- `model.safetensors`: the best-on-validation weights (what the exporter exports);
- `tokenizer.json`: the Hugging Face `tokenizers` file;
- `last.safetensors` and `train_state.pt`: the latest weights and the optimizer, schedule, RNG
  and data position, for `--resume`.

Nothing here unpickles arbitrary objects: weights are safetensors, and the training state is
read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from training.model import RNNLM, ModelConfig

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
LAST_WEIGHTS_FILE = "last.safetensors"
TRAIN_STATE_FILE = "train_state.pt"


class CheckpointError(Exception):
    """A checkpoint directory is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode and the metadata the exporter needs."""

    path: Path
    model: RNNLM
    config: ModelConfig
    tokenizer_path: Path
    tokenizer_kind: str
    special_tokens: dict[str, int | None]
    provenance: dict = field(default_factory=dict)
    train_args: dict = field(default_factory=dict)
    continuous_cache: dict | None = None  # the cache training/cache.py tuned, if any


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (it does not exist)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {directory} a checkpoint directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {data.get('format')!r}, expected {CHECKPOINT_FORMAT}"
        )
    for key in ("model", "tokenizer"):
        if key not in data:
            raise CheckpointError(f"{path}: missing the {key!r} section")
    return data


def load_weights(model: RNNLM, path: Path) -> None:
    """Load safetensors weights into `model`, naming the file in any error."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    target = _on_cpu(model)
    try:
        missing, unexpected = safetensors.torch.load_model(target, str(path), strict=False)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: cannot be read as safetensors weights ({e})") from e
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model in config.json "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    if target is not model:
        model.load_state_dict(target.state_dict())


def save_weights(model: RNNLM, path: Path) -> None:
    """Write `model`'s weights, tied ones once."""
    safetensors.torch.save_model(_on_cpu(model), str(path))


def _on_cpu(model: RNNLM) -> RNNLM:
    """`model`, or a CPU copy of it when it is on a GPU: there cuDNN packs an RNN's weights
    into one buffer, whose views safetensors refuses to save or load as separate tensors."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).cpu()


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Rebuild the best-on-validation model of a checkpoint directory, in eval mode."""
    directory = Path(directory)
    data = read_config(directory)
    try:
        config = ModelConfig.from_dict(data["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model section ({e})") from e
    model = RNNLM(config)
    load_weights(model, directory / WEIGHTS_FILE)
    model.eval()
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path}: missing")
    tok = data["tokenizer"]
    return Checkpoint(
        path=directory,
        model=model,
        config=config,
        tokenizer_path=tokenizer_path,
        tokenizer_kind=tok.get("kind", "unknown"),
        special_tokens=dict(tok.get("special_tokens", {})),
        provenance=dict(data.get("provenance", {})),
        train_args=dict(data.get("train_args", {})),
        continuous_cache=data.get("continuous_cache"),
    )


def write_config(
    directory: Path,
    config: ModelConfig,
    tokenizer_kind: str,
    special_tokens: dict[str, int | None],
    provenance: dict,
    train_args: dict,
) -> None:
    data = {
        "format": CHECKPOINT_FORMAT,
        "model": config.to_dict(),
        "tokenizer": {"kind": tokenizer_kind, "special_tokens": special_tokens},
        "provenance": provenance,
        "train_args": train_args,
    }
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")


def torch_load_safe(path: Path) -> dict:
    """Read a training-state file without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a training state ({e})") from e


# What `train_state.pt` must hold; a file without them is not a training state of this format.
TRAIN_STATE_KEYS = (
    "epoch",
    "window",
    "step",
    "tokens_seen",
    "hidden",
    "best_valid_loss",
    "best_epoch",
    "meters",
    "optimizer",
    "scheduler",
    "rng",
    "elapsed_s",
)


def load_train_state(directory: Path) -> dict:
    """The resumable training state of a checkpoint directory, checked for completeness."""
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; only a checkpoint written by training resumes")
    state = torch_load_safe(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (a {type(state).__name__})")
    missing = [key for key in TRAIN_STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a complete training state (missing {missing})")
    return state


def replace_directory(staged: Path, target: Path) -> None:
    """Put the complete directory `staged` at `target`, replacing what is there.

    Both are renames on one file system, so `target` is always either the old complete
    directory or the new one, never a half-written mix.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staged.rename(target)
    if old is not None:
        shutil.rmtree(old)
