"""The server's garbage-collector policy (server/heap.py): what is alive when the models load is
frozen out of collections, cycles left by what was frozen are still freed at the next settle,
and every collection's pause reaches /metrics by generation."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_server import LiveServer, config, metric

from server import heap
from server.heap import GcPauses

PAUSES = "rnnlm_gc_pause_seconds"


class _Node:
    """An object in a reference cycle (only the cycle collector frees it)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_settle_freezes_what_is_alive_and_frees_cycles_frozen_before() -> None:
    node = _Node()
    ref = weakref.ref(node)
    gc.freeze()
    del node
    gc.collect()
    assert ref() is not None  # a frozen cycle is out of every collection's walk
    kept = _Node()
    heap.settle()
    assert ref() is None  # settling unfreezes first: the dead cycle is freed
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen: no collection walks it
    del kept


def test_every_collection_counts_in_its_generation_until_stopped() -> None:
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    gc.collect(2)
    assert registry.get_sample_value(f"{PAUSES}_count", {"generation": "2"}) == 0  # not started
    pauses.start()
    pauses.start()  # once only
    gc.collect(0)
    gc.collect(2)
    gc.collect(2)

    def count(generation: str) -> float:
        return registry.get_sample_value(f"{PAUSES}_count", {"generation": generation}) or 0.0

    assert count("2") == 2 and count("0") >= 1
    inf = registry.get_sample_value(f"{PAUSES}_bucket", {"generation": "2", "le": "+Inf"})
    assert inf == count("2")
    assert (registry.get_sample_value(f"{PAUSES}_sum", {"generation": "2"}) or 0.0) > 0
    pauses.stop()
    pauses.stop()
    gc.collect(2)
    assert count("2") == 2  # no longer counted


def test_a_serving_server_has_frozen_its_models_and_exports_its_pauses(
    default_bundle: Path,
) -> None:
    gc.unfreeze()
    live = LiveServer(config(default_bundle))
    try:
        assert gc.get_freeze_count() > 1000  # the tokenizer's texts, the codec's indexes...
        gc.collect(2)
        assert metric(live.scrape(), f"{PAUSES}_count", generation="2") >= 1
    finally:
        live.close()
