"""`rnnlm serve --processes N`: N server processes on one gRPC port, under a small supervisor.

One server process holds the GIL for every gRPC message it handles, so on a machine with C
cores it uses about one. With N > 1 this process starts N workers (server/worker.py: the normal
server, same configuration, each loading the models) that all bind the gRPC port with
SO_REUSEPORT; the kernel spreads new connections over them, and a connection (with its
streams, a TypingSession's included) stays in one worker. The supervisor itself:

- checks the ports first (a port held by another process fails with one line, as for one
  server) and, for `--port 0`, picks a free port and gives it to every worker;
- serves the one /metrics on --metrics-port, the workers' metrics combined at each scrape
  (server/metrics_merge.py), and --health-port when set: SERVING once every worker serves;
- forwards SIGTERM/SIGINT (each worker drains) and exits when they have, 0 when all exited 0;
  forwards SIGHUP (each worker reloads);
- when a worker exits on its own, stops the others and exits non-zero with one line naming
  that worker's exit (2 if it never served: it could not start; 1 after), so an orchestrator
  restarts the pod rather than leaving it at part capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from server.app import SERVICE_NAME
from server.cli import started
from server.config import ServerConfig, config_to_json
from server.metrics import MetricsServer
from server.metrics_merge import WorkersCollector, WorkerTarget
from server.worker import STATUS_PREFIX

log = logging.getLogger("rnnlm.supervisor")

# Beyond the workers' own drain (--grace-seconds and a second to end streams), how long the
# supervisor waits before it kills a worker that has not exited.
STOP_SLACK_SECONDS = 15.0


class WorkerExited(Exception):
    """A worker ended without being asked to; the message names it and how it ended."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Worker:
    """One worker process: `metrics_port` and `serving` from its status line."""

    index: int
    process: asyncio.subprocess.Process
    metrics_port: int = 0
    serving: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


def supervise(config: ServerConfig) -> int:
    """`rnnlm serve` with --processes > 1: 0 after a clean stop; 2 when it cannot start; 1
    when a worker exited unexpectedly."""
    code = 0

    async def main() -> None:
        nonlocal code
        with reserved_port(config) as port:
            code = await Supervisor(config, port).run()

    return started(main, check=config) or code


@contextlib.contextmanager
def reserved_port(config: ServerConfig) -> Iterator[int]:
    """The workers' gRPC port: --port, or for --port 0 a free one, held (bound, not listening,
    with SO_REUSEPORT, which lets the workers bind it too) until the supervisor ends."""
    if config.port:
        yield config.port
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            holder.bind((config.host, 0))
        except OSError as e:
            raise OSError(f"--port 0: cannot pick a free port on {config.host} ({e})") from e
        yield int(holder.getsockname()[1])


class Supervisor:
    """The workers of one `rnnlm serve --processes N`, their /metrics and health, their signals."""

    def __init__(self, config: ServerConfig, port: int) -> None:
        self.config = config
        self.port = port
        self.workers: list[Worker] = []
        self._stopping = False
        self._health = health.aio.HealthServicer()
        self._health_server: grpc.aio.Server | None = None
        self._metrics: MetricsServer | None = None

    def targets(self) -> list[WorkerTarget]:
        return [WorkerTarget(w.index, w.pid, w.metrics_port) for w in self.workers if w.serving]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            await self._open()
            self.workers = [await self._spawn(i) for i in range(self.config.processes)]
            watch = asyncio.ensure_future(self._watch())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait((watch, stopped), return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                stopped.cancel()
                watch.result()  # raises WorkerExited
            log.info("stop requested by signal: draining %d workers", len(self.workers))
            return await self._stop()
        except WorkerExited as e:
            print(f"rnnlm serve: {e}; stopped the other workers", file=sys.stderr)
            await self._stop()
            return e.code
        finally:
            await self._close()

    async def _open(self) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(self.targets))
        c = self.config
        self._metrics = MetricsServer(registry, c.host, c.metrics_port)
        log.info(
            "metrics (summed over %d workers) on http://%s:%d/metrics",
            c.processes,
            c.host,
            self._metrics.port,
        )
        if c.health_port is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            try:
                port = server.add_insecure_port(f"{c.host}:{c.health_port}")
            except RuntimeError as e:
                raise OSError(
                    f"--health-port: cannot listen on {c.host}:{c.health_port} ({e})"
                ) from e
            await server.start()
            self._health_server = server
            log.info("health (all workers SERVING) on %s:%d (plaintext)", c.host, port)

    async def _spawn(self, index: int) -> Worker:
        config = replace(self.config, processes=1, port=self.port, metrics_port=0, health_port=None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.worker",
            str(index),
            config_to_json(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        log.info("worker %d started (pid %d)", index, process.pid)
        return Worker(index, process)

    async def _watch(self) -> None:
        """Follow every worker's status until one exits (WorkerExited)."""
        await asyncio.gather(*(self._follow(w) for w in self.workers))

    async def _follow(self, worker: Worker) -> None:
        assert worker.process.stdout is not None
        async for raw in worker.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line.startswith(STATUS_PREFIX):
                print(line, flush=True)  # a worker's own stdout, passed on
                continue
            worker.metrics_port = int(json.loads(line[len(STATUS_PREFIX) :])["metrics_port"])
            worker.serving = True
            if all(w.serving for w in self.workers):
                log.info(
                    "serving on %s:%d with %d workers (pids %s)",
                    self.config.host,
                    self.port,
                    len(self.workers),
                    ", ".join(str(w.pid) for w in self.workers),
                )
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        code = await worker.process.wait()
        if self._stopping:
            return
        started_ = "" if worker.serving else " before it served"
        raise WorkerExited(
            f"worker {worker.index} (pid {worker.pid}) exited{started_}: {_exit(code)}",
            1 if worker.serving else 2,
        )

    def _forward(self, sig: signal.Signals) -> None:
        log.info("%s: passed on to %d workers", sig.name, len(self.workers))
        for worker in self.workers:
            worker.signal(sig)

    async def _stop(self) -> int:
        """SIGTERM to every worker, then wait for them: 0 when every one exited with 0."""
        self._stopping = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._forward(signal.SIGTERM)
        wait = self.config.grace_seconds + STOP_SLACK_SECONDS
        codes = []
        for worker in self.workers:
            try:
                codes.append(await asyncio.wait_for(worker.process.wait(), wait))
            except TimeoutError:
                log.error("worker %d (pid %d) did not stop: killed", worker.index, worker.pid)
                worker.signal(signal.SIGKILL)
                codes.append(await worker.process.wait())
        failed = [(w, c) for w, c in zip(self.workers, codes, strict=True) if c != 0]
        for worker, code in failed:
            log.error("worker %d (pid %d): %s", worker.index, worker.pid, _exit(code))
        log.info("stopped")
        return 1 if failed else 0

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def _close(self) -> None:
        if self._health_server is not None:
            await self._health_server.stop(grace=0)
        if self._metrics is not None:
            self._metrics.close()


def _exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"
