"""`rnnlm import`: serve recurrent LMs made elsewhere (see docs/importing.md)."""
