#!/usr/bin/env bash
# Rebuild models/shakespeare-word, the bundle the quickstart serves (`make default-model`).
# Trains a word-level LSTM on Tiny Shakespeare, then exports it; the bundle's manifest records
# the corpus sha256 and the validation and test perplexity the run measured.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/tinyshakespeare/input.txt}
RUN=${RUN:-runs/shakespeare-word}
RNNLM=${RNNLM:-.venv/bin/rnnlm}

"$RNNLM" train --corpus "$CORPUS" --out "$RUN" \
  --tokenizer word --vocab-size 10000 \
  --cell lstm --layers 2 --embedding 256 --hidden 256 --tied --dropout 0.4 \
  --bptt 35 --batch-size 32 --epochs 40 --max-minutes 10 \
  --optimizer adamw --lr 2e-3 --clip 0.25 --seed 1111 --threads 2
"$RNNLM" export "$RUN" models/shakespeare-word --name shakespeare-word --version 1 --force
