"""TLS, mutual TLS and bearer tokens on a real server, with a throwaway PKI made by `openssl`.

The certificates are made in a temporary directory with the openssl command line (the serving
install has no X.509 library and needs none: Python's `ssl` checks the files, gRPC serves them).
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from test_server import FRONT_ENDS, ROOT, LiveServer, config, metric

from rnnlm.cli import main
from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from server.config import ConfigError, ServerConfig
from server.security import TlsFiles

Code = grpc.StatusCode
TOKENS = ("first-token-0123456789abcdef", "second-token-0123456789abcdef")

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True)


def _key(directory: Path, name: str) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key",
             cwd=directory)  # fmt: skip


def _ca(directory: Path, name: str) -> None:
    _key(directory, name)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=directory)  # fmt: skip


def _leaf(directory: Path, name: str, ca: str, san: str) -> None:
    _key(directory, name)
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)  # fmt: skip
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=directory)  # fmt: skip


@dataclass(frozen=True)
class Pki:
    """Two CAs; a server and a client certificate from `ca`, and the same from `other`."""

    directory: Path

    def __call__(self, name: str) -> Path:
        return self.directory / name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_names = "DNS:localhost,IP:127.0.0.1"
    for ca in ("ca", "other"):
        _ca(directory, ca)
        _leaf(directory, f"{ca}-server", ca, server_names)
        _leaf(directory, f"{ca}-client", ca, "DNS:client")
    _leaf(directory, "internal-server", "ca", "DNS:rnnlm.internal")
    return Pki(directory)


@pytest.fixture(params=FRONT_ENDS)
def serve(
    default_bundle: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LiveServer]]:
    """Start servers on the tiny default bundle, behind each front end; each is stopped at the
    end of the test."""
    started: list[LiveServer] = []

    def start(**overrides: object) -> LiveServer:
        overrides.setdefault("front_end", request.param)
        server = LiveServer(config(default_bundle, **overrides))
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_serves_clients_that_trust_its_ca(serve: Callable[..., LiveServer], pki: Pki) -> None:
    live = serve(tls_cert=pki("ca-server.pem"), tls_key=pki("ca-server.key"))
    with Client(live.target, timeout=10, tls_ca=pki("ca.pem")) as client:
        assert client.predict_next("the", k=2).predictions
        assert client.health() == "SERVING"
    with Client(f"localhost:{live.server.port}", timeout=10, tls_ca=pki("ca.pem")) as client:
        assert client.list_models()
    # Plaintext, and TLS that trusts another CA, do not get through.
    with Client(live.target, timeout=5) as client:
        assert _refused(client.list_models).code() == Code.UNAVAILABLE
    with Client(live.target, timeout=5, tls_ca=pki("other.pem")) as client:
        assert _refused(client.list_models).code() == Code.UNAVAILABLE


def test_the_expected_server_name_can_differ_from_the_target(
    serve: Callable[..., LiveServer], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """As through a port-forward: the target is 127.0.0.1, the certificate names another host."""
    live = serve(tls_cert=pki("internal-server.pem"), tls_key=pki("internal-server.key"))
    with Client(live.target, timeout=5, tls_ca=pki("ca.pem")) as client:
        assert _refused(client.list_models).code() == Code.UNAVAILABLE
    with Client(live.target, timeout=10, tls_ca=pki("ca.pem"),
                tls_server_name="rnnlm.internal") as client:  # fmt: skip
        assert client.list_models()
    argv = ["models", "--target", live.target, "--tls-ca", str(pki("ca.pem"))]
    assert main([*argv, "--tls-server-name", "rnnlm.internal"]) == 0
    assert "tiny-lstm-word" in capsys.readouterr().out


def test_mutual_tls_requires_a_client_certificate_from_its_ca(
    serve: Callable[..., LiveServer], pki: Pki
) -> None:
    live = serve(
        tls_cert=pki("ca-server.pem"), tls_key=pki("ca-server.key"), tls_client_ca=pki("ca.pem")
    )
    trusted = {"tls_ca": pki("ca.pem")}
    with Client(live.target, timeout=10, tls_cert=pki("ca-client.pem"),
                tls_key=pki("ca-client.key"), **trusted) as client:  # fmt: skip
        assert [c.completion_tokens for c in client.generate("the", max_tokens=3, seed=1)][-1] == 3
    with Client(live.target, timeout=5, **trusted) as client:
        assert _refused(client.list_models).code() == Code.UNAVAILABLE
        # Health is behind the handshake too: mTLS guards the port, not a service.
        assert _refused(client.health).code() == Code.UNAVAILABLE
    with Client(live.target, timeout=5, tls_cert=pki("other-client.pem"),
                tls_key=pki("other-client.key"), **trusted) as client:  # fmt: skip
        assert _refused(client.list_models).code() == Code.UNAVAILABLE


def test_a_plaintext_health_port_serves_probes_and_nothing_else(
    serve: Callable[..., LiveServer], pki: Pki
) -> None:
    live = serve(
        tls_cert=pki("ca-server.pem"),
        tls_key=pki("ca-server.key"),
        tls_client_ca=pki("ca.pem"),
        health_port=0,
    )
    assert live.server.health_port not in (0, live.server.port)
    with Client(f"127.0.0.1:{live.server.health_port}", timeout=10) as client:
        assert client.health() == "SERVING"
        assert client.health("rnnlm.v1.LanguageModel") == "SERVING"
        assert _refused(client.list_models).code() == Code.UNIMPLEMENTED


def test_the_cli_speaks_tls_and_mutual_tls(
    serve: Callable[..., LiveServer], pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    live = serve(
        tls_cert=pki("ca-server.pem"), tls_key=pki("ca-server.key"), tls_client_ca=pki("ca.pem")
    )
    client_cert = ["--tls-cert", str(pki("ca-client.pem")), "--tls-key", str(pki("ca-client.key"))]
    argv = ["generate", "the cat", "--max-tokens", "4", "--seed", "1", "--target", live.target,
            "--tls-ca", str(pki("ca.pem"))]  # fmt: skip
    assert main([*argv, *client_cert]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "[length: 2 prompt tokens, 4 generated]" in err
    assert main([*argv, "--timeout", "5"]) == 1
    assert capsys.readouterr().err.startswith("rnnlm generate: UNAVAILABLE")
    assert main([*argv, "--tls-cert", str(pki("ca-client.pem"))]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert main(["models", "--target", live.target, "--tls-ca", str(pki("missing.pem"))]) == 1
    assert "missing.pem" in capsys.readouterr().err


def test_reload_rotates_the_server_certificate(serve: Callable[..., LiveServer], pki: Pki,
                                               tmp_path: Path) -> None:  # fmt: skip
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki("ca-server.pem"), cert)
    shutil.copy(pki("ca-server.key"), key)
    live = serve(tls_cert=cert, tls_key=key)
    with Client(live.target, timeout=10, tls_ca=pki("ca.pem")) as client:
        assert client.list_models()
    # A rotation to a bad pair is refused and the server keeps its certificate.
    shutil.copy(pki("other-server.pem"), cert)
    live.run(live.server.reload())
    with Client(live.target, timeout=10, tls_ca=pki("ca.pem")) as client:
        assert client.list_models()
    shutil.copy(pki("other-server.key"), key)
    live.run(live.server.reload())
    # The native front end's gRPC reads the new pair within a second of the reload.
    assert _eventually(lambda: _handshakes(live.target, pki("other.pem")), seconds=5)
    with Client(live.target, timeout=5, tls_ca=pki("ca.pem")) as client:
        assert _refused(client.list_models).code() == Code.UNAVAILABLE


def _handshakes(target: str, ca: Path) -> bool:
    """Whether a new connection to `target` that trusts only `ca` gets an answer."""
    with Client(target, timeout=5, tls_ca=ca) as client:
        try:
            return bool(client.list_models())
        except grpc.RpcError:
            return False


def _eventually(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_bad_tls_files_stop_the_start_with_the_flag_and_file(
    default_bundle: Path, pki: Pki, tmp_path: Path
) -> None:
    encrypted = tmp_path / "encrypted.key"
    _openssl("ec", "-in", str(pki("ca-server.key")), "-aes256", "-passout", "pass:secret",
             "-out", str(encrypted), cwd=tmp_path)  # fmt: skip
    cert, key = pki("ca-server.pem"), pki("ca-server.key")
    cases = [
        ({"tls_cert": tmp_path / "nope.pem", "tls_key": key}, "--tls-cert .*nope.pem: cannot read"),
        ({"tls_cert": cert, "tls_key": tmp_path}, "--tls-key .*: cannot read"),
        ({"tls_cert": cert, "tls_key": pki("ca-client.key")}, "is not the private key of"),
        ({"tls_cert": key, "tls_key": key}, "--tls-cert .*: no PEM certificate"),
        ({"tls_cert": cert, "tls_key": cert}, "--tls-key .*: no PEM private key"),
        ({"tls_cert": cert, "tls_key": encrypted}, "encrypted with a passphrase"),
        ({"tls_cert": cert, "tls_key": key, "tls_client_ca": key}, "--tls-client-ca .*: no PEM"),
    ]
    for files, message in cases:
        with pytest.raises(ConfigError, match=message):
            LiveServer(config(default_bundle, **files))
    with pytest.raises(ConfigError, match=r"--tls-key .* needs --tls-cert"):
        ServerConfig(models=default_bundle, tls_key=key)
    with pytest.raises(ConfigError, match=r"--tls-client-ca .* needs --tls-cert"):
        ServerConfig(models=default_bundle, tls_client_ca=cert)


def test_rnnlm_serve_exits_2_on_a_mismatched_key(default_bundle: Path, pki: Pki) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "rnnlm", "serve", "--models", str(default_bundle), "--host",
         "127.0.0.1", "--port", "0", "--metrics-port", "0", "--tls-cert", str(pki("ca-server.pem")),
         "--tls-key", str(pki("other-server.key"))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert process.returncode == 2
    assert "rnnlm serve: cannot start: --tls-key" in process.stderr
    assert "is not the private key of the certificate" in process.stderr


# -- bearer tokens -----------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# rotated monthly\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    return path


def test_calls_need_a_valid_bearer_token(
    serve: Callable[..., LiveServer], token_file: Path
) -> None:
    live = serve(auth_token_file=token_file)
    before = live.scrape()
    for token in TOKENS:
        with Client(live.target, timeout=10, token=token) as client:
            assert client.predict_next("the", k=1).predictions
            assert list(client.typing_session([pb.TypingEvent(text="the ")]))
    with Client(live.target, timeout=10) as client:
        error = _refused(lambda: client.predict_next("the", k=1))
        assert error.code() == Code.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in error.details()
        assert ("www-authenticate", 'Bearer realm="rnnlm"') in error.trailing_metadata()
        assert _refused(lambda: list(client.generate("the", max_tokens=2))).code() == (
            Code.UNAUTHENTICATED
        )
        refused = _refused(lambda: list(client.typing_session([pb.TypingEvent(text="a ")])))
        assert refused.code() == Code.UNAUTHENTICATED
        # Probes and tools need no token.
        assert client.health() == "SERVING"
        assert client.health("rnnlm.v1.LanguageModel") == "SERVING"
    with Client(live.target, timeout=10, token="not-" + TOKENS[0]) as client:
        error = _refused(client.list_models)
        assert error.code() == Code.UNAUTHENTICATED and "not valid" in error.details()
    with grpc.insecure_channel(live.target) as channel:
        error = _refused(
            lambda: channel.unary_unary("/rnnlm.v1.LanguageModel/ListModels")(
                b"", metadata=(("authorization", f"Basic {TOKENS[0]}"),), timeout=10
            )
        )
        assert error.code() == Code.UNAUTHENTICATED and "Bearer <token>" in error.details()
    after = live.scrape()

    def delta(method: str, code: str, model: str) -> float:
        labels = {"method": method, "model": model, "code": code}
        return metric(after, "rnnlm_requests_total", **labels) - metric(
            before, "rnnlm_requests_total", **labels
        )

    assert delta("PredictNext", "OK", "tiny-lstm-word") == 2
    assert delta("PredictNext", "UNAUTHENTICATED", "") == 1
    assert delta("ListModels", "UNAUTHENTICATED", "") == 2
    assert delta("Generate", "UNAUTHENTICATED", "") == 1


def test_reflection_needs_no_token(serve: Callable[..., LiveServer], token_file: Path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    live = serve(auth_token_file=token_file)
    with grpc.insecure_channel(live.target) as channel:
        assert "rnnlm.v1.LanguageModel" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_reload_rotates_the_tokens(serve: Callable[..., LiveServer], token_file: Path) -> None:
    live = serve(auth_token_file=token_file)
    new = "third-token-0123456789abcdef"
    token_file.write_text(new + "\n")
    live.run(live.server.reload())
    with Client(live.target, timeout=10, token=new) as client:
        assert client.list_models()
    with Client(live.target, timeout=10, token=TOKENS[0]) as client:
        assert _refused(client.list_models).code() == Code.UNAUTHENTICATED
    token_file.write_text("short\n")  # a bad file keeps the tokens in force
    live.run(live.server.reload())
    with Client(live.target, timeout=10, token=new) as client:
        assert client.list_models()


def test_the_cli_sends_the_token(
    serve: Callable[..., LiveServer],
    token_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live = serve(auth_token_file=token_file)
    assert main(["predict", "the", "-k", "2", "--target", live.target]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["predict", "the", "-k", "2", "--target", live.target, "--token", TOKENS[1]]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    monkeypatch.setenv("RNNLM_TOKEN", TOKENS[0])
    assert main(["models", "--target", live.target]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("\n# nothing\n", ": the file has no entry"),
        ("short-token\n", " line 1: the token has 11 characters"),
        (f"{TOKENS[0]}\nwith space 0123456789abcdef\n", " line 2: a token may only have"),
    ],
)
def test_bad_token_files_stop_the_start(
    default_bundle: Path, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(f"--auth-token-file {path}{message}")):
        LiveServer(config(default_bundle, auth_token_file=path))


def test_tls_copies_are_private_and_follow_only_checked_rotations(pki: Pki, tmp_path: Path) -> None:
    """The native front end's gRPC reads these copies: never a pair that failed the checks."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki("ca-server.pem"), cert)
    shutil.copy(pki("ca-server.key"), key)
    tls = TlsFiles(cert, key, pki("ca.pem"))
    copies = tmp_path / "copies"
    tls.install(copies)
    identity = copies / "identity.pem"
    assert stat.S_IMODE(copies.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in copies.iterdir()} == {
        "identity.pem": 0o600,
        "ca.pem": 0o600,
    }
    assert identity.read_bytes() == key.read_bytes().rstrip(b"\n") + b"\n" + cert.read_bytes()
    assert (copies / "ca.pem").read_bytes() == pki("ca.pem").read_bytes()
    first = identity.read_bytes()
    shutil.copy(pki("other-server.pem"), cert)  # half a rotation: the key is not its own
    with pytest.raises(ConfigError, match="not the private key"):
        tls.refresh()
    assert identity.read_bytes() == first
    shutil.copy(pki("other-server.key"), key)
    assert tls.refresh()
    assert pki("other-server.pem").read_bytes() in identity.read_bytes()
    tls.uninstall(copies)
    shutil.copy(pki("ca-server.pem"), cert)
    shutil.copy(pki("ca-server.key"), key)
    assert tls.refresh()
    assert pki("other-server.pem").read_bytes() in identity.read_bytes()
