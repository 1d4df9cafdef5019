#!/usr/bin/env bash
# Rebuild models/shakespeare-word, the bundle the quickstart serves (`make default-model`).
# Trains a word-level LSTM on Tiny Shakespeare, then exports it; the bundle's manifest records
# the corpus sha256 and the validation and test perplexity the run measured.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/tinyshakespeare/input.txt}
RUN=${RUN:-runs/shakespeare-word}
RNNLM=${RNNLM:-.venv/bin/rnnlm}

# pytorch/examples' word_language_model recipe (2x200 tied LSTM, SGD lr 20 quartered on
# plateau, clip 0.25, BPTT 35, batch 20) with bf16 autocast for throughput, 10 minutes, 1 thread.
"$RNNLM" train --preset pytorch-examples --bf16 --corpus "$CORPUS" --out "$RUN" \
  --max-minutes 10 --threads 1
"$RNNLM" export "$RUN" models/shakespeare-word --name shakespeare-word --version 2 --force
