"""The committed generated code matches proto/, and the API is documented and keeps its names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "rnnlm/v1/language_model.proto"
GENERATED = (
    "rnnlm/v1/language_model_pb2.py",
    "rnnlm/v1/language_model_pb2.pyi",
    "rnnlm/v1/language_model_pb2_grpc.py",
)


def _compile(tmp_path: Path, source_info: bool) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "descriptor.pb"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={ROOT / 'proto'}",
        f"--descriptor_set_out={out}",
        PROTO,
    ]
    if source_info:
        args.insert(-1, "--include_source_info")
    subprocess.run(args, check=True, capture_output=True, text=True)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = files.file
    return file


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """--descriptor_set_out records json_name; the generated code's descriptor does not."""
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def test_generated_descriptor_matches_the_proto(tmp_path: Path) -> None:
    compiled = _compile(tmp_path, source_info=False)
    _drop_json_names(compiled.message_type)
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == compiled, "rnnlm/v1 is stale: run scripts/gen_proto.sh"


def test_generated_files_are_what_gen_proto_writes(tmp_path: Path) -> None:
    """Byte for byte, when the installed grpcio-tools is the one that generated them."""
    from grpc_tools import grpc_version

    tools_version = grpc_version.VERSION
    if tools_version != pb_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(
            f"grpcio-tools {tools_version} installed; the code was generated with "
            f"{pb_grpc.GRPC_GENERATED_VERSION} (the descriptor test still checks it)"
        )
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (ROOT / name).read_bytes(), (
            f"{name} differs from what scripts/gen_proto.sh writes; run it"
        )


def test_every_element_is_documented(tmp_path: Path) -> None:
    """Every service, rpc, message, field, enum and enum value has a comment above it."""
    file = _compile(tmp_path, source_info=True)
    commented = {
        tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
    }
    # Field numbers of FileDescriptorProto / DescriptorProto / ... in descriptor.proto.
    missing = []
    for si, service in enumerate(file.service):
        if (6, si) not in commented:
            missing.append(service.name)
        for mi, method in enumerate(service.method):
            if (6, si, 2, mi) not in commented:
                missing.append(f"{service.name}.{method.name}")
    for ei, enum in enumerate(file.enum_type):
        if (5, ei) not in commented:
            missing.append(enum.name)
        for vi, value in enumerate(enum.value):
            if (5, ei, 2, vi) not in commented:
                missing.append(f"{enum.name}.{value.name}")
    for mi, message in enumerate(file.message_type):
        for fi, field in enumerate(message.field):
            if (4, mi, 2, fi) not in commented:
                missing.append(f"{message.name}.{field.name}")
    assert not missing, f"undocumented in {PROTO}: {missing}"


def test_the_issue_names_are_kept() -> None:
    service = pb.DESCRIPTOR.services_by_name["LanguageModel"]
    assert service.full_name == "rnnlm.v1.LanguageModel"
    methods = {m.name: m for m in service.methods}
    assert set(methods) >= {
        "Generate",
        "PredictNext",
        "Score",
        "Embed",
        "ListModels",
        "GetModel",
        "TypingSession",
    }
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert methods["TypingSession"].server_streaming and methods["TypingSession"].client_streaming

    def fields(message: type) -> set[str]:
        return set(message.DESCRIPTOR.fields_by_name)  # type: ignore[attr-defined]

    assert fields(pb.GenerateRequest) >= {
        "model", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_k", "top_p",
        "min_p", "repetition_penalty", "seed", "stop", "top_logprobs",
    }  # fmt: skip
    assert fields(pb.GenerateResponse) >= {
        "text", "token_ids", "logprobs", "top_logprobs", "finish_reason", "prompt_tokens",
        "completion_tokens",
    }  # fmt: skip
    assert fields(pb.PredictNextRequest) >= {"model", "context", "k", "partial_word"}
    assert fields(pb.PredictNextResponse) >= {"predictions"}
    assert fields(pb.Prediction) >= {"token", "probability"}
    assert fields(pb.ScoreRequest) >= {"model", "texts", "return_token_logprobs"}
    assert fields(pb.ScoreResult) >= {"log_prob", "num_tokens", "perplexity", "token_logprobs"}
    assert fields(pb.EmbedRequest) >= {"model", "texts", "pooling"}
    assert set(pb.FinishReason.keys()) >= {
        "FINISH_REASON_STOP",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_CANCELLED",
    }
    assert set(pb.Pooling.keys()) >= {"POOLING_LAST", "POOLING_MEAN", "POOLING_MAX"}
    # 0 must be told apart from unset where 0 is meaningful or invalid.
    for name in ("max_tokens", "temperature", "top_p", "repetition_penalty", "seed"):
        assert pb.GenerateRequest.DESCRIPTOR.fields_by_name[name].has_presence, name
