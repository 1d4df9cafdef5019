"""`rnnlm serve --processes N`: workers sharing one port under a supervisor, as real processes.

The supervisor and its workers run as `python -m rnnlm serve` on loopback; calls go over
separate connections (the kernel spreads connections, not calls, over SO_REUSEPORT sockets),
and what landed where is read from the supervisor's summed /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.app import RnnlmServer, transport_options
from server.config import ConfigError, ServerConfig, add_arguments, config_from_args
from server.metrics import Metrics
from server.metrics_merge import merge

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 90.0
MAX_CHANNELS = 64


class Pod:
    """`rnnlm serve --processes 2` as a child process; its ports read from its log."""

    def __init__(self, bundle: Path, *extra: str) -> None:
        command = [sys.executable, "-m", "rnnlm", "serve", "--models", str(bundle),
                   "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--health-port",
                   "0", "--grace-seconds", "1", "--processes", "2", *extra]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("RNNLM_")}
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.bundle = bundle
        self.log: list[str] = []
        self.ports: dict[str, int] = {}
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._serving.wait(START_SECONDS):
            self.process.kill()
            pytest.fail("the supervisor did not serve; its log:\n" + "\n".join(self.log[-30:]))

    def _read(self) -> None:
        assert self.process.stderr is not None
        patterns = {
            "metrics": r"rnnlm.supervisor: metrics .* on http://127\.0\.0\.1:(\d+)/",
            "health": r"rnnlm.supervisor: health .* on 127\.0\.0\.1:(\d+)",
            "grpc": r"rnnlm.supervisor: serving on 127\.0\.0\.1:(\d+) with 2 workers",
        }
        for line in self.process.stderr:
            self.log.append(line.rstrip("\n"))
            for name, pattern in patterns.items():
                if match := re.search(pattern, line):
                    self.ports[name] = int(match.group(1))
            if "grpc" in self.ports:
                self._serving.set()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def worker_pids(self) -> list[int]:
        return sorted(int(dict(k[1])["pid"]) for k in self.metrics() if k[0] == "rnnlm_worker_up")

    def logged(self, *parts: str) -> bool:
        return any(all(part in line for part in parts) for line in self.log)

    def wait_for(self, seen: Callable[[], set[str]], count: int = 2) -> bool:
        """Whether `seen()` reaches `count` members within START_SECONDS (polled)."""
        deadline = time.monotonic() + START_SECONDS
        while len(seen()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(seen()) >= count

    def wait(self) -> int:
        """The supervisor's exit code, once it and its log have ended."""
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait()


@pytest.fixture
def pod(default_bundle: Path) -> Iterator[Pod]:
    pod = Pod(default_bundle)
    yield pod
    if pod.process.poll() is None:
        pod.process.kill()
        pod.process.wait()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_two_workers_share_one_port_and_sum_their_metrics(pod: Pod) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{pod.ports['health']}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    pids = pod.worker_pids()
    assert len(pids) == 2 and pod.process.pid not in pids
    options = [("grpc.use_local_subchannel_pool", 1)]  # each channel a connection of its own
    calls, per_worker = 0, {}
    for _ in range(MAX_CHANNELS):
        with grpc.insecure_channel(f"127.0.0.1:{pod.ports['grpc']}", options=options) as channel:
            stub = pb_grpc.LanguageModelStub(channel)
            for _ in range(2):
                assert stub.PredictNext(pb.PredictNextRequest(context="the", k=2), timeout=30)
                calls += 1
        m = pod.metrics()
        per_worker = {w: m[("rnnlm_worker_requests_total", (("worker", w),))] for w in "01"}
        if calls >= 8 and all(per_worker.values()):
            break
    assert all(per_worker.values()), per_worker  # calls landed on both workers
    assert sum(per_worker.values()) == calls
    ok = (("code", "OK"), ("method", "PredictNext"), ("model", "tiny-lstm-word"))
    summed = {k: v for k, v in m.items() if k[0] == "rnnlm_requests_total"}
    assert summed == {("rnnlm_requests_total", ok): calls}
    counted = (
        "rnnlm_request_duration_seconds_count",
        (("method", "PredictNext"), ("model", "tiny-lstm-word")),
    )
    assert m[counted] == calls  # histograms summed too
    info = [k for k in m if k[0] == "rnnlm_model_info"]
    assert len(info) == 1 and m[info[0]] == 1  # info-like gauges: not summed

    # The port is taken: a single server (no SO_REUSEPORT) must not join the workers.
    taken = subprocess.run(
        [sys.executable, "-m", "rnnlm", "serve", "--models", "unused", "--host", "127.0.0.1",
         "--port", str(pod.ports["grpc"]), "--metrics-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert taken.returncode == 2
    assert f"--port {pod.ports['grpc']}: address already in use" in taken.stderr
    # ... and without that probe, gRPC's own bind fails too.
    alone = RnnlmServer(ServerConfig(models=pod.bundle, host="127.0.0.1", port=pod.ports["grpc"]))
    with pytest.raises(OSError, match=r"--port: cannot listen on 127\.0\.0\.1"):
        asyncio.run(alone.start())

    pod.process.send_signal(signal.SIGHUP)  # passed on: each worker reloads
    assert pod.wait_for(lambda: {w for w in "01" if pod.logged(f"worker {w} ", "reload requested")})

    assert pod.stop() == 0  # SIGTERM: both drained
    assert not any(_alive(pid) for pid in pids)
    assert pod.logged("worker 0 server.app: stopped") and pod.logged("worker 1 server.app: stopped")
    assert "rnnlm.supervisor: stopped" in pod.log[-1]


def test_a_worker_that_dies_stops_the_pod(pod: Pod) -> None:
    pids = pod.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    assert pod.wait() == 1
    died = [line for line in pod.log if "exited: killed by SIGKILL" in line]
    assert died == [f"rnnlm serve: worker {_index(pod, pids[0])} (pid {pids[0]}) exited: "
                    "killed by SIGKILL; stopped the other workers"]  # fmt: skip
    assert not _alive(pids[1])


def _index(pod: Pod, pid: int) -> str:
    return next(line.split()[5] for line in pod.log if f"started (pid {pid})" in line)


# -- the pieces, in process ---------------------------------------------------------------------


def test_processes_is_a_setting_with_an_environment_twin(default_bundle: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--models", str(default_bundle)])
    assert config_from_args(args, {}).processes == 1
    assert config_from_args(args, {"RNNLM_PROCESSES": "3"}).processes == 3
    with pytest.raises(ConfigError, match=r"--processes \(RNNLM_PROCESSES\): must be at least 1"):
        config_from_args(args, {"RNNLM_PROCESSES": "0"})


def test_only_workers_share_their_port(default_bundle: Path) -> None:
    config = ServerConfig(models=default_bundle)
    assert ("grpc.so_reuseport", 0) in transport_options(config)
    assert ("grpc.so_reuseport", 1) in transport_options(config, reuse_port=True)


def test_merge_sums_counters_histograms_and_gauges_but_not_info() -> None:
    texts = []
    for streams in (2, 3):
        m = Metrics()
        m.requests.labels(method="Score", model="a", code="OK").inc(streams)
        m.request_duration.labels(method="Score", model="a").observe(0.002 * streams)
        m.active_streams.labels(model="a").set(streams)
        m.set_model_info("a", "1", "CPUExecutionProvider", "lstm")
        m.bundles_failing.set(1)
        texts.append(generate_latest(m.registry).decode())
    merged = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in merge(texts) for s in f.samples
    }
    score = (("method", "Score"), ("model", "a"))
    assert merged[("rnnlm_requests_total", (("code", "OK"), *score))] == 5
    assert merged[("rnnlm_request_duration_seconds_count", score)] == 2
    assert merged[("rnnlm_request_duration_seconds_sum", score)] == pytest.approx(0.01)
    assert merged[("rnnlm_request_duration_seconds_bucket", (("le", "0.005"), *score))] == 1
    assert merged[("rnnlm_request_duration_seconds_bucket", (("le", "0.01"), *score))] == 2
    assert merged[("rnnlm_active_streams", (("model", "a"),))] == 5
    info = (
        ("cell", "lstm"),
        ("model", "a"),
        ("provider", "CPUExecutionProvider"),
        ("version", "1"),
    )
    assert merged[("rnnlm_model_info", info)] == 1
    assert merged[("rnnlm_model_bundles_failing", ())] == 1


def test_workers_that_cannot_start_fail_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repository"
    process = subprocess.run(
        [sys.executable, "-m", "rnnlm", "serve", "--models", str(missing), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--processes", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode == 2
    lines = [line for line in process.stderr.splitlines() if line.startswith("rnnlm serve:")]
    assert any("cannot start" in line and str(missing) in line for line in lines), lines
    [supervisor] = [line for line in lines if "exited before it served" in line]
    assert re.fullmatch(
        r"rnnlm serve: worker [01] \(pid \d+\) exited before it served: exit code 2; "
        r"stopped the other workers",
        supervisor,
    )
