"""rnnlm: serve recurrent language models over gRPC; the client and the command line live here."""

__version__ = "0.1.0"
