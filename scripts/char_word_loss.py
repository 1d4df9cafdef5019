"""Experiment behind docs/typing.md's "a character model trained with a next-word loss": the
shipped character recipe (2 x 512 LSTM, embedding 64, dropout 0.25, AdamW at 4e-3 with a
cosine to a tenth, batch 32 x 64, bf16, one thread) for a fixed time, with a linear head over
the bundle's lexicon words at every word start whose loss is added with weight LAMBDA (0: the
recipe alone, for the paired run). Writes a checkpoint directory that `rnnlm export` reads
(the head is not part of it). Not the trainer: a short loop for one measurement.

    PYTHONPATH=. python scripts/char_word_loss.py OUT MINUTES LAMBDA
    rnnlm export OUT OUT-bundle --lexicon models/shakespeare-char/lexicon.txt
    PYTHONPATH=. python scripts/typing_inproc.py --bundle OUT-bundle --text VALIDATION_TEXT \\
        --lines 200 --word-cache --fewest-keys

(VALIDATION_TEXT: input.txt less its last 5 % of lines, so that the typist types the 5 %
before them.)
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from training.checkpoint import save_weights, write_config
from training.data import batchify, get_batch, num_windows
from training.model import RNNLM, ModelConfig
from training.schedule import MIN_LR_RATIO, Schedule

BUNDLE = Path("models/shakespeare-char")
CORPUS = Path("../shared/data/tinyshakespeare/input.txt")
BATCH, BPTT, LR = 32, 64, 4e-3


def word_targets(text: str, lexicon: list[str]) -> np.ndarray:
    """At each position, the lexicon id of the word that starts at the next one (else -1)."""
    ids = {w: i for i, w in enumerate(lexicon)}
    out = np.full(len(text), -1, dtype=np.int64)
    for m in re.finditer(r"[\w'\u2019]+", text):
        if m.start() > 0:
            out[m.start() - 1] = ids.get(m.group(), -1)
    return out


def evaluate(model: RNNLM, x: torch.Tensor) -> float:
    """Validation loss a character (the head's is not counted)."""
    model.eval()
    total, count = 0.0, 0
    state = model.initial_state(x.size(0))
    with torch.no_grad():
        for window in range(num_windows(x, 256)):
            tokens, nexts = get_batch(x, window, 256)
            features, state = model.features(tokens, state)
            nll = model.nll(features, nexts)
            total, count = total + nll.sum().item(), count + nll.numel()
    model.train()
    return total / count


def main() -> None:
    out, minutes, weight = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(1111)
    torch.set_num_threads(1)
    text = CORPUS.read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_file(str(BUNDLE / "tokenizer.json"))
    ids = np.array(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    lexicon = [w for w in (BUNDLE / "lexicon.txt").read_text(encoding="utf-8").split("\n") if w]
    targets = word_targets(text, lexicon)
    split = int(len(text) * 0.9)  # nanoGPT's split, as the shipped model's
    vocab = json.loads((BUNDLE / "manifest.json").read_text())["architecture"]["vocab_size"]
    config = ModelConfig(cell="lstm", vocab_size=vocab, embedding=64, hidden=512, dropout=0.25)
    model, head = RNNLM(config), nn.Linear(512, len(lexicon))
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    x = batchify(torch.from_numpy(ids[:split]), BATCH)
    w = batchify(torch.from_numpy(targets[:split]), BATCH)
    vx = batchify(torch.from_numpy(ids[split:]), 10)
    budget = minutes * 60
    schedule = Schedule("cosine", LR, LR * MIN_LR_RATIO, 50, 1 << 30, budget)
    start, step, window, best = time.time(), 0, 0, math.inf
    state, checked = model.initial_state(BATCH), start
    while time.time() - start < budget:
        if window == num_windows(x, BPTT):
            window, state = 0, model.initial_state(BATCH)
        tokens, nexts = get_batch(x, window, BPTT)
        words = w[:, window * BPTT : window * BPTT + tokens.size(1)]
        window += 1
        for group in opt.param_groups:
            group["lr"] = schedule.rate(step, time.time() - start)
        state = tuple(s.detach() for s in state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features, state = model.features(tokens, state)
            loss = model.nll(features, nexts).mean()
            at = words >= 0
            if weight > 0 and at.any():
                dropped = F.dropout(features[at], 0.25, training=True)
                loss = loss + weight * F.cross_entropy(head(dropped).float(), words[at])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if time.time() - checked > 300 or time.time() - start >= budget:
            checked, valid = time.time(), evaluate(model, vx)
            print(f"{(checked - start) / 60:.1f} min, step {step}: valid {valid:.4f}", flush=True)
            if valid < best:
                best = valid
                out.mkdir(parents=True, exist_ok=True)
                save_weights(model, out / "model.safetensors")
    provenance = {"valid_loss": best, "valid_perplexity": math.exp(best), "steps": step}
    write_config(out, config, "char", {"unk": 0, "eos": 1}, provenance, {"word_loss": weight})
    shutil.copy(BUNDLE / "tokenizer.json", out / "tokenizer.json")
    print(f"best valid {best:.4f} after {step} steps")


if __name__ == "__main__":
    main()
