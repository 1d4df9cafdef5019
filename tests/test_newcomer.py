"""A newcomer's path through the README on a fresh clone: the commands work as written.

The default model a repository declares, versions ordered as people number them, one-line
errors where a traceback or a doubled message was, `rnnlm embed`, reflection v1, a quick
benchmark that leaves the committed results alone, and output that survives `| head`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from test_client_cli import ServeProcess
from test_server import LiveServer, config, copy_bundle

from rnnlm.client import Client
from server.repository import (
    REPOSITORY_FILE,
    RepositoryError,
    newest_version,
    resolve_default_model,
    version_key,
)

ROOT = Path(__file__).resolve().parent.parent
TEXT = "the moon calls a red house . the moon calls a red house ."


def renamed(source: Path, target: Path, *, name: str | None = None, version: str | None = None):
    """A copy of a bundle with another name and/or version in its manifest."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update({k: v for k, v in (("name", name), ("version", version)) if v is not None})
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def declare(root: Path, content: object) -> None:
    (root / REPOSITORY_FILE).write_text(json.dumps(content))


# -- the default model -------------------------------------------------------------------------


def test_default_model_flag_then_repository_file_then_the_only_model(tmp_path: Path) -> None:
    names = ["alpha", "beta"]
    assert resolve_default_model(tmp_path, names) == ""  # several models, nothing declared
    assert resolve_default_model(tmp_path, ["alpha"]) == "alpha"
    declare(tmp_path, {"default_model": "beta"})
    assert resolve_default_model(tmp_path, names) == "beta"
    assert resolve_default_model(tmp_path, names, "alpha") == "alpha"  # the flag (or env) wins
    with pytest.raises(RepositoryError, match=r"--default-model 'x' \(RNNLM_DEFAULT_MODEL\)"):
        resolve_default_model(tmp_path, names, "x")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"default_model": "gamma"}, r"repository\.json: default_model 'gamma' is not in .*alpha"),
        ({"default_model": ""}, "default_model must be a non-empty model name"),
        ({"default-model": "alpha"}, "unknown key 'default-model'"),
        (["alpha"], "must be a JSON object"),
        ("{not json", "cannot read it as JSON"),
    ],
)
def test_a_bad_repository_file_is_one_clear_error(
    tmp_path: Path, content: object, message: str
) -> None:
    if isinstance(content, str):
        (tmp_path / REPOSITORY_FILE).write_text(content)
    else:
        declare(tmp_path, content)
    with pytest.raises(RepositoryError, match=message) as error:
        resolve_default_model(tmp_path, ["alpha", "beta"])
    assert "\n" not in str(error.value)


def test_the_environment_wins_over_the_repository_file(
    tmp_path: Path, default_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`RNNLM_DEFAULT_MODEL` reaches the repository as the configured default."""
    import argparse

    from server.config import add_arguments, config_from_args

    renamed(default_bundle, tmp_path / "a", name="alpha")
    renamed(default_bundle, tmp_path / "b", name="beta")
    declare(tmp_path, {"default_model": "alpha"})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    environ = {"RNNLM_MODELS": str(tmp_path), "RNNLM_DEFAULT_MODEL": "beta"}
    configured = config_from_args(parser.parse_args([]), environ)
    server = LiveServer(config(tmp_path, default_model=configured.default_model))
    try:
        with Client(server.target, timeout=30) as client:
            assert client.get_model().name == "beta"
    finally:
        server.close()
    server = LiveServer(config(tmp_path))
    try:
        with Client(server.target, timeout=30) as client:
            assert client.get_model().name == "alpha"
            assert [m.is_default for m in client.list_models()] == [True, False]
    finally:
        server.close()


def test_the_shipped_repository_declares_its_default() -> None:
    models = ROOT / "models"
    names = [json.loads(p.read_text())["name"] for p in models.glob("*/manifest.json")]
    assert len(names) > 1
    assert resolve_default_model(models, names) == "shakespeare-word"


@pytest.fixture(scope="module")
def readme_server() -> Iterator[str]:
    """README "Serving" on the shipped models, with no --default-model: its gRPC target."""
    server = ServeProcess(
        ["--models", "models", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], {}
    )
    try:
        port = server.wait_for_line(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
        server.wait_for_line(r"serving .*\(default model shakespeare-word\)", timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        assert server.stop() == 0


def test_the_readme_serve_command_answers_the_readme_client_commands(
    capsys: pytest.CaptureFixture[str], readme_server: str
) -> None:
    from rnnlm.cli import main

    assert main(["predict", "I pray you , my", "--k", "5", "--target", readme_server]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["score", "To be , or not to be", "--json", "--target", readme_server]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["num_tokens"] > 0


def test_the_readme_python_snippet_prints_clean_lines(readme_server: str) -> None:
    """README's client snippet, run as written (on this server's port): the text, then one
    line per prediction and the perplexity, no protobuf text."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"localhost:50051"' in snippet
    snippet = snippet.replace('"localhost:50051"', repr(readme_server))
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ROMEO :" and len(lines) > 5  # the prompt, then its continuation
    predictions = [line.split() for line in lines[-4:-1]]
    assert [len(p) for p in predictions] == [2, 2, 2]
    assert all(0 < float(p) <= 1 and word.startswith("l") for p, word in predictions)
    assert re.fullmatch(r"perplexity \d+\.\d", lines[-1])
    assert "token_id" not in result.stdout and "token:" not in result.stdout


def test_a_repository_file_naming_a_missing_model_stops_the_start_in_one_line(
    tmp_path: Path, default_bundle: Path
) -> None:
    renamed(default_bundle, tmp_path / "a", name="alpha")
    renamed(default_bundle, tmp_path / "b", name="beta")
    declare(tmp_path, {"default_model": "shakespeare-word"})
    server = ServeProcess(
        ["--models", str(tmp_path), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
        {},
    )
    try:
        assert server.process.wait(120) == 2
    except subprocess.TimeoutExpired:
        server.stop()  # it served instead of refusing: leave no server behind
        raise
    server.wait_for_line(r"default_model 'shakespeare-word' is not in .* \(models: alpha, beta\)")


# -- versions ----------------------------------------------------------------------------------


def test_versions_order_numbers_first_variants_beside_their_number() -> None:
    versions = ["beta", "10", "2-int8", "1-int8", "2", "9", "1", "1.10", "1.9", "alpha"]
    assert sorted(versions, key=version_key) == [
        "1", "1-int8", "1.9", "1.10", "2", "2-int8", "9", "10", "alpha", "beta",
    ]  # fmt: skip
    assert newest_version(versions) == "10"
    assert newest_version(["1", "1-int8", "2"]) == "2"
    assert newest_version(["1-int8", "1", "2", "2-int8"]) == "2"  # plain over its variant
    assert newest_version(["1", "2-int8"]) == "2-int8"  # a variant of 2 is newer than 1
    assert newest_version(["1", "1-int8"]) == "1"
    assert newest_version(["1", "latest"]) == "1"  # text-only versions only without numbers
    assert newest_version(["nightly", "latest"]) == "nightly"


@pytest.fixture(scope="module")
def cached_checkpoint(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny word LSTM's checkpoint with a continuous cache tuned and recorded."""
    from tokenizers import Tokenizer

    from training.cache import tune, write_block
    from training.checkpoint import load_checkpoint
    from training.data import encode

    directory = tmp_path_factory.mktemp("cached") / "checkpoint"
    shutil.copytree(tiny_checkpoint_factory("lstm", "word"), directory)
    checkpoint = load_checkpoint(directory)
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path))
    valid = "the moon calls a red house .\n" * 3 + "a child hears the small boat .\n" * 3
    test = "my friend finds the river .\n" * 4
    block = tune(checkpoint.model, encode(tokenizer, valid), encode(tokenizer, test))
    write_block(directory, block)
    return directory


@pytest.fixture(scope="module")
def variants(cached_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """README's two exports (version 1 and its int8 variant 1-int8), as models/tiny/*."""
    from exporter.export import export_bundle

    root = tmp_path_factory.mktemp("variants")
    export_bundle(cached_checkpoint, root / "tiny" / "1", name="tiny", version="1")
    export_bundle(
        cached_checkpoint, root / "tiny" / "1-int8", name="tiny", version="1-int8", quantize="int8"
    )
    yield root


def test_a_variant_never_outranks_the_next_number(variants: Path, tmp_path: Path) -> None:
    server = LiveServer(config(variants))
    try:
        with Client(server.target, timeout=30) as client:
            assert client.get_model().version == "1"  # the plain version over its variant
            assert [m.version for m in client.list_models()] == ["1", "1-int8"]
    finally:
        server.close()
    repository = tmp_path / "models"
    shutil.copytree(variants, repository)
    copy_bundle(variants / "tiny" / "1", repository / "tiny" / "2", version="2")
    server = LiveServer(config(repository))
    try:
        with Client(server.target, timeout=30) as client:
            assert client.get_model().version == "2"
            assert client.get_model(version="1-int8").version == "1-int8"
            assert [m.is_default for m in client.list_models()] == [False, False, True]
    finally:
        server.close()


def test_the_continuous_cache_works_on_an_int8_variant(variants: Path) -> None:
    server = LiveServer(config(variants))
    try:
        with Client(server.target, timeout=30) as client:
            fp32, int8 = (
                client.score(TEXT, continuous_cache=True, model_version=v).results[0]
                for v in ("1", "1-int8")
            )
            assert int8.num_tokens == fp32.num_tokens
            assert int8.perplexity == pytest.approx(fp32.perplexity, rel=0.05)
            reply = client.predict_next("the moon", continuous_cache=True, model_version="1-int8")
            assert len(reply.predictions) == 5
    finally:
        server.close()


def test_the_continuous_cache_on_a_variant_without_one_fails_clearly(
    default_bundle: Path, tmp_path: Path
) -> None:
    renamed(default_bundle, tmp_path / "1-int8", version="1-int8")
    server = LiveServer(config(tmp_path))
    try:
        with Client(server.target, timeout=30) as client, pytest.raises(grpc.RpcError) as error:
            client.score(TEXT, continuous_cache=True, model_version="1-int8")
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 1-int8 has no continuous cache" in error.value.details()
    finally:
        server.close()


# -- the serving-only install ------------------------------------------------------------------

# Runs `rnnlm ARGS` as the serving install would: torch and safetensors cannot be imported.
_WITHOUT_TRAIN_EXTRA = """
import sys
for name in ("torch", "safetensors", "onnxscript"):
    sys.modules[name] = None  # makes `import name` raise ModuleNotFoundError
from rnnlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["train", "export", "import"])
def test_train_and_export_without_the_train_extra_name_it_in_one_line(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAIN_EXTRA, command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"rnnlm {command}: needs the 'train' extra (")
    assert result.stderr.rstrip().endswith("pip install 'rnnlm[train]'")


def test_the_serving_commands_need_no_train_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAIN_EXTRA, "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--models" in result.stdout


# -- rnnlm serve start-up failures -------------------------------------------------------------


def serve_fails(*args: str) -> str:
    """`rnnlm serve ARGS` that must fail to start: its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "rnnlm", "serve", "--host", "127.0.0.1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--health-port"])
def test_a_port_in_use_is_named_in_one_line(default_bundle: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--metrics-port": "0", flag: port}
        stderr = serve_fails("--models", str(default_bundle), *sum(ports.items(), ()))
    assert stderr == (
        f"rnnlm serve: cannot start: {flag} {port}: address already in use on 127.0.0.1 "
        "(another process listens there; stop it or choose another port)\n"
    )


def test_a_start_up_error_is_said_once(default_bundle: Path, tmp_path: Path) -> None:
    renamed(default_bundle, tmp_path / "a", name="alpha")
    stderr = serve_fails(
        "--models", str(tmp_path), "--port", "0", "--metrics-port", "0", "--default-model", "nope"
    )
    assert stderr.count("'nope'") == 1
    assert "WARNING" not in stderr  # no streams were open: none is said to be ended
    assert "loaded model" not in stderr  # refused before any model was loaded and warmed up
    assert stderr.splitlines()[-1].startswith("rnnlm serve: cannot start: --default-model 'nope'")
    assert "Traceback" not in stderr


# -- reflection v1 -----------------------------------------------------------------------------

# grpc/reflection/v1/reflection.proto as the gRPC repository publishes it (comments left out):
# the client below is built from this text alone, not from anything the server uses.
_REFLECTION_V1 = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest)
      returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest { string containing_type = 1; int32 extension_number = 2; }
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse { string base_type_name = 1; repeated int32 extension_number = 2; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse { int32 error_code = 1; string error_message = 2; }
"""


def _v1_client_messages(tmp_path: Path) -> tuple[type, type]:
    """v1's request and response classes, compiled by protoc into a pool of their own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    (tmp_path / "reflection.proto").write_text(_REFLECTION_V1)
    out = tmp_path / "reflection.pb"
    assert protoc.main(["protoc", f"-I{tmp_path}", f"-o{out}", "reflection.proto"]) == 0
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{name}"))
        for name in ("ServerReflectionRequest", "ServerReflectionResponse")
    )


def test_reflection_v1_lists_and_describes_the_services(
    default_bundle: Path, tmp_path: Path
) -> None:
    from google.protobuf import descriptor_pb2

    request, response = _v1_client_messages(tmp_path)
    server = ServeProcess(
        ["--models", str(default_bundle), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0"],
        {},
    )  # fmt: skip
    try:
        port = server.wait_for_line(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
        asks = [
            request(list_services=""),
            request(file_containing_symbol="rnnlm.v1.LanguageModel"),
            request(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            request(file_containing_symbol="no.such.Service"),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response.FromString,
            )
            listed, language_model, reflection, missing = list(info(iter(asks), timeout=30))
    finally:
        server.stop()
    names = {s.name for s in listed.list_services_response.service}
    assert {"rnnlm.v1.LanguageModel", "grpc.health.v1.Health"} <= names
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= (
        names
    )

    def services(reply: object) -> set[str]:
        files = reply.file_descriptor_response.file_descriptor_proto  # type: ignore[attr-defined]
        protos = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
        return {f"{p.package}.{s.name}" for p in protos for s in p.service}

    assert "rnnlm.v1.LanguageModel" in services(language_model)
    assert "grpc.reflection.v1.ServerReflection" in services(reflection)
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# -- rnnlm bench --quick -----------------------------------------------------------------------


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_quick_bench_goes_to_scratch_and_says_it_is_quick(
    default_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.axes

    from benchmarks import plots

    committed = ROOT / "benchmarks" / "results"
    before = _tree(committed)
    result = subprocess.run(
        [sys.executable, "-m", "rnnlm", "bench", "--bundle", str(default_bundle), "--quick",
         "--trials", "1", "--duration", "0.3"],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
        timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert _tree(committed) == before  # the committed results are untouched
    out = tmp_path / "rnnlm-bench-quick"
    assert f"wrote {out / 'results.md'}" in result.stdout
    assert (
        (out / "results.md")
        .read_text()
        .startswith("# rnnlm benchmark results (quick run)\n\n**A quick run (--quick): ")
    )
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["quick"] is True
    titles: list[str] = []
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_title", lambda self, text, **kw: titles.append(text)
    )
    assert plots.write(results, out)  # again, its titles seen
    assert titles and all("QUICK RUN, rough figures: " in t for t in titles)
