"""Bundles that try to reach outside themselves, and bundles edited under a live server.

A manifest names its files; each must be a regular file inside the bundle directory, or the
bundle is refused with one short line before the file is opened, hashed or read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from test_bundle import copy_bundle, edit_manifest, rehash
from test_client_cli import ServeProcess
from test_server import LiveServer, config, metric
from test_server import copy_bundle as copy_to

from rnnlm.client import Client
from server.app import SERVICE_NAME
from server.bundle import BundleError, load_bundle
from server.config import add_arguments, config_from_args
from server.repository import (
    MAX_REPOSITORY_BYTES,
    REPOSITORY_FILE,
    RepositoryError,
    read_repository_file,
)

HEX64 = re.compile(r"[0-9a-f]{64}")


def refusal(bundle: Path) -> str:
    """The loader's one-line refusal of `bundle`, checked to quote no file's hash."""
    with pytest.raises(BundleError) as error:
        load_bundle(bundle)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def name_a_file(bundle: Path, name: str, digest: str = "0" * 64) -> None:
    edit_manifest(bundle, lambda m: m["files"].update({name: digest}))


@pytest.mark.parametrize(
    "name",
    ["../../../../etc/passwd", "/etc/passwd", "/proc/self/pagemap", "sub/file", "..", ""],
)
def test_a_name_outside_the_bundle_is_refused_unread(
    default_bundle: Path, tmp_path: Path, name: str
) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    name_a_file(bundle, name)
    message = refusal(bundle)
    assert f"'files' names {name!r}, which is not a file name" in message
    assert not HEX64.search(message.replace("0" * 64, ""))


def test_a_long_hostile_name_is_quoted_short(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    name_a_file(bundle, "../" * 100_000 + "etc/passwd")
    assert "(300010 characters)" in refusal(bundle)


def test_a_symlink_out_of_the_bundle_is_refused(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    outside = tmp_path / "outside.json"
    (bundle / "tokenizer.json").rename(outside)
    (bundle / "tokenizer.json").symlink_to(outside)  # same bytes, so the hash would match
    assert "tokenizer.json: a symbolic link out of the bundle" in refusal(bundle)


def test_a_symlink_to_proc_is_refused(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "pagemap").symlink_to("/proc/self/pagemap")
    name_a_file(bundle, "pagemap")
    assert "pagemap: a symbolic link out of the bundle" in refusal(bundle)


def test_a_symlink_inside_the_bundle_is_followed(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "weights.bin").rename(bundle / "weights.data")
    (bundle / "weights.bin").symlink_to("weights.data")
    assert load_bundle(bundle).name == "tiny-lstm-word"


@pytest.mark.timeout(60)
def test_a_fifo_is_refused_without_being_opened(default_bundle: Path, tmp_path: Path) -> None:
    """Reading a FIFO that has no writer would block for ever: the test would time out."""
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "weights.bin").unlink()
    os.mkfifo(bundle / "weights.bin")
    assert "weights.bin: not a regular file" in refusal(bundle)


def test_a_directory_is_refused(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "extra").mkdir()
    name_a_file(bundle, "extra")
    assert "extra: not a regular file" in refusal(bundle)


@pytest.mark.timeout(60)
def test_a_manifest_that_is_a_fifo_or_a_link_out_is_refused(
    default_bundle: Path, tmp_path: Path
) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    manifest = bundle / "manifest.json"
    manifest.rename(tmp_path / "manifest.json")
    manifest.symlink_to(tmp_path / "manifest.json")
    assert "manifest.json: a symbolic link out of the bundle" in refusal(bundle)
    manifest.unlink()
    os.mkfifo(manifest)
    assert "manifest.json: not a regular file" in refusal(bundle)


def test_a_bad_digest_is_quoted_short(default_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    name_a_file(bundle, "model.onnx", "x" * 100_000)
    assert "must be a sha256 hex digest" in refusal(bundle)


def test_a_listed_extra_file_is_checked_like_the_others(
    default_bundle: Path, tmp_path: Path
) -> None:
    bundle = copy_bundle(default_bundle, tmp_path)
    (bundle / "README").write_text("notes")
    name_a_file(bundle, "README")
    assert re.search(r"README: sha256 [0-9a-f]{64} does not match", refusal(bundle))
    rehash(bundle, "README")
    assert json.loads((bundle / "manifest.json").read_text())["files"]["README"]
    load_bundle(bundle)


# -- the repository's own file -----------------------------------------------------------------


def place_repository_file(root: Path, kind: str) -> str:
    """A `repository.json` of `kind` in `root`, and the refusal expected for it."""
    path = root / REPOSITORY_FILE
    if kind == "fifo":  # reading a FIFO with no writer would block start-up for ever
        os.mkfifo(path)
        return "repository.json: not a regular file; repository files must be regular files"
    if kind == "device":
        path.symlink_to("/dev/zero")  # endless
        return "repository.json: a symbolic link out of the repository"
    if kind == "directory":
        path.mkdir()
        return "repository.json: not a regular file"
    if kind == "link out":
        outside = root.parent / "elsewhere.json"
        outside.write_text('{"default_model": "alpha"}')
        path.symlink_to(outside)
        return "repository.json: a symbolic link out of the repository"
    if kind == "dangling":
        path.symlink_to("nowhere.json")
        return r"repository.json: missing \(a link to nothing\)"
    assert kind == "huge"
    with path.open("wb") as f:
        f.truncate(2**40)  # sparse: a terabyte to read whole
    return f"repository.json: {2**40} bytes, more than the {MAX_REPOSITORY_BYTES} allowed"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "link out", "dangling", "huge"])
def test_a_repository_file_is_read_like_a_bundle_file(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "models"
    root.mkdir()
    expected = place_repository_file(root, kind)
    with pytest.raises(RepositoryError, match=expected) as error:
        read_repository_file(root)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


def test_a_repository_file_linked_inside_the_repository_is_read(tmp_path: Path) -> None:
    """As a Kubernetes ConfigMap mounts it: a link to a file in a folder beside it."""
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / REPOSITORY_FILE).write_text('{"default_model": "alpha"}')
    (tmp_path / REPOSITORY_FILE).symlink_to(Path("..data") / REPOSITORY_FILE)
    assert read_repository_file(tmp_path) == "alpha"
    (tmp_path / "empty").mkdir()
    assert read_repository_file(tmp_path / "empty") is None


# -- a live server and its bundles' files ------------------------------------------------------

NAME = "tiny-lstm-word"
SHIPPED = Path(__file__).resolve().parent.parent / "models"
CHAR = "shakespeare-char"


def answers(client: Client) -> tuple[object, ...]:
    """Answers that depend on every weight: next-token probabilities, scores, greedy text.

    Next tokens, not words: a char model's word search stops at `--word-search-ms`, so on a
    loaded machine two identical calls can return different words."""
    return (
        client.predict_next("the cat", k=5, next_tokens=True),
        client.score(["the cat sees the moon .", "a dog likes a red house ."]),
        client.generate_text("the", max_tokens=12, top_k=1),
    )


def flip_in_place(path: Path) -> None:
    """Invert every byte of a file through its own inode, as an in-place editor would."""
    with path.open("r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.slow
def test_a_served_bundle_edited_in_place_changes_no_answer(tmp_path: Path) -> None:
    """Flipping, then truncating, the served `weights.bin` (and reloading after each) leaves
    every answer as it was, and the server alive: the weights live in the process's memory."""
    # A shipped bundle: onnxruntime maps only large tensors (the tiny test models' are read).
    root = tmp_path / "models"
    copy_to(SHIPPED / CHAR, root / CHAR)
    server = ServeProcess(
        ["--models", str(root), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
        {},
    )
    try:
        port = server.wait_for_line(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1)
        server.wait_for_line(r"serving shakespeare-char:")
        weights = root / CHAR / "weights.bin"
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            before = answers(client)
            flip_in_place(weights)
            assert answers(client) == before
            server.process.send_signal(signal.SIGHUP)
            server.wait_for_line(r"cannot load .*weights\.bin: sha256 .*keeps serving")
            assert answers(client) == before
            os.truncate(weights, 0)
            assert answers(client) == before
            server.process.send_signal(signal.SIGHUP)
            server.wait_for_line(r"cannot load .*weights\.bin: sha256 .*keeps serving")
            assert answers(client) == before
            assert client.health() == "SERVING"
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0


def broken_repository(default_bundle: Path, root: Path) -> None:
    """NAME serves; `broken` has a tokenizer that no longer matches its hash, and `hostile`
    names /proc/self/pagemap (which hung start-up when it was read)."""
    copy_to(default_bundle, root / NAME / "1")
    for name in ("broken", "hostile"):
        bundle = root / name / "1"
        copy_to(default_bundle, bundle)
        edit_manifest(bundle, lambda m, name=name: m.update(name=name))
    with (root / "broken" / "1" / "tokenizer.json").open("a") as f:
        f.write(" ")
    name_a_file(root / "hostile" / "1", "/proc/self/pagemap")


def test_a_bad_bundle_at_start_is_reported_and_the_good_ones_serve(
    default_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    broken_repository(default_bundle, root)
    live = LiveServer(config(root))
    try:
        assert live.server.repository is not None
        failures = live.server.repository.failures
        assert sorted(failures) == [root / "broken" / "1", root / "hostile" / "1"]
        assert "tokenizer.json: sha256" in failures[root / "broken" / "1"]
        assert "'/proc/self/pagemap'" in failures[root / "hostile" / "1"]
        samples = live.scrape()
        assert metric(samples, "rnnlm_model_bundles_failing") == 2
        for name in ("broken", "hostile"):
            assert metric(samples, "rnnlm_model_load_failures_total", model=name) == 1
        with Client(live.target, timeout=10) as client:
            assert [m.name for m in client.list_models()] == [NAME]
            assert client.predict_next("the", k=2).model_version == "1"
            assert client.health() == "SERVING"
            assert client.health(f"{SERVICE_NAME}/{NAME}") == "SERVING"
            assert client.health(f"{SERVICE_NAME}/broken") == "NOT_SERVING"
            # Mended, the bundle loads at the next reload and its health follows.
            shutil.rmtree(root / "broken")
            copy_to(default_bundle, root / "broken" / "1")
            edit_manifest(root / "broken" / "1", lambda m: m.update(name="broken"))
            result = live.run(live.server.reload())
            assert result.loaded == ["broken:1"]
            assert client.health(f"{SERVICE_NAME}/broken") == "SERVING"
            assert metric(live.scrape(), "rnnlm_model_bundles_failing") == 1
    finally:
        live.close()


def test_strict_models_refuses_to_start_with_one_line(default_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    broken_repository(default_bundle, root)
    with pytest.raises(RepositoryError) as error:
        LiveServer(config(root, strict_models=True))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot load {root / 'broken' / '1'}")
    assert message.endswith("(--strict-models: every bundle must load)")


def test_no_loadable_bundle_fails_the_start(default_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    broken_repository(default_bundle, root)
    shutil.rmtree(root / NAME)
    with pytest.raises(RepositoryError, match=r"no model could be served; cannot load .*broken"):
        LiveServer(config(root))


def test_strict_models_flag_and_environment() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert not config_from_args(parser.parse_args(["--models", "m"]), {}).strict_models
    assert config_from_args(
        parser.parse_args(["--models", "m", "--strict-models"]), {}
    ).strict_models
    env = {"RNNLM_MODELS": "m", "RNNLM_STRICT_MODELS": "true"}
    assert config_from_args(parser.parse_args([]), env).strict_models
