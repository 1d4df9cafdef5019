"""The `rnnlm` command: one entry point, each subcommand implemented beside what it drives.

Subcommand modules are imported only when chosen, so `rnnlm serve` and the client commands never
import torch. Each module provides `configure(parser)` to declare its options and `run(args)`
returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.cli", "train a recurrent language model on a text corpus"),
    "export": ("exporter.cli", "export a checkpoint to a parity-checked ONNX model bundle"),
    "import": ("importers.cli", "import a model made elsewhere as a parity-checked bundle"),
    "int8-rows": (
        "exporter.int8_rows",
        "rewrite an older int8 bundle so that batching changes none of its results",
    ),
    "serve": ("server.cli", "serve model bundles over gRPC"),
    "generate": ("rnnlm.client_cli", "stream generated text from a server"),
    "predict": ("rnnlm.client_cli", "the k most likely next words for a context"),
    "score": ("rnnlm.client_cli", "log-probability and perplexity of texts"),
    "embed": ("rnnlm.client_cli", "a sentence encoding of each text"),
    "models": ("rnnlm.client_cli", "list the models a server has loaded"),
    "bench": ("benchmarks.cli", "measure the server against bare onnxruntime and PyTorch"),
}

# The optional dependencies (pyproject's extras) a subcommand needs beyond the serving install.
EXTRAS: dict[str, str] = {
    "train": "train",
    "export": "train",
    "import": "train",
    "int8-rows": "train",
}
_OWN_PACKAGES = {"rnnlm", "server", "training", "exporter", "importers", "benchmarks"}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "usage: rnnlm COMMAND [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"rnnlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if name not in EXTRAS or not missing or missing in _OWN_PACKAGES:
            raise
        extra = EXTRAS[name]
        print(
            f"rnnlm {name}: needs the {extra!r} extra ({missing} is not installed): "
            f"pip install 'rnnlm[{extra}]'",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"rnnlm {name}", description=help_)
    if module_name == "rnnlm.client_cli":
        module.configure(parser, name)
    else:
        module.configure(parser)
    args = parser.parse_args(rest)
    args.command = name
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
