"""The assembled server: gRPC services, health, reflection, metrics endpoint, model engines.

Start order keeps a load balancer honest: the port opens first with health NOT_SERVING (so a
liveness probe passes while models load), then every model is loaded and warmed up, and only
then does health say SERVING. Stopping reverses it: health goes NOT_SERVING, every client
connection gets a GOAWAY (its next calls go to another replica), typing sessions waiting for
their next event end with UNAVAILABLE (the client resumes elsewhere with its state token),
in-flight calls get up to the grace period, streams still open after it are ended, then the
transport stops and the engines close. Connections also get a GOAWAY when they reach
--max-connection-age-seconds, so long-lived channels spread over replicas added since.

Security comes from the configuration's files (server.security): TLS or mutual TLS on the gRPC
port, bearer tokens checked by an interceptor, and the state-token keys. `reload()` (SIGHUP,
and every --reload-seconds when set) reads those files again and brings the model repository
in line with its directory; whatever fails to load or read is logged and the server goes on
with what it had.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server import heap
from server.blas import limit_blas_threads
from server.config import ConfigError, ServerConfig
from server.engine import EngineConfig
from server.front_end import Handlers, NativeFrontEnd
from server.front_end import available as front_end_built
from server.guard import DecodeGuard
from server.limits import Limits
from server.metrics import Metrics, MetricsServer
from server.reflection import enable_reflection
from server.repository import ModelRepository, ReloadResult
from server.security import BearerAuthInterceptor, BearerTokens, TlsFiles
from server.servicer import LanguageModelServicer
from server.state_token import StateTokens
from server.typing import word_cache_settings, word_settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageModel"].full_name
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the grace period, how long ended streams get to send their last message.
_END_STREAMS_SECONDS = 1.0


def engine_config(config: ServerConfig) -> EngineConfig:
    return EngineConfig(
        provider=config.provider,
        intra_op_threads=config.intra_op_threads,
        sampler=config.sampler,
        batching=config.batching,
        max_step_ms=config.max_step_ms,
        max_batch_size=config.max_batch_size,
        batch_threads=config.batch_threads,
        process=config.engine_process,
        max_queue_wait_ms=config.max_queue_wait_ms,
        max_queued=config.max_queued,
        stream_tokens=config.stream_tokens,
        stream_ms=config.stream_ms,
        state_cache_bytes=config.state_cache_bytes,
    )


def limits(config: ServerConfig) -> Limits:
    return Limits(
        max_tokens=config.max_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        max_text_chars=config.max_text_chars,
        max_message_bytes=config.max_message_bytes,
    )


def transport_options(config: ServerConfig, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message sizes and the connections' maximum age.

    SO_REUSEPORT is off unless `reuse_port` (the workers of `--processes N`, server/supervisor.py,
    share one port): a second server on a taken port must fail, not split its connections.
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if config.max_connection_age_seconds > 0:
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age_seconds)))
        if config.max_connection_age_grace_seconds > 0:
            grace = _ms(config.max_connection_age_grace_seconds)
            options.append(("grpc.max_connection_age_grace_ms", grace))
    return options


def native_front_end(config: ServerConfig) -> bool:
    """Whether the server speaks gRPC through the native front end (--front-end)."""
    if config.front_end == "auto":
        return front_end_built()
    return config.front_end == "native"


def _ms(seconds: float) -> int:
    return max(1, min(round(seconds * 1000), 2**31 - 1))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class RnnlmServer:
    """One server process's worth of serving. `port` and `metrics_port` are the bound ports.

    A worker of `--processes N` passes `reuse_port` (its gRPC port is shared with the other
    workers) and `metrics_host` (its /metrics is read by the supervisor alone, on loopback).
    """

    def __init__(
        self, config: ServerConfig, *, reuse_port: bool = False, metrics_host: str | None = None
    ) -> None:
        self.config = config
        self._reuse_port = reuse_port
        self._metrics_host = config.host if metrics_host is None else metrics_host
        self.metrics = Metrics()
        self.port = 0
        self.metrics_port = 0
        self.repository: ModelRepository | None = None
        self._servicer = LanguageModelServicer(self.metrics, limits(config))
        self._servicer.words = word_settings(config)
        self._servicer.word_cache = word_cache_settings(config)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | NativeFrontEnd | None = None
        # Set when the server can no longer serve (the native front end died): `rnnlm serve`
        # stops it and exits non-zero, so that its supervisor (Kubernetes) starts it again.
        self.broken = asyncio.Event()
        self._metrics_server: MetricsServer | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        self._stopped = asyncio.Event()
        self._stopping = False
        self._tls: TlsFiles | None = None
        self._auth: BearerTokens | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the poller and signalled reloads
        self._model_health: set[str] = set()  # the models with a per-model health status

    async def start(self) -> None:
        """Open the ports, load and warm every model, then report SERVING.

        On any failure everything started so far is stopped and the error is raised.
        """
        try:
            if (limited := limit_blas_threads(os.environ)) is not None:
                log.info(limited)
            self.metrics.gc_pauses.start()
            self._read_secrets()
            await self._open()
            self.repository = await ModelRepository.load(
                self.config.models,
                self.config.default_model,
                engine_config(self.config),
                self.metrics,
                strict=self.config.strict_models,
            )
        except BaseException:
            await self.stop(grace=0)
            raise
        self.repository.on_unloaded = lambda: self._settle_heap("a retired model closed")
        self._settle_heap("the models loaded")
        self._servicer.repository = self.repository
        self._servicer.accepting = True
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await self._report_model_health()
        log.info(
            "serving %s on %s (default model %s)",
            ", ".join(f"{m.name}:{m.version}" for m in self.repository.models),
            _address(self.config.host, self.port),
            self.repository.default_model or "none",
        )
        if self.repository.failures:
            log.error(
                "not serving %d bundle(s) that failed to load (logged above): %s",
                len(self.repository.failures),
                ", ".join(str(p) for p in self.repository.failures),
            )
        if self.config.reload_seconds > 0:
            self._spawn(self._poll())

    def _read_secrets(self) -> None:
        c = self.config
        if c.tls_cert is not None and c.tls_key is not None:
            self._tls = TlsFiles(c.tls_cert, c.tls_key, c.tls_client_ca)
        if c.auth_token_file is not None:
            self._auth = BearerTokens(c.auth_token_file)
            log.info("bearer-token authentication on: %d tokens accepted", len(self._auth))
        if c.state_token_key_file is not None:
            tokens = StateTokens.from_file(c.state_token_key_file)
            self._servicer.state_tokens = tokens
            log.info("state tokens on: %d keys (the first one signs)", len(tokens.keys))

    # -- reload ----------------------------------------------------------------------------

    async def reload(self, *, retry_failed: bool = True) -> ReloadResult:
        """Re-read the certificate, token and key files, then reload the model repository."""
        if self.repository is None or self._stopping:
            return ReloadResult()
        self._refresh_secrets()
        result = await self.repository.reload(retry_failed=retry_failed)
        if result.loaded or result.unloaded:
            self._settle_heap("a reload changed the models")
        if not self._stopping:
            await self._report_model_health()
        return result

    def _settle_heap(self, why: str) -> None:
        """Keep what is alive now out of the garbage collector's walks (server/heap.py)."""
        seconds = heap.settle()
        log.info("froze %d objects after %s (%.0f ms)", gc.get_freeze_count(), why, seconds * 1e3)

    async def _report_model_health(self) -> None:
        """Health per model, service `rnnlm.v1.LanguageModel/NAME`: SERVING while a version of
        it is served; NOT_SERVING when its bundles failed to load, or it was removed."""
        assert self.repository is not None
        served = {m.name for m in self.repository.models}
        self._model_health |= served | self.repository.failed_models()
        for name in sorted(self._model_health):
            status = health_pb2.HealthCheckResponse.SERVING if name in served else NOT_SERVING
            await self._health.set(f"{SERVICE_NAME}/{name}", status)

    def request_reload(self) -> None:
        """Start a reload in the background (the SIGHUP handler)."""
        log.info("reload requested")
        self._spawn(self.reload())

    def _refresh_secrets(self) -> None:
        refreshers = []
        if self._tls is not None:
            refreshers.append(("TLS certificate and key", self._tls.refresh))
        if self._auth is not None:
            refreshers.append(("bearer tokens", self._auth.refresh))
        if self._servicer.state_tokens is not None:
            refreshers.append(("state-token keys", self._refresh_state_tokens))
        for what, refresh in refreshers:
            try:
                if refresh():
                    log.info("reloaded the %s", what)
            except ConfigError as e:
                log.error("keeping the previous %s: %s", what, e)

    def _refresh_state_tokens(self) -> bool:
        current = self._servicer.state_tokens
        assert current is not None and current.path is not None
        tokens = StateTokens.from_file(current.path)
        if tokens.keys == current.keys:
            return False
        self._servicer.state_tokens = tokens
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_seconds)
            await self.reload(retry_failed=False)

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("reload failed unexpectedly; the server goes on as it was")

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refused(
        self, method: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
    ) -> None:
        """Count a call of the LanguageModel service refused before the servicer saw it."""
        service, _, name = method.lstrip("/").rpartition("/")
        if service == SERVICE_NAME:
            self.metrics.requests.labels(method=name, model="", code=code.name).inc()

    # -- transport --------------------------------------------------------------------------

    async def _open(self) -> None:
        c = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self._auth is not None:
            interceptors.append(BearerAuthInterceptor(self._auth, self._refused))
        interceptors.append(DecodeGuard(self._refused))
        options = transport_options(c, self._reuse_port)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = _address(c.host, c.port)
        native = native_front_end(c)
        if native:
            await self._open_native(interceptors, options, address)
        else:
            await self._open_python(interceptors, options, address)
        if self._tls is None:
            transport = "plaintext"
        elif self._tls.mutual:
            transport = "TLS, client certificates required"
        else:
            transport = "TLS"
        if native:
            transport += ", native front end"
        log.info("gRPC listening on %s (%s)", _address(c.host, self.port), transport)
        if c.health_port is not None:
            await self._open_health_port(c.health_port)
        host = self._metrics_host
        try:
            self._metrics_server = MetricsServer(self.metrics, host, c.metrics_port)
        except OSError as e:
            raise OSError(
                f"--metrics-port: cannot listen on {_address(host, c.metrics_port)} ({e})"
            ) from e
        self.metrics_port = self._metrics_server.port
        log.info("metrics on http://%s/metrics", _address(host, self.metrics_port))

    def _add_services(self, server: grpc.aio.Server | Handlers) -> None:
        pb_grpc.add_LanguageModelServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)  # v1 and v1alpha

    async def _open_python(
        self,
        interceptors: list[grpc.aio.ServerInterceptor],
        options: list[tuple[str, int]],
        address: str,
    ) -> None:
        server = grpc.aio.server(interceptors=interceptors, options=options)
        self._add_services(server)
        try:
            if self._tls is not None:
                self.port = server.add_secure_port(address, self._tls.server_credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"--port: cannot listen on {address} ({e})") from e
        await server.start()
        self._server = server

    async def _open_native(
        self,
        interceptors: list[grpc.aio.ServerInterceptor],
        options: list[tuple[str, int]],
        address: str,
    ) -> None:
        handlers = Handlers()
        self._add_services(handlers)
        # With bearer tokens, a call's request is received only once the token was checked.
        hold = self._auth is not None
        front = NativeFrontEnd(
            handlers,
            interceptors,
            options,
            on_lost=self._front_end_lost,
            hold_requests=hold,
            tls=self._tls,
        )
        try:
            self.port = await front.start(address)
        except OSError as e:
            raise OSError(f"--port: {e}") from e
        self._server = front

    def _front_end_lost(self) -> None:
        """The native front end died: nothing can reach this server any more."""
        self.broken.set()

    async def _open_health_port(self, port: int) -> None:
        """grpc.health.v1 alone, in plaintext: what a TLS-unaware probe needs and no more."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = _address(self.config.host, port)
        try:
            self.health_port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"--health-port: cannot listen on {address} ({e})") from e
        await server.start()
        self._health_server = server
        log.info("health (only) on %s (plaintext)", _address(self.config.host, self.health_port))

    def _stop_transport(self, grace: float) -> asyncio.Future[None] | None:
        """Start stopping the gRPC port: GOAWAY to every client connection now, so that clients
        send their next calls elsewhere, while the calls in flight here go on for `grace`."""
        if self._server is None:
            return None
        return asyncio.ensure_future(self._server.stop(grace))

    async def stop(self, grace: float | None = None) -> None:
        """Drain (up to `grace` seconds, default --grace-seconds), then shut everything down."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down: draining in-flight calls for up to %.1f s", grace)
        await self._health.enter_graceful_shutdown()
        self._servicer.start_drain()
        transport = self._stop_transport(grace + _END_STREAMS_SECONDS)
        if not await self._servicer.drain(grace):
            log.warning("grace period over: ending the streams still open")
            self._servicer.end_streams()
            await self._servicer.drain(_END_STREAMS_SECONDS)
        for server in (self._server, self._health_server):
            if server is not None:
                await server.stop(grace=0)  # what is left (health watches): ended now
        if transport is not None:
            await transport
        if self.repository is not None:
            await self.repository.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self.metrics.gc_pauses.stop()
        log.info("stopped")
        self._stopped.set()
