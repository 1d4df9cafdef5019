"""`rnnlm serve`: run the gRPC server until SIGTERM or SIGINT, then shut down gracefully.

SIGHUP reloads without a restart: the model repository (new, changed and removed bundles) and
the TLS, bearer-token and state-token key files.

`--processes N` (N > 1) runs N such servers on one port under a supervisor (server/supervisor.py).

Exit codes: 0 after a clean shutdown; 2 when the server cannot start (a bad flag or environment
value, a bad model repository or bundle, an execution provider that is not available, a port in
use), with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from server.app import RnnlmServer
from server.bundle import BundleError
from server.config import ConfigError, ServerConfig, add_arguments, config_from_args
from server.engine import EngineError
from server.repository import RepositoryError

log = logging.getLogger("rnnlm.serve")

_STARTUP_ERRORS = (ConfigError, RepositoryError, BundleError, EngineError, OSError)


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"rnnlm serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.processes > 1:
        from server.supervisor import supervise  # only for --processes N; it imports this

        return supervise(config)
    return started(lambda: serve(config), check=config)


class Broken(Exception):
    """The server stopped because it could no longer serve."""


def started(main: Callable[[], Coroutine[Any, Any, object]], check: ServerConfig | None) -> int:
    """Run `main` (after checking `check`'s ports): 0 when it ends, 2 when it cannot start, 1
    when it broke while serving, with one line on stderr saying why."""
    try:
        if check is not None:
            check_ports(check)
        asyncio.run(main())
    except _STARTUP_ERRORS as e:
        print(f"rnnlm serve: cannot start: {e}", file=sys.stderr)  # once, and only here
        return 2
    except Broken as e:
        print(f"rnnlm serve: {e}", file=sys.stderr)
        return 1
    return 0


def check_ports(config: ServerConfig) -> None:
    """Refuse a port that another process holds before anything starts, naming the reason:
    grpcio reports only "Failed to bind" (after printing its own line) for a port in use."""
    ports = (
        ("--port", config.port),
        ("--metrics-port", config.metrics_port),
        ("--health-port", config.health_port),
    )
    for flag, port in ports:
        if port:  # None is off, 0 picks a free port
            _probe(flag, config.host, port)


def _probe(flag: str, host: str, port: int) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise OSError(f"--host {host!r}: not an address of this machine ({e.strerror})") from e
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio and http.server
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(
                    f"{flag} {port}: address already in use on {host} (another process "
                    "listens there; stop it or choose another port)"
                ) from e
            if e.errno == errno.EACCES:
                raise OSError(
                    f"{flag} {port}: permission denied on {host} (ports below 1024 need privileges)"
                ) from e
            raise OSError(f"{flag} {port}: cannot listen on {host} ({e.strerror or e})") from e


async def serve(
    config: ServerConfig,
    make: Callable[[ServerConfig], RnnlmServer] = RnnlmServer,
    ready: Callable[[RnnlmServer], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain for --grace-seconds and stop; SIGHUP reloads.

    A stop signal while the models are still loading abandons the start. `make` builds the
    server and `ready` hears when it serves (a worker of --processes N, server/worker.py).
    """
    server = make(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    starting = asyncio.create_task(server.start())
    signalled = asyncio.create_task(stop_requested.wait())
    await asyncio.wait((starting, signalled), return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        try:
            starting.result()
        except BaseException:
            signalled.cancel()
            raise
        if ready is not None:
            ready(server)
        broken = asyncio.create_task(server.broken.wait())
        await asyncio.wait((signalled, broken), return_when=asyncio.FIRST_COMPLETED)
        if broken.done():
            signalled.cancel()
            await server.stop(grace=0)
            raise Broken("the native front end exited (logged above); stopped")
        broken.cancel()
    else:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    log.info("stop requested by signal")
    await server.stop()
