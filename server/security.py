"""Transport security and authentication: TLS (optionally mutual) and bearer tokens.

The files behind `--tls-cert`, `--tls-key`, `--tls-client-ca` and `--auth-token-file` are read
and checked at start, and a bad one stops the start with a `ConfigError` naming the flag and the
file. `refresh()` reads them again (on SIGHUP and with `--reload-seconds`), so certificates and
tokens rotate without a restart: a new certificate is handed to gRPC for the next TLS handshake
(the native front end's gRPC reads it from the private copies `TlsFiles.install` keeps, within a
second), new tokens apply to the next call. A file that has gone bad is reported and the previous
contents stay in force, so a botched rotation never takes a serving replica down.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from server.config import ConfigError

log = logging.getLogger(__name__)

# Services anyone may call: probes and tools must work without a token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# RFC 6750 b64token: what may follow "Bearer " in an authorization header.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_CHARS = 16
_CHALLENGE = (("www-authenticate", 'Bearer realm="rnnlm"'),)


def read_secret_file(path: Path, flag: str) -> bytes:
    """A file's bytes; ConfigError naming `flag` and the file when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read the file ({e.strerror or e})") from e


def secret_lines(data: bytes, path: Path, flag: str) -> list[tuple[int, str]]:
    """(line number, text) of every line that is not blank or a # comment."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not UTF-8 text ({e})") from e
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not lines:
        raise ConfigError(f"{flag} {path}: the file has no entry (blank and # lines are skipped)")
    return lines


# -- TLS ------------------------------------------------------------------------------------


class _EncryptedKey(Exception):
    """The private key asks for a passphrase, which a server started unattended cannot give."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


class TlsFiles:
    """The server's certificate, key and optional client CA, as gRPC server credentials."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._material = self._read()
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._copies: list[Path] = []  # directories `install` keeps up to date

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that pick up refreshed files at the next handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self._material),
            self._fetch,
            require_client_authentication=self.mutual,
        )

    def install(self, directory: Path) -> None:
        """Keep copies of the checked files in `directory` (private to this user), rewritten
        by every `refresh` that finds a change (`_write_copies`), for a reader that watches
        the files (the native front end) never to see one half written or one that failed
        the checks."""
        directory.mkdir(mode=0o700, exist_ok=True)
        with self._lock:
            self._copies.append(directory)
            _write_copies(directory, self._material)

    def uninstall(self, directory: Path) -> None:
        """Stop keeping `directory`'s copies (its owner removes it)."""
        with self._lock:
            self._copies = [d for d in self._copies if d != directory]

    def refresh(self) -> bool:
        """Read the files again; True when they changed (the next handshake uses them)."""
        material = self._read()
        with self._lock:
            if material == self._material:
                return False
            self._material = material
            self._pending = self._configuration(material)
            for directory in self._copies:
                _write_copies(directory, material)
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on its own threads before each handshake: None keeps the current one.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def _configuration(
        self, material: tuple[bytes, bytes, bytes | None]
    ) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        cert = read_secret_file(self.cert, "--tls-cert")
        key = read_secret_file(self.key, "--tls-key")
        client_ca = (
            read_secret_file(self.client_ca, "--tls-client-ca")
            if self.client_ca is not None
            else None
        )
        _check_certificates(cert, self.cert, "--tls-cert", "certificate")
        if b"PRIVATE KEY-----" not in key:
            raise ConfigError(f"--tls-key {self.key}: no PEM private key in the file")
        if client_ca is not None:
            assert self.client_ca is not None
            _check_certificates(client_ca, self.client_ca, "--tls-client-ca", "CA certificate")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key, password=_no_passphrase)
        except _EncryptedKey as e:
            raise ConfigError(
                f"--tls-key {self.key}: the key is encrypted with a passphrase; give the server "
                "an unencrypted key (protect the file instead)"
            ) from e
        except ssl.SSLError as e:
            if "KEY_VALUES_MISMATCH" in str(e):
                raise ConfigError(
                    f"--tls-key {self.key} is not the private key of the certificate in "
                    f"--tls-cert {self.cert}"
                ) from e
            raise ConfigError(
                f"--tls-cert {self.cert} and --tls-key {self.key}: not a usable certificate and "
                f"key ({e.reason or e})"
            ) from e
        except OSError as e:
            raise ConfigError(
                f"--tls-cert {self.cert} / --tls-key {self.key}: cannot read ({e})"
            ) from e
        # The files were read twice (bytes, then by OpenSSL): a rotation in between is retried.
        if (cert, key) != (self.cert.read_bytes(), self.key.read_bytes()):
            raise ConfigError(
                f"--tls-cert {self.cert} / --tls-key {self.key}: changed while being read"
            )
        return cert, key, client_ca


def _write_copies(directory: Path, material: tuple[bytes, bytes, bytes | None]) -> None:
    """`TlsFiles.install`'s files, each replaced whole: identity.pem, the key followed by the
    certificate chain (one file, so that no reader pairs a new certificate with an old key:
    PEM readers skip the blocks of other kinds), and ca.pem with client certificates."""
    cert, key, client_ca = material
    files = [("identity.pem", key.rstrip(b"\n") + b"\n" + cert), ("ca.pem", client_ca)]
    for name, data in files:
        if data is None:
            continue
        partial = directory / f".{name}.new"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, directory / name)


def _check_certificates(data: bytes, path: Path, flag: str, what: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: no PEM {what} in the file ({e})") from e


# -- bearer tokens ----------------------------------------------------------------------------


class BearerTokens:
    """The accepted tokens of `--auth-token-file` (one per line), kept as SHA-256 digests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digests = self._read()

    def refresh(self) -> bool:
        """Read the file again; True when the set of tokens changed."""
        digests = self._read()
        changed = digests != self._digests
        self._digests = digests
        return changed

    def __len__(self) -> int:
        return len(self._digests)

    def _read(self) -> tuple[bytes, ...]:
        flag = "--auth-token-file"
        digests = []
        for number, token in secret_lines(read_secret_file(self.path, flag), self.path, flag):
            if not _TOKEN_CHARS.fullmatch(token):
                raise ConfigError(
                    f"{flag} {self.path} line {number}: a token may only have letters, digits "
                    "and - . _ ~ + / (then = padding), as a bearer token must"
                )
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(
                    f"{flag} {self.path} line {number}: the token has {len(token)} characters; "
                    f"use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)"
                )
            digests.append(hashlib.sha256(token.encode()).digest())
        return tuple(digests)

    def problem(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """Why a call's metadata is not authorised, or None when it carries a known token."""
        values = [v for k, v in metadata or () if k.lower() == "authorization"]
        if not values:
            return (
                "this server requires authentication: send the metadata "
                "`authorization: Bearer <token>`"
            )
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the authorization metadata must be `Bearer <token>`"
        presented = hashlib.sha256(token.strip().encode()).digest()
        # Every digest is compared, in constant time, whatever matches.
        valid = False
        for digest in self._digests:
            valid |= hmac.compare_digest(presented, digest)
        return None if valid else "the bearer token in the authorization metadata is not valid"


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED (health is open).

    The decision is made on the call's metadata alone, and a refused call's request is never
    read: however large, it is not received past the transport's flow-control window, nor
    parsed (the receive limit of an unauthenticated call is nothing).
    """

    def __init__(self, tokens: BearerTokens, on_refused: Callable[[str], None]) -> None:
        self._tokens = tokens
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        problem = self._tokens.problem(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        self._on_refused(method)
        return _refusal(problem)


def _refusal(message: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading the request.

    It is a streaming handler whatever the method's shape: grpcio reads a unary call's request
    before its handler runs, and a streaming call's only when the handler asks; the wire does
    not tell the two apart, so a unary client gets the status all the same.
    """

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message, _CHALLENGE)

    return grpc.stream_stream_rpc_method_handler(refuse)
