"""The weights a model's sessions hold: made from the loader's verified bytes, then on their own.

Every session of a model is made from one in-memory copy of the bundle's files; once they are
made, `GraphBytes.release` drops that copy and hands the freed heap back to the system. The
sessions must not depend on it (nor on the files), for the fp32 and the int8 bundles alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_bundle import copy_bundle

from server.bundle import Bundle, BundleError, load_bundle, trim_heap


def outputs(bundle: Bundle, sessions: dict[str, ort.InferenceSession]) -> list[np.ndarray]:
    """Every output of every graph on one text, from the zero state."""
    tokens = np.array([[bundle.eos_id, 3, 5, 7, 2, 4]], dtype=np.int64)
    state = dict(zip([s.input for s in bundle.state], bundle.zero_state(1), strict=True))
    feeds = {
        "step": {"tokens": tokens, **state},
        "prefill": {"tokens": tokens, **state},
        "score": {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], **state},
    }
    return [out for graph, s in sessions.items() for out in s.run(None, feeds[graph])]


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_sessions_answer_alike_once_the_loaders_bytes_and_files_are_gone(
    which: str, default_bundle: Path, int8_bundle: Path, tmp_path: Path
) -> None:
    source = {"fp32": default_bundle, "int8": int8_bundle}[which]
    bundle = load_bundle(copy_bundle(source, tmp_path))
    options = ort.SessionOptions()  # one options object for all three, as the engine does
    options.intra_op_num_threads = 1
    sessions = {g: bundle.open_session(g, options) for g in ("step", "score", "prefill")}
    before = outputs(bundle, sessions)
    bundle.graph_bytes.release()  # and trims the heap
    for file in bundle.path.iterdir():
        file.unlink()
    after = outputs(bundle, sessions)
    assert len(after) == len(before) > 6
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_session_cannot_be_made_once_the_bytes_are_released(default_bundle: Path) -> None:
    bundle = load_bundle(default_bundle)
    bundle.graph_bytes.release()
    with pytest.raises(BundleError, match=r"model\.onnx: the bundle's bytes were released"):
        bundle.open_session("step")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_heap_is_handed_back_on_linux() -> None:
    """A freed block above glibc's mmap threshold goes back at once; one in the heap's free
    lists goes back only when trimmed, so a trim after many small frees gives memory back."""
    blocks = [bytearray(64 * 1024 - 64) for _ in range(2048)]  # 128 MiB of heap (brk) blocks
    # Allocated last, and by malloc (above pymalloc's 512 bytes): the heap's top stays in use,
    # so free() alone cannot shrink the heap, and only a trim gives the blocks' pages back.
    keep = bytearray(4096)
    del blocks
    assert trim_heap() is True
    assert keep == bytearray(4096)
