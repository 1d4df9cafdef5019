"""Hot reload of the model repository: new versions load, bad ones fail alone, old ones drain.

A real server on a NAME/VERSION repository in a temporary directory; the reload is the one
SIGHUP triggers (`RnnlmServer.reload`), also driven by polling and by a real SIGHUP to a real
`rnnlm serve` process.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_client_cli import ServeProcess
from test_server import LiveServer, config, copy_bundle, metric, wait_for

from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from server import heap

NAME = "tiny-lstm-word"
FAILURES = "rnnlm_model_load_failures_total"
Code = grpc.StatusCode


@pytest.fixture
def root(tmp_path: Path, default_bundle: Path) -> Path:
    """A repository with NAME version 1 only."""
    copy_bundle(default_bundle, tmp_path / "models" / NAME / "1")
    return tmp_path / "models"


@pytest.fixture
def live(root: Path) -> Iterator[LiveServer]:
    server = LiveServer(config(root))
    yield server
    server.close()


def corrupt_version(default_bundle: Path, target: Path, version: str) -> None:
    """A bundle whose manifest is fine but whose tokenizer no longer matches its hash."""
    copy_bundle(default_bundle, target, version=version)
    with (target / "tokenizer.json").open("a") as f:
        f.write(" ")


def info_versions(live: LiveServer) -> set[str]:
    return {
        labels["version"]
        for (name, frozen), value in live.scrape().items()
        if name == "rnnlm_model_info" and value == 1
        for labels in [dict(frozen)]
    }


def test_new_versions_load_and_a_broken_one_keeps_the_old_serving(
    live: LiveServer, root: Path, default_bundle: Path
) -> None:
    with Client(live.target, timeout=10) as client:
        assert client.get_model().version == "1"
        copy_bundle(default_bundle, root / NAME / "2", version="2")
        result = live.run(live.server.reload())
        assert (result.loaded, result.unloaded, result.failed) == ([f"{NAME}:2"], [], [])
        assert client.get_model().version == "2"
        assert client.predict_next("the", k=2).model_version == "2"
        assert client.predict_next("the", k=2, model_version="1").model_version == "1"
        assert [m.version for m in client.list_models()] == ["1", "2"]
        assert info_versions(live) == {"1", "2"}

        corrupt_version(default_bundle, root / NAME / "3", "3")
        result = live.run(live.server.reload())
        assert result.loaded == [] and len(result.failed) == 1
        assert str(root / NAME / "3") in result.failed[0] and "tokenizer.json" in result.failed[0]
        assert client.get_model().version == "2"
        assert client.health() == "SERVING"
        assert metric(live.scrape(), FAILURES, model=NAME) == 1
        # An explicit reload (SIGHUP) tries the broken bundle again; polling would not.
        live.run(live.server.reload())
        assert metric(live.scrape(), FAILURES, model=NAME) == 2
        live.run(live.server.reload(retry_failed=False))
        assert metric(live.scrape(), FAILURES, model=NAME) == 2

        # Fixed in place, it loads.
        shutil.rmtree(root / NAME / "3")
        copy_bundle(default_bundle, root / NAME / "3", version="3")
        assert live.run(live.server.reload(retry_failed=False)).loaded == [f"{NAME}:3"]
        assert client.get_model().version == "3"


def test_a_removed_version_is_unloaded(live: LiveServer, root: Path, default_bundle: Path) -> None:
    copy_bundle(default_bundle, root / NAME / "2", version="2")
    live.run(live.server.reload())
    shutil.rmtree(root / NAME / "1")
    result = live.run(live.server.reload())
    assert result.unloaded == [f"{NAME}:1"]
    with Client(live.target, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.predict_next("the", k=2, model_version="1")
        assert error.value.code() == Code.NOT_FOUND
        assert "versions: 2" in error.value.details()
    wait_for(lambda: info_versions(live) == {"2"})


def test_a_reload_never_leaves_the_server_without_models(live: LiveServer, root: Path) -> None:
    shutil.rmtree(root / NAME)
    result = live.run(live.server.reload())
    assert "no model bundle found" in result.failed[0]
    assert metric(live.scrape(), FAILURES, model="") == 1
    with Client(live.target, timeout=10) as client:
        assert client.predict_next("the", k=1).model_version == "1"


def test_a_changed_bundle_is_reloaded_in_place(live: LiveServer, root: Path) -> None:
    manifest_path = root / NAME / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["provenance"]["test_perplexity"] = 12.5
    manifest_path.write_text(json.dumps(manifest, indent=2))
    result = live.run(live.server.reload())
    assert (result.loaded, result.unloaded) == ([f"{NAME}:1"], [f"{NAME}:1"])
    with Client(live.target, timeout=10) as client:
        assert client.get_model().quality.test_perplexity == 12.5
        assert client.predict_next("the", k=1).predictions
    assert info_versions(live) == {"1"}


def test_calls_on_a_removed_version_finish_first(
    live: LiveServer, root: Path, default_bundle: Path
) -> None:
    copy_bundle(default_bundle, root / NAME / "2", version="2")
    live.run(live.server.reload())
    with Client(live.target, timeout=30) as client:
        n = 3000
        stream = client.generate("the", max_tokens=n, seed=1, model_version="1")
        next(stream)
        events: list[pb.TypingEvent] = [pb.TypingEvent(text="the cat ", model_version="1")]
        session = client.typing_session(iter(_blocking(events)))
        first = next(session)
        shutil.rmtree(root / NAME / "1")
        assert live.run(live.server.reload()).unloaded == [f"{NAME}:1"]
        assert client.get_model().version == "2"
        # The open stream and the session still run on version 1 until they end.
        last = list(stream)[-1]
        assert (last.finish_reason, last.completion_tokens) == (pb.FINISH_REASON_LENGTH, n)
        events.append(pb.TypingEvent(text="sees "))
        second = next(session)
        assert second.context_tokens == first.context_tokens + 1
        assert info_versions(live) == {"1", "2"}  # still open
        events.append(_END)
        assert list(session) == []
    wait_for(lambda: info_versions(live) == {"2"})


_END = pb.TypingEvent(text="<end of test stream>")


def _blocking(events: list[pb.TypingEvent]) -> Iterator[pb.TypingEvent]:
    """Yield events as the test appends them, until `_END`."""
    sent = 0
    while True:
        while sent == len(events):
            time.sleep(0.01)
        event = events[sent]
        sent += 1
        if event is _END:
            return
        yield event


def test_polling_loads_new_versions_and_reports_a_failure_once(
    root: Path, default_bundle: Path
) -> None:
    live = LiveServer(config(root, reload_seconds=0.1))
    try:
        with Client(live.target, timeout=10) as client:
            copy_bundle(default_bundle, root / NAME / "2", version="2")
            wait_for(lambda: client.get_model().version == "2")
            corrupt_version(default_bundle, root / NAME / "3", "3")
            wait_for(lambda: metric(live.scrape(), FAILURES, model=NAME) == 1)
            time.sleep(0.5)
            assert metric(live.scrape(), FAILURES, model=NAME) == 1
            assert client.get_model().version == "2"
    finally:
        live.close()


def test_sighup_reloads_a_running_server(root: Path, default_bundle: Path) -> None:
    server = ServeProcess(
        ["--models", str(root), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--grace-seconds", "1"],
        {},
    )  # fmt: skip
    try:
        port = server.wait_for_line(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
        server.wait_for_line("serving ")
        copy_bundle(default_bundle, root / NAME / "2", version="2")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_line(f"reloaded .*: loaded {NAME}:2; unloading nothing")
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.get_model().version == "2"
    finally:
        assert server.stop() == 0


def test_the_heap_is_settled_when_the_models_change(
    live: LiveServer, root: Path, default_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a reload that loads or unloads, and once a retired version has closed, what is
    alive is frozen again (server/heap.py), so that an unloaded model's cycles are freed."""
    settled: list[str] = []
    monkeypatch.setattr(heap, "settle", lambda: settled.append("settled") or 0.0)
    live.run(live.server.reload())
    assert settled == []  # nothing changed
    copy_bundle(default_bundle, root / NAME / "2", version="2")
    live.run(live.server.reload())
    assert len(settled) == 1
    shutil.rmtree(root / NAME / "1")
    live.run(live.server.reload())
    wait_for(lambda: len(settled) == 3)  # after the reload, and after version 1 closed
