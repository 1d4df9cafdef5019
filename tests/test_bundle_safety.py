"""Bundles that try to reach outside themselves, and bundles edited under a live server.

A manifest names its files; each must be a regular file inside the bundle directory, or the
bundle is refused with one short line before the file is opened, hashed or read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from test_bundle import copy_bundle, edit_manifest, rehash

from server.bundle import BundleError, load_bundle

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
