"""Experiment behind docs/typing.md's "distillation": a smaller character model trained on, or
without, the shipped model's soft targets, for the same time.

Starts from the run directory FROM (a `rnnlm train` checkpoint of a character model with the
shipped bundle's tokenizer, for example `--preset char-small --hidden 256`) and trains it
MINUTES more on nanoGPT's training split of the corpus (batch 32 x 64, AdamW with a cosine
from 1e-3 to 0, clipping at 1, one thread). With `distill`, its loss is half the text's
next-character loss and half the KL divergence from the teacher's next-character
distribution (the shipped bundle's int8 step graph, its state carried from window to window);
with `plain`, the text's alone, for the paired run. Writes a run directory OUT (FROM's config
and tokenizer, the new weights) that `rnnlm export` reads. Not the trainer: a short loop for
one measurement.

    PYTHONPATH=. python scripts/char_distill.py distill FROM MINUTES OUT [--corpus FILE]
    rnnlm export OUT OUT-bundle --quantize int8 --lexicon TRAIN_TEXT
    PYTHONPATH=. python scripts/typing_inproc.py --bundle OUT-bundle --text VALIDATION_TEXT \\
        --lines 200 --word-cache --fewest-keys
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from server.bundle import load_bundle
from server.engine import EngineConfig
from server.runner import session_options
from training.checkpoint import load_checkpoint, save_weights
from training.data import batchify, encode, get_batch, nanogpt_split, num_windows

BATCH, BPTT, LR = 32, 64, 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["distill", "plain"])
    parser.add_argument("start", type=Path, help="the student's run directory")
    parser.add_argument("minutes", type=float)
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--corpus", type=Path, default=Path("../shared/data/tinyshakespeare/input.txt")
    )
    parser.add_argument("--teacher", type=Path, default=Path("models/shakespeare-char"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = load_checkpoint(args.start)
    model = student.model
    model.train()
    ids = encode(Tokenizer.from_file(str(student.tokenizer_path)), nanogpt_split(args.corpus).train)
    streams = batchify(ids, BATCH)
    windows = num_windows(streams, BPTT)
    bundle = load_bundle(args.teacher)
    teacher = bundle.open_session("step", session_options(EngineConfig()), ["CPUExecutionProvider"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    start, budget = time.monotonic(), args.minutes * 60
    steps = 0
    while (spent := time.monotonic() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * spent / budget))
        if steps % windows == 0:  # each pass over the text starts both states afresh
            state = model.initial_state(BATCH)
            taught = [z.copy() for z in bundle.zero_state(BATCH)]
        x, y = get_batch(streams, steps % windows, BPTT)
        logits, state = model(x, tuple(s.detach() for s in state))
        logprobs = F.log_softmax(logits.float(), -1).flatten(0, 1)
        loss = F.nll_loss(logprobs, y.flatten())
        if args.mode == "distill":
            feeds = dict(zip([s.input for s in bundle.state], taught, strict=True))
            feeds["tokens"] = x.numpy().astype(np.int64)
            teacher_logits, _, *taught = teacher.run(None, feeds)
            target = F.log_softmax(torch.from_numpy(teacher_logits), -1).flatten(0, 1)
            kl = F.kl_div(logprobs, target, log_target=True, reduction="batchmean")
            loss = 0.5 * loss + 0.5 * kl
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.start, args.out)
    save_weights(model.eval(), args.out / "model.safetensors")
    print(f"{args.mode}: {steps} steps in {args.minutes:g} minutes -> {args.out}")


if __name__ == "__main__":
    main()
