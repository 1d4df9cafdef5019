"""Tune a trained model's continuous cache on validation text, and measure it on test text.

The cache (`server/continuous_cache.py`, Grave et al. 2017) mixes the model's next-token
probability with a recall of the tokens that followed similar contexts earlier in the same
text. It has three settings and no weights: this module scores the validation text once in one
stream with the state carried (as the server's `Score` reads a document), tries every setting
of a small grid on it with the server's own implementation, and records the best with its
validation and test perplexities, with and without the cache, in the checkpoint's
`config.json` (`continuous_cache`), which the exporter copies into the bundle manifest.

`rnnlm train --continuous-cache` runs it at the end of training; for an existing checkpoint:

    python -m training.cache runs/word-small [--corpus FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from server.continuous_cache import CacheParams, ContinuousCache, mix
from training import checkpoint as ckpt
from training.data import CorpusError, encode, load_corpus
from training.model import RNNLM

WINDOWS = (100, 200, 500, 1000, 2000)
THETAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
CHUNK = 256  # positions per forward and per cache recall
SUGGESTIONS = (1, 3, 5)  # the k of the suggestion accuracy


def _chunks(model: RNNLM, ids: torch.Tensor):
    """(features, logits, targets) of one stream of ids, `CHUNK` positions at a time, the state
    carried, in eval mode."""
    was_training = model.training
    model.eval()
    tokens, targets = ids[:-1].view(1, -1), ids[1:].view(1, -1)
    state = model.initial_state(1, ids.device)
    try:
        with torch.no_grad():
            for start in range(0, tokens.size(1), CHUNK):
                x, y = tokens[:, start : start + CHUNK], targets[:, start : start + CHUNK]
                f, state = model.features(x, state)
                yield f[0].float(), model.logits(f)[0].float(), y[0]
    finally:
        model.train(was_training)


def document_outputs(model: RNNLM, ids: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Features `[T, H]`, target log-probs `[T]` and targets `[T]` of one stream of ids."""
    features, logprobs, targets = [], [], []
    for f, logits, y in _chunks(model, ids):
        features.append(f.cpu().numpy())
        lp = F.log_softmax(logits, dim=-1).gather(-1, y[:, None])[:, 0]
        logprobs.append(lp.cpu().numpy())
        targets.append(y.cpu().numpy())
    return np.concatenate(features), np.concatenate(logprobs), np.concatenate(targets)


def test_figures(
    model: RNNLM, ids: torch.Tensor, params: CacheParams, never: tuple[int, ...], ks=SUGGESTIONS
) -> dict:
    """One pass over held-out `ids`: perplexity with and without the cache, and the suggestion
    accuracy, how often the next token is among the k most likely (predictive typing's figure).
    Like the server's suggestions, the `never` ids (eos, `<unk>`) are not suggested, and the
    positions whose next token is one of them not counted for accuracy."""
    never_ids = torch.tensor(never, dtype=torch.long)
    hits = {"without": np.zeros(len(ks)), "with": np.zeros(len(ks))}
    nll = {"without": 0.0, "with": 0.0}
    counted = scored = 0
    cache: ContinuousCache | None = None
    for f, logits, y in _chunks(model, ids):
        if cache is None:
            cache = ContinuousCache(params.window, params.theta, f.shape[1])
        weights, values, seen = cache.attend(f.cpu().numpy(), y.cpu().numpy())
        p_model = torch.softmax(logits, dim=-1).double()
        p_cache = torch.zeros_like(p_model)
        # Each pair's weight into its token's column, row by row.
        p_cache.index_add_(1, torch.from_numpy(values), torch.from_numpy(weights).double())
        mixed = (1 - params.lam) * p_model + params.lam * p_cache
        rows = torch.arange(len(y))
        picked = {"without": p_model[rows, y], "with": mixed[rows, y]}
        # Where the cache held nothing the model stands alone, as in `mix`.
        picked["with"] = torch.where(torch.tensor(seen), picked["with"], picked["without"])
        for name, p in picked.items():
            nll[name] -= float(p.log().sum())
        scored += len(y)
        keep = ~torch.isin(y, never_ids)
        counted += int(keep.sum())
        for name, p in (("without", p_model), ("with", mixed)):
            p[:, never_ids] = -1.0
            top = p.topk(max(ks), dim=-1).indices[keep]
            found = top == y[keep, None]
            hits[name] += [int(found[:, :k].any(dim=-1).sum()) for k in ks]
    return {
        "perplexity": math.exp(nll["with"] / max(scored, 1)),
        "perplexity_without": math.exp(nll["without"] / max(scored, 1)),
        "suggestion_accuracy": {
            "k": list(ks),
            "positions": counted,
            **{name: (h / max(counted, 1)).tolist() for name, h in hits.items()},
        },
    }


def _recalled(outputs: tuple[np.ndarray, ...], window: int, theta: float) -> tuple[np.ndarray, ...]:
    """`p_cache` and `seen` of every position, fed in chunks as the server feeds a document."""
    features, _, targets = outputs
    cache = ContinuousCache(window, theta, features.shape[1])
    parts = [
        cache.recall(features[i : i + CHUNK], targets[i : i + CHUNK])
        for i in range(0, len(targets), CHUNK)
    ]
    return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])


def _mean_nll(logprobs: np.ndarray) -> float:
    return -float(np.mean(logprobs, dtype=np.float64))


def tune(
    model: RNNLM, valid: torch.Tensor, test: torch.Tensor | None, never: tuple[int, ...] = ()
) -> dict | None:
    """The grid's best setting on `valid`, with its figures (and `test`'s when given: its
    perplexity and suggestion accuracy, `never` suggesting those ids); None when no setting
    lowers validation perplexity (a cache that does not help is not shipped)."""
    valid_out = document_outputs(model, valid)
    without = _mean_nll(valid_out[1])
    best: tuple[float, CacheParams] | None = None
    for window, theta in itertools.product(WINDOWS, THETAS):
        p_cache, seen = _recalled(valid_out, window, theta)
        for lam in LAMBDAS:
            loss = _mean_nll(mix(valid_out[1], p_cache, seen, lam))
            if best is None or loss < best[0]:
                best = (loss, CacheParams(window, theta, lam))
    assert best is not None
    loss, params = best
    if loss >= without:
        return None
    block = {
        **params.to_dict(),
        "tuned_on": "validation, one stream, state carried",
        "valid_perplexity": math.exp(loss),
        "valid_perplexity_without": math.exp(without),
    }
    if test is not None:
        figures = test_figures(model, test, params, never)
        block["test_perplexity"] = figures["perplexity"]
        block["test_perplexity_without"] = figures["perplexity_without"]
        block["test_suggestion_accuracy"] = figures["suggestion_accuracy"]
    return block


def describe(block: dict | None) -> str:
    """One log line: the setting and its figures."""
    if block is None:
        return "continuous cache: no setting lowers validation perplexity; none recorded"
    figures = [
        f"{split} ppl {block[f'{split}_perplexity_without']:.2f} -> "
        f"{block[f'{split}_perplexity']:.2f}"
        for split in ("valid", "test")
        if f"{split}_perplexity" in block
    ]
    accuracy = block.get("test_suggestion_accuracy")
    if accuracy:
        figures += [
            f"test top-{k} {100 * a:.1f}% -> {100 * b:.1f}%"
            for k, a, b in zip(accuracy["k"], accuracy["without"], accuracy["with"], strict=True)
        ]
    return (
        f"continuous cache: window {block['window']}, theta {block['theta']}, lambda "
        f"{block['lambda']} | " + " | ".join(figures)
    )


def write_block(directory: Path, block: dict | None) -> None:
    """Record the tuned cache (None: remove any) in the checkpoint's config.json, written
    whole and then renamed."""
    data = ckpt.read_config(directory)
    data.pop("continuous_cache", None)
    if block is not None:
        data["continuous_cache"] = block
    path = Path(directory) / ckpt.CONFIG_FILE
    staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staged.write_text(json.dumps(data, indent=2) + "\n")
    staged.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.cache",
        description="Tune a checkpoint's continuous cache on its validation text and record it "
        "in its config.json (the exporter ships it in the bundle).",
    )
    parser.add_argument("checkpoint", type=Path, help="a directory `rnnlm train` wrote")
    parser.add_argument(
        "--corpus",
        type=Path,
        help="the corpus the run was trained on, where its recorded path no longer reaches it",
    )
    args = parser.parse_args(argv)
    try:
        loaded = ckpt.load_checkpoint(args.checkpoint)
        targs = loaded.train_args
        if args.corpus or targs.get("corpus"):
            corpus_path = Path(args.corpus or targs["corpus"])
            corpus = load_corpus(corpus_path, split=targs.get("split") or "lines")
        else:
            files = [targs.get(k) for k in ("train", "valid", "test")]
            if not all(files):
                raise CorpusError(f"{args.checkpoint} records no corpus: give --corpus FILE")
            train_path, valid_path, test_path = (Path(str(f)) for f in files)
            corpus_path = train_path
            corpus = load_corpus(None, train_path, valid_path, test_path)
    except (ckpt.CheckpointError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recorded = loaded.provenance.get("corpus_sha256")
    if recorded and recorded != corpus.sha256:
        print(
            f"error: {corpus_path}: not the corpus {args.checkpoint} was trained on "
            f"(sha256 {corpus.sha256[:12]}..., the checkpoint has {recorded[:12]}...)",
            file=sys.stderr,
        )
        return 2
    tokenizer = Tokenizer.from_file(str(loaded.tokenizer_path))
    test = None if corpus.test_is_valid else encode(tokenizer, corpus.test)
    never = tuple(i for i in loaded.special_tokens.values() if i is not None)
    block = tune(loaded.model, encode(tokenizer, corpus.valid), test, never)
    write_block(args.checkpoint, block)
    print(describe(block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
