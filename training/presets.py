"""Named recipes: `--preset NAME` sets these `TrainOptions` fields; flags given explicitly win.

- `pytorch-examples`: the defaults of pytorch/examples `word_language_model/main.py`, the
  baseline our word recipe is measured against: a 2-layer tied LSTM of 200 units, dropout 0.2,
  plain SGD at lr 20 divided by 4 whenever validation does not improve, clipping at 0.25, BPTT
  35, batch 20, evaluation in 10 streams, 40 epochs, seed 1111.
- `word-small`: our word-level recipe for a 10-minute CPU budget, the best measured: the
  pytorch-examples model and SGD at lr 20, with the rate decayed along a cosine timed to the
  budget down to 1 (the plateau rule never fires within 10 minutes), dropout 0.35, the words
  seen once in training replaced by `<unk>` (so the model learns how often unseen words come),
  bf16 autocast for speed, and a continuous cache tuned on the validation text after training
  (the server's `Score` mixes it in on request).
- `word-awd`: the AWD-LSTM recipe cut to the same budget (AdamW with warm-up and cosine, a
  2 x 512 LSTM projected to a 256 tied embedding, embedding, locked and weight-drop dropout).
  Kept as measured: worse than `word-small` in 10 minutes (docs/training.md).
- `char-small`: character level on nanoGPT's split for a 3-minute budget: a small, fast LSTM in
  bf16 autocast, AdamW, cosine to the budget.
- `char-medium`: the same for a 30-minute budget: a wider, deeper residual LSTM with locked
  dropout and weight-drop, long BPTT windows.

The time-budget presets set a large epoch count, so `--max-minutes` is what ends them; give
`--max-minutes` to change the budget, and the cosine schedule follows it. docs/training.md has
the measured results and the commands that reproduce them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from training.train import TrainError, TrainOptions, bf16_runs

# pytorch/examples word_language_model's defaults; `word-small` is these plus its changes.
PYTORCH_EXAMPLES: dict[str, Any] = {
    "tokenizer": "word",
    "cell": "lstm",
    "layers": 2,
    "embedding": 200,
    "hidden": 200,
    "tied": True,
    "dropout": 0.2,
    "optimizer": "sgd",
    "lr": 20.0,
    "weight_decay": 0.0,
    "schedule": "plateau",
    "clip": 0.25,
    "bptt": 35,
    "batch_size": 20,
    "eval_batch_size": 10,
    "epochs": 40,
    "seed": 1111,
}

PRESETS: dict[str, dict[str, Any]] = {
    "pytorch-examples": PYTORCH_EXAMPLES,
    "word-small": {
        **PYTORCH_EXAMPLES,
        "dropout": 0.35,
        "unk_replace": 1.0,
        "continuous_cache": True,
        "schedule": "cosine",
        "min_lr": 1.0,
        "bf16": True,
        "epochs": 1000,
        "max_minutes": 10.0,
    },
    "word-awd": {
        "tokenizer": "word",
        "cell": "lstm",
        "layers": 2,
        "embedding": 256,
        "hidden": 512,
        "tied": True,
        "dropout": 0.4,
        "input_dropout": 0.5,
        "embed_dropout": 0.1,
        "locked_dropout": True,
        "weight_drop": 0.3,
        "optimizer": "adamw",
        "lr": 3e-3,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_steps": 100,
        "clip": "auto",
        "bf16": True,
        "bptt": 35,
        "batch_size": 32,
        "eval_batch_size": 10,
        "epochs": 1000,
        "max_minutes": 10.0,
        "seed": 1111,
    },
    "char-small": {
        "tokenizer": "char",
        "split": "nanogpt",
        "cell": "lstm",
        "layers": 2,
        "embedding": 64,
        "hidden": 384,
        "dropout": 0.1,
        "optimizer": "adamw",
        "lr": 4e-3,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_steps": 50,
        "clip": "auto",
        "bf16": True,
        "bptt": 64,
        "batch_size": 32,
        "eval_batch_size": 10,
        "epochs": 1000,
        "max_minutes": 3.0,
        "seed": 1111,
    },
    "char-medium": {
        "tokenizer": "char",
        "split": "nanogpt",
        "cell": "lstm",
        "layers": 3,
        "embedding": 128,
        "hidden": 512,
        "residual": True,
        "dropout": 0.25,
        "locked_dropout": True,
        "weight_drop": 0.2,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "warmup_steps": 200,
        "clip": "auto",
        "bf16": True,
        "bptt": 128,
        "batch_size": 64,
        "eval_batch_size": 10,
        "epochs": 1000,
        "max_minutes": 30.0,
        "seed": 1111,
    },
}


def preset_options(
    name: str | None, given: dict[str, Any], note: Callable[[str], None] | None = None
) -> TrainOptions:
    """The options of preset `name` (none: the defaults) with the `given` fields on top.

    A preset's bf16 autocast is for speed: where it cannot run (a CPU whose oneDNN has no
    bfloat16 kernel, `bf16_runs`), the preset trains in float32, and says so to `note`,
    unless `given` asks for bf16 itself (then `train` refuses, naming the flag)."""
    if name is None:
        return TrainOptions(**given)
    if name not in PRESETS:
        raise TrainError(f"--preset {name!r}: unknown; the presets are {', '.join(PRESETS)}")
    o = TrainOptions(**{**PRESETS[name], **given, "preset": name})
    if o.bf16 and "bf16" not in given and not bf16_runs(o.cell, o.device, o.mkldnn):
        if note is not None:
            note(
                f"--preset {name} trains in float32 here: this CPU's oneDNN has no bfloat16 "
                f"kernel for its {o.cell} cell (an LSTM's needs AVX-512)"
            )
        return replace(o, bf16=False)
    return o
