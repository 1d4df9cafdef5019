"""deploy/ against a real server: the container's settings and the documented client config.

The image and the ConfigMap configure `rnnlm serve` through RNNLM_* variables; here a real
server starts with exactly those (image ENV, then the ConfigMap's envFrom over it), on loopback
with free ports and another model repository mounted where /models would be, and is called with
the channel options docs/deployment.md tells clients to use.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_deploy import DOCS, ROOT, _config_data, _docker_env, _serve_config
from test_server import LiveServer, copy_bundle

from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.app import SERVICE_NAME


def _container_environment(models: Path) -> dict[str, str]:
    """What the server container sees: the image's ENV, overridden by the ConfigMap's."""
    return {**_docker_env(), **_config_data(), "RNNLM_MODELS": str(models)}


def _serve_as_the_container(models: Path) -> LiveServer:
    """A real server with the container's settings and `models` where /models would be, on
    loopback and free ports instead of the container's 0.0.0.0:50051 and :9464."""
    config = _serve_config(_container_environment(models))
    return LiveServer(dataclasses.replace(config, host="127.0.0.1", port=0, metrics_port=0))


@pytest.fixture(scope="module")
def own_repository(
    tiny_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A user's model repository (`docker run -v my-models:/models`): one model, not the image's."""
    root = tmp_path_factory.mktemp("my-models")
    copy_bundle(tiny_bundle_factory("gru", "char"), root / "tiny-gru-char")
    return root


@pytest.fixture(scope="module")
def container(own_repository: Path) -> Iterator[LiveServer]:
    server = _serve_as_the_container(own_repository)
    yield server
    server.close()


def test_the_containers_settings_serve_any_model_repository(container: LiveServer) -> None:
    """Before, the image and the ConfigMap named shakespeare-word as the default model, and a
    repository without it crash-looped: "--default-model 'shakespeare-word' is not in /models"."""
    with Client(container.target, timeout=30) as client:
        (model,) = client.list_models()
        reply = client.predict_next("the ca", k=2, next_tokens=True)  # names no model
    assert model.name == "tiny-gru-char"
    assert len(reply.predictions) == 2  # next characters: no time-bounded word search


def _default_model(server: LiveServer) -> str:
    with Client(server.target, timeout=30) as client:
        (default,) = [m.name for m in client.list_models() if m.is_default]
        assert client.predict_next("the", k=1).predictions  # a call that names no model
    return default


def test_the_image_serves_its_own_repository_with_its_declared_default() -> None:
    """The image's /models is the repository's models/: two models, and a repository.json
    naming the default, which now takes the place of the image's RNNLM_DEFAULT_MODEL."""
    models = ROOT / "models"
    declared = json.loads((models / "repository.json").read_text(encoding="utf-8"))
    server = _serve_as_the_container(models)
    try:
        assert _default_model(server) == declared["default_model"]
    finally:
        server.close()


def test_a_model_image_brings_its_own_default(
    tiny_bundle_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """The models-from-image component copies /bundles/. to /models: several models and the
    repository.json beside them, served with the base's settings unchanged."""
    for cell, tokenizer in (("gru", "char"), ("lstm", "word")):
        copy_bundle(tiny_bundle_factory(cell, tokenizer), tmp_path / f"tiny-{cell}-{tokenizer}")
    (tmp_path / "repository.json").write_text('{"default_model": "tiny-lstm-word"}\n')
    server = _serve_as_the_container(tmp_path)
    try:
        assert _default_model(server) == "tiny-lstm-word"
    finally:
        server.close()


def _documented_client() -> dict[str, Any]:
    """The Python client configuration of docs/deployment.md, run as written (the channel it
    opens to the cluster's DNS name stays idle and is closed)."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)
    (block,) = [b for b in blocks if "healthCheckConfig" in b]
    ast.parse(block)
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    namespace["channel"].close()
    return namespace


def test_the_documented_client_config_checks_health_and_keeps_alive() -> None:
    documented = _documented_client()
    config = documented["service_config"]
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": SERVICE_NAME}
    options = dict(documented["options"])
    assert 10_000 <= options["grpc.keepalive_time_ms"] <= 300_000
    assert 1_000 <= options["grpc.keepalive_timeout_ms"] < options["grpc.keepalive_time_ms"]
    # Pinging idle connections would get them closed by the server's default ping policy.
    assert not options.get("grpc.keepalive_permit_without_calls")


def test_the_documented_client_config_works_against_the_server(container: LiveServer) -> None:
    """A channel with the documented options sends calls only to a pod whose health service
    reports SERVING for the service named in healthCheckConfig: calls that succeed prove the
    name is one the server reports on."""
    documented = _documented_client()
    with grpc.insecure_channel(f"ipv4:{container.target}", options=documented["options"]) as ch:
        stub = pb_grpc.LanguageModelStub(ch)
        reply = stub.ListModels(pb.ListModelsRequest(), timeout=30, wait_for_ready=True)
        assert [m.name for m in reply.models] == ["tiny-gru-char"]
        reply = stub.PredictNext(pb.PredictNextRequest(context="the ca", k=1), timeout=30)
        assert len(reply.predictions) == 1
    # The control: the same options with a service the server does not report on leave the
    # channel no healthy backend, so the check above is in effect (as it is for a draining pod).
    unknown = documented["service_config"] | {"healthCheckConfig": {"serviceName": "no.Such"}}
    options = [o for o in documented["options"] if o[0] != "grpc.service_config"]
    options.append(("grpc.service_config", json.dumps(unknown)))
    channel = grpc.insecure_channel(f"ipv4:{container.target}", options=options)
    with channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.LanguageModelStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unhealthy" in (refused.value.details() or "")
