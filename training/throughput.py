"""Training tokens/s: the pytorch/examples word_language_model loop against `rnnlm train`.

    python -m training.throughput --corpus FILE [--steps N] [--threads N] [-- TRAIN FLAGS]

Both train the `pytorch-examples` preset's model (2-layer tied LSTM, 200 units, BPTT 35, batch
20) on the same word tokens for the same number of steps. The baseline is that project's model
and loop as written in its main.py: a sequence-first multi-layer `nn.LSTM`, log-softmax with
NLL loss, clipping, and the SGD update by hand. Ours is `train()` itself with the preset, plus
the flags after `--` (`--bf16`, `--no-mkldnn`, `--threads`, a larger `--batch-size`, ...); its
rate is the one the trainer logs (optimizer steps only, evaluation excluded). Both time the
same span of each step: batch, forward, backward, clipping and update, and both leave out their
first `--warmup` steps, which are several times slower (oneDNN builds its kernels, the
allocator grows): ours by training that many steps, then resuming for the timed ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.cli import configure
from training.data import batchify, encode, load_corpus
from training.presets import PRESETS, preset_options
from training.tokenizer import fit_tokenizer
from training.train import TrainOptions, train

BASELINE = PRESETS["pytorch-examples"]


class ExamplesModel(nn.Module):
    """pytorch/examples word_language_model `RNNModel` for an LSTM, as in its model.py."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, tokens: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple]:
        emb = self.drop(self.encoder(tokens))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[Tensor, Tensor]:
        return (
            torch.zeros(self.nlayers, bsz, self.nhid),
            torch.zeros(self.nlayers, bsz, self.nhid),
        )


def examples_tokens_per_s(ids: Tensor, vocab: int, steps: int, warmup: int) -> float:
    """The main.py `train()` loop: `warmup` batches, then the tokens per second of `steps`."""
    b = BASELINE
    torch.manual_seed(b["seed"])
    model = ExamplesModel(vocab, b["embedding"], b["hidden"], b["layers"], b["dropout"])
    model.train()
    # main.py's batchify: [n, batch] columns, time first.
    data = batchify(ids, b["batch_size"]).t().contiguous()
    bptt, lr, clip = b["bptt"], b["lr"], b["clip"]
    criterion = nn.NLLLoss()
    hidden: tuple[Tensor, ...] = model.init_hidden(b["batch_size"])
    tokens, seconds, i = 0, 0.0, 0
    for step in range(warmup + steps):
        if i >= data.size(0) - 1:
            i, hidden = 0, model.init_hidden(b["batch_size"])
        started = time.perf_counter()
        seq_len = min(bptt, len(data) - 1 - i)
        x, y = data[i : i + seq_len], data[i + 1 : i + 1 + seq_len].reshape(-1)
        model.zero_grad()
        hidden = tuple(h.detach() for h in hidden)
        output, hidden = model(x, hidden)
        loss = criterion(output, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-lr)
        loss.item()
        if step >= warmup:
            seconds += time.perf_counter() - started
            tokens += y.numel()
        i += seq_len
    return tokens / seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m training.throughput", description=__doc__)
    parser.add_argument("--corpus", type=Path, required=True, help="word-level text to train on")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (default 200)")
    parser.add_argument(
        "--warmup", type=int, default=20, help="untimed steps before them (default 20)"
    )
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    train_parser = argparse.ArgumentParser(prog="rnnlm train flags")
    configure(train_parser)
    given = vars(train_parser.parse_args(ours_argv))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        given.setdefault("threads", args.threads)

    corpus = load_corpus(args.corpus)
    tokenizer = fit_tokenizer("word", corpus.train)
    ids = encode(tokenizer, corpus.train)
    baseline = examples_tokens_per_s(ids, tokenizer.get_vocab_size(), args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        run = {"corpus": args.corpus, "out": Path(tmp) / "run", "max_steps": args.warmup}
        warm = train(preset_options("pytorch-examples", {**run, "quiet": True, **given}))
        # A resume keeps the model's options, not the run's switches: they go again.
        resumed = {k: given[k] for k in ("threads", "mkldnn") if k in given}
        out = train(
            TrainOptions(resume=warm, max_steps=args.warmup + args.steps, quiet=True, **resumed)
        )
        ours = json.loads((out / "config.json").read_text())["provenance"]["train_tokens_per_s"]
    result = {
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "pytorch_examples_tokens_per_s": baseline,
        "rnnlm_tokens_per_s": ours,
        "rnnlm_flags": ours_argv,
        "speedup": ours / baseline,
    }
    print(f"pytorch/examples loop: {baseline:9.0f} tokens/s")
    print(f"rnnlm train {' '.join(ours_argv) or '(preset only)'}: {ours:9.0f} tokens/s")
    print(f"speed-up: {ours / baseline:.2f}x  ({torch.get_num_threads()} threads)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
