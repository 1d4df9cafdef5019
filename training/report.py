"""A Markdown table of finished runs, for docs/training.md's results.

    python -m training.report runs/char-small runs/word-small ...

One row per checkpoint directory, from its config.json: the preset, the split, the validation
and test figures of the shipped weights in the evaluation streams (and the test perplexity with
the continuous cache, when one was tuned), the steps and tokens, the training speed, the wall
time, and the test perplexity of the test text read as one stream from eos, as `Score` reads it
(the bundle manifest's figure; "-" for a run from before it was measured). Losses are
nats per token (per character for a char tokenizer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.checkpoint import CheckpointError, read_config

COLUMNS = ("run", "preset", "split", "valid loss", "valid ppl", "test loss", "test ppl",
           "test ppl, cache", "steps", "tokens", "tokens/s", "minutes", "weights from",
           "test ppl, one stream")  # fmt: skip


def row(directory: Path) -> list[str]:
    data = read_config(directory)
    p, args = data.get("provenance", {}), data.get("train_args", {})

    def num(key: str, digits: int) -> str:
        value = p.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    test = [num("test_loss", 4), num("test_perplexity", 2)]
    if p.get("test_is_valid"):
        test = ["= valid", "= valid"]
    cached = (data.get("continuous_cache") or {}).get("test_perplexity")
    minutes = p.get("elapsed_s")
    return [
        directory.name,
        str(args.get("preset") or "-"),
        str(args.get("split") or "lines"),
        num("valid_loss", 4),
        num("valid_perplexity", 2),
        *test,
        "-" if cached is None else f"{cached:.2f}",
        str(p.get("steps", "-")),
        str(p.get("tokens_seen", "-")),
        num("train_tokens_per_s", 0),
        "-" if minutes is None else f"{minutes / 60:.1f}",
        str(p.get("weights_from", "-")),
        num("test_document_perplexity", 2),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.report", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="checkpoint directories")
    args = parser.parse_args(argv)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    try:
        lines += ["| " + " | ".join(row(run)) + " |" for run in args.runs]
    except CheckpointError as e:
        print(f"training.report: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
