#!/usr/bin/env bash
# Rebuild models/shakespeare-word, the bundle the quickstart serves (`make default-model`; 30
# minutes of training).
# Trains a word-level LSTM on Tiny Shakespeare, then exports it as int8; the bundle's manifest
# records the corpus sha256, the validation and test perplexity the run measured, the int8
# bundle's perplexity against fp32, and the continuous cache tuned on the validation text
# after training (with its perplexities).
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/tinyshakespeare/input.txt}
RUN=${RUN:-runs/shakespeare-word}
RNNLM=${RNNLM:-.venv/bin/rnnlm}
PYTHON=${PYTHON:-.venv/bin/python}

# The word-small preset (docs/training.md): pytorch/examples' 2x200 tied LSTM and SGD at lr 20,
# with a cosine decay timed to the budget, dropout 0.35, words seen once replaced by <unk>,
# bf16 autocast, and the continuous cache; one thread. Version 6 trained for 30 minutes (about
# 8 M tokens on a machine shared with other work; version 5's 10 minutes saw 5 M).
"$RNNLM" train --preset word-small --corpus "$CORPUS" --out "$RUN" --threads 1 --max-minutes 30
# int8 (docs/performance.md, "The default word bundle in int8"): a step reads a third of the
# fp32 weights, which a typing server's cold steps are bound by. The shipped version 7 is version
# 6's int8 weights rewritten by `rnnlm int8-rows` (docs/bundle.md); an export writes that form.
"$RNNLM" export "$RUN" models/shakespeare-word --name shakespeare-word --version 7 \
  --quantize int8 --force
# The words the model learned as <unk> in its training lines, with their counts
# (server/oov_words.py suggests them through <unk>'s probability).
"$PYTHON" -c 'import sys; from pathlib import Path; from training.data import load_corpus
sys.stdout.write(load_corpus(Path(sys.argv[1]), split="lines").train)' "$CORPUS" > "$RUN/train-text.txt"
"$PYTHON" -m exporter.unknown_words models/shakespeare-word "$RUN/train-text.txt"
