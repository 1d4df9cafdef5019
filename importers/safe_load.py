"""Read a torch checkpoint without running code from it.

`torch.load(weights_only=True)` rebuilds only tensors, containers and the classes on torch's
safe-globals allow-list. Before loading, the checkpoint's pickle is listed
(`get_unsafe_globals_in_checkpoint`, which reads the pickle's opcodes and runs nothing), and a
checkpoint naming any class outside the importer's allow-list is refused with one line. A class
the source defined in its own code (pytorch/examples' `model.RNNModel`, flair's
`flair.data.Dictionary`) is allowed under its name but rebuilt as a stand-in defined here, so
the source's code is neither needed nor run.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from importers.errors import ImportFailure

# How much of a name from the file goes into a message.
NAME_CHARS = 80
NAMES_SHOWN = 3


def load_allowed(path: Path, allowed: dict[str, Any], what: str) -> Any:
    """The unpickled checkpoint at `path`; `allowed` maps each class name it may hold to the
    class that stands for it. Anything else is refused before any object is rebuilt."""
    if not path.is_file():
        raise ImportFailure(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception as e:  # a damaged or foreign file: torch raises several types
        raise ImportFailure(f"{path}: not a torch checkpoint ({_short(e)})") from e
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        named = ", ".join(repr(n[:NAME_CHARS]) for n in unknown[:NAMES_SHOWN])
        more = f" and {len(unknown) - NAMES_SHOWN} more" if len(unknown) > NAMES_SHOWN else ""
        raise ImportFailure(
            f"{path}: refused: it holds {named}{more}, which a {what} does not; nothing in it "
            "was run"
        )
    safe: list[Any] = [(cls, name) for name, cls in allowed.items()]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, EOFError) as e:
        raise ImportFailure(f"{path}: cannot be read as a {what} ({_short(e)})") from e


def _short(error: BaseException) -> str:
    """The first line of an error, bounded (torch's messages run to many paragraphs)."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


class _Refused(pickle.UnpicklingError):
    """A class outside the allow-list, named in the pickle."""


class _AllowListUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the names in `allowed`; every other is refused
    before anything is called (a pickle can only call what `find_class` hands it)."""

    allowed: ClassVar[dict[tuple[str, str], Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}"[:NAME_CHARS])
        return found


# What a pickled state_dict of plain tensors needs besides the torch storage types (which
# torch.load resolves itself).
TENSOR_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
}


def load_allow_listed(path: Path, allowed: dict[str, Any], what: str) -> Any:
    """The unpickled checkpoint at `path`, read with an allow-list unpickler: tensors and
    containers, and each class named in `allowed` rebuilt as the stand-in it maps to.

    For checkpoints torch's own `weights_only` reader cannot take: it rejects pickle protocol
    4 (flair saves with it). torch.load still reads the zip file and the storages; only the
    unpickler is ours."""
    if not path.is_file():
        raise ImportFailure(f"{path}: no such file")
    table = {tuple(n.rsplit(".", 1)): cls for n, cls in {**TENSOR_GLOBALS, **allowed}.items()}
    unpickler = type("Unpickler", (_AllowListUnpickler,), {"allowed": table})

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module = SimpleNamespace(__name__="allow_list_pickle", Unpickler=unpickler, load=load)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    except _Refused as e:
        raise ImportFailure(
            f"{path}: refused: it holds {str(e)!r}, which a {what} does not; nothing in it was run"
        ) from e
    except Exception as e:  # a damaged or foreign file: torch raises several types
        raise ImportFailure(f"{path}: cannot be read as a {what} ({_short(e)})") from e
