"""`python -m training ...` is `rnnlm train ...`."""

import sys

from rnnlm.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
