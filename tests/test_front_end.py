"""The native gRPC front end (server/front_end.cc and server/front_end.py) against what only it
can get wrong: the relay's status and trailing metadata, methods it does not know, requests in
flight beyond its window, its own death, what a killed server left behind, and being asked
for what it does not do.

Every API test of tests/test_server.py also runs over it (its `live` fixture takes both front
ends); these need a server of their own.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks.process import descendants
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server import front_end
from tests.test_server import LiveServer, config

pytestmark = pytest.mark.skipif(
    not front_end.available(), reason="the native front end was not built (needs grpc++)"
)
ROOT = Path(__file__).resolve().parent.parent
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def live(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text("front-end-test-token-0123\n")
    server = LiveServer(config(default_bundle, front_end="native", auth_token_file=tokens))
    yield server
    server.close()


@pytest.fixture(scope="module")
def channel(live: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live.target) as c:
        yield c


AUTH = (("authorization", "Bearer front-end-test-token-0123"),)


def test_a_refusal_carries_its_status_and_trailing_metadata(channel: grpc.Channel) -> None:
    stub = pb_grpc.LanguageModelStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.PredictNext(pb.PredictNextRequest(context="the cat"), timeout=10)
    assert refused.value.code() == Code.UNAUTHENTICATED
    assert "requires authentication" in refused.value.details()
    trailing = dict(refused.value.trailing_metadata())
    assert trailing["www-authenticate"] == 'Bearer realm="rnnlm"'
    reply = stub.PredictNext(pb.PredictNextRequest(context="the cat", k=3), metadata=AUTH)
    assert len(reply.predictions) == 3


def test_a_method_no_service_has_is_unimplemented(channel: grpc.Channel) -> None:
    call = channel.unary_unary("/rnnlm.v1.LanguageModel/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as e:
        call(b"", timeout=10, metadata=AUTH)
    assert e.value.code() == Code.UNIMPLEMENTED


def test_events_sent_far_ahead_of_their_replies_all_get_one(channel: grpc.Channel) -> None:
    """More events in flight than the front end lets wait in Python (its window of 8): it
    reads on as they are taken, and every event gets its reply, in order."""
    stub = pb_grpc.LanguageModelStub(channel)
    letters = "abcdefghijklmnopqrstuvwxyz" * 2
    events = [pb.TypingEvent(text="the ", k=2)] + [
        pb.TypingEvent(partial_word=letters[: i + 1], k=2) for i in range(40)
    ]
    replies = list(stub.TypingSession(iter(events), metadata=AUTH, timeout=60))
    assert len(replies) == len(events)
    assert all(len(r.predictions) <= 2 for r in replies)


def test_a_generate_stream_cancelled_by_its_client_ends_in_the_server(
    live: LiveServer, channel: grpc.Channel
) -> None:
    stub = pb_grpc.LanguageModelStub(channel)
    stream = stub.Generate(
        pb.GenerateRequest(prompt="the", max_tokens=100_000, seed=1), metadata=AUTH
    )
    next(stream)
    stream.cancel()
    # 100,000 tokens would take the tiny model half a minute or more: it stopped at the cancel.
    assert _wait(lambda: live.server._servicer._in_flight == 0, 3)


def test_handlers_that_read_and_write_through_the_context() -> None:
    """A bare relay (no rnnlm server) with an echo handler that reads with `context.read()`
    and answers with `context.write()`, as grpc.aio handlers may, one that returns a status it
    set, and one that aborts with metadata gRPC would not send."""

    async def echo(requests: object, context: front_end.RelayedCall) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message[::-1])

    async def teapot(request: bytes, context: front_end.RelayedCall) -> bytes:
        context.set_code(Code.FAILED_PRECONDITION)
        context.set_details("short and stout")
        return b""

    async def bad_metadata(request: bytes, context: front_end.RelayedCall) -> bytes:
        await context.abort(Code.NOT_FOUND, "gone", (("Not A Key", "\n"),))
        return b""

    handlers = front_end.Handlers()
    handlers.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.T",
                {
                    "Echo": grpc.stream_stream_rpc_method_handler(echo),
                    "Teapot": grpc.unary_unary_rpc_method_handler(teapot),
                    "Bad": grpc.unary_unary_rpc_method_handler(bad_metadata),
                },
            )
        ]
    )
    loop = asyncio.new_event_loop()
    relay = front_end.NativeFrontEnd(handlers)
    try:
        port = loop.run_until_complete(relay.start("127.0.0.1:0"))
        done = threading.Event()
        thread = threading.Thread(target=lambda: loop.run_until_complete(_until(done)))
        thread.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream("/t.T/Echo")
                assert list(call(iter([b"abc", b"de", b""]), timeout=10)) == [b"cba", b"ed", b""]
                with pytest.raises(grpc.RpcError) as e:
                    channel.unary_unary("/t.T/Teapot")(b"", timeout=10)
                assert e.value.code() == Code.FAILED_PRECONDITION
                assert e.value.details() == "short and stout"
                # Metadata gRPC would not send ends the call with INTERNAL, not the relay.
                with pytest.raises(grpc.RpcError) as e:
                    channel.unary_unary("/t.T/Bad")(b"", timeout=10)
                assert e.value.code() == Code.INTERNAL
                assert list(call(iter([b"still"]), timeout=10)) == [b"llits"]
        finally:
            done.set()
            thread.join(10)
    finally:
        loop.run_until_complete(relay.stop(0))
        loop.close()


async def _until(done: threading.Event) -> None:
    while not done.is_set():
        await asyncio.sleep(0.01)


def test_a_missing_binary_stops_the_start_naming_it(
    default_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front_end, "BINARY", Path("/nonexistent/rnnlm_front_end"))
    with pytest.raises(OSError, match=r"--front-end native: .* is not built"):
        LiveServer(config(default_bundle, front_end="native"))


def _wait(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_rnnlm_serve_exits_1_when_its_front_end_dies(default_bundle: Path) -> None:
    """Nothing can reach a server whose front end died: it stops and exits non-zero, so that
    what supervises it (Kubernetes, `--processes N`) starts it again."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rnnlm", "serve", "--models", str(default_bundle), "--host",
         "127.0.0.1", "--port", "0", "--metrics-port", "0", "--front-end", "native"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:  # until it serves (it logs to stderr)
            lines.append(line)
            if " serving " in line:
                break
        assert _front_ends(process.pid), "".join(lines)[-2000:]
        os.kill(_front_ends(process.pid)[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1
    assert "the native front end exited" in stderr


def _front_ends(pid: int) -> list[int]:
    return [
        child
        for child in descendants(pid)
        if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].endswith(b"rnnlm_front_end")
    ]


def test_a_killed_servers_private_directory_is_removed_by_the_next(default_bundle: Path) -> None:
    """A server killed outright leaves its directory (with TLS, a copy of the key in it); the
    next native front end of the same user removes it, and leaves a running one's alone,
    whatever its PID (the server's lock on the directory decides, not the PID)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_DIRECTORY], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    killed = subprocess.Popen(
        [sys.executable, "-m", "rnnlm", "serve", "--models", str(default_bundle), "--host",
         "127.0.0.1", "--port", "0", "--metrics-port", "0", "--front-end", "native"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    running: Path | None = None
    try:
        assert holder.stdout is not None and killed.stderr is not None
        running = Path(holder.stdout.readline().strip())
        for line in killed.stderr:  # until it serves (it logs to stderr)
            if " serving " in line:
                break
        (left,) = Path(tempfile.gettempdir()).glob(f"rnnlm-front-{killed.pid}-*")
        killed.kill()  # SIGKILL: nothing of it cleans up; its front end dies with it
        killed.wait()
        assert left.is_dir()
        LiveServer(config(default_bundle, front_end="native")).close()
        assert not left.exists()
        assert (running / "alive").is_file()
    finally:
        for process in (holder, killed):
            process.kill()
            process.wait()
        if running is not None:
            shutil.rmtree(running, ignore_errors=True)


# A process holding a private directory as a running server does; prints its path.
_HOLD_A_DIRECTORY = """
import os, tempfile, time
from server import front_end
path = tempfile.mkdtemp(prefix=front_end._DIR_PREFIX + "1-")  # a PID of another namespace
front_end._hold_lock(os.path.join(path, front_end._LOCK))
print(path, flush=True)
time.sleep(120)
"""


def test_a_call_relayed_late_keeps_its_deadline() -> None:
    """START carries the deadline itself, not the time left: a call whose START reached this
    process after its deadline has no time left here, however long the relay took (a time
    left would count from the START's arrival, and a deadline the front end ended would be
    recorded as CANCELLED, not DEADLINE_EXCEEDED)."""

    async def remaining(deadline: float) -> float | None:
        front = front_end.NativeFrontEnd(front_end.Handlers())
        fields = [front_end._str(b"/m"), front_end._str(b"peer"), front_end._U32.pack(0)]
        payload = front_end._F64.pack(deadline) + b"".join(fields) + b"\x00"  # no request
        front._start_call(7, payload)
        return front._calls[7].time_remaining()

    assert asyncio.run(remaining(time.time() - 0.05)) == 0.0
    ahead = asyncio.run(remaining(time.time() + 60))
    assert ahead is not None and 55 < ahead <= 60
    assert asyncio.run(remaining(math.inf)) is None
