"""gRPC server reflection, both `grpc.reflection.v1` (grpcurl, Postman) and `v1alpha`.

grpcio-reflection serves only `grpc.reflection.v1alpha.ServerReflection`. The v1 service is the
same protocol under another package: the same messages with the same field numbers. So v1 is
served by the same servicer over the same descriptor pool, reading and writing its messages with
v1alpha's classes; v1's file (v1alpha's, renamed) is added to the pool so that reflection
describes itself under both names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE = v1alpha.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_METHOD = "ServerReflectionInfo"


def _add_v1_file() -> None:
    """Put v1's file in the default pool (once): v1alpha's, renamed, so that reflection
    describes `grpc.reflection.v1.ServerReflection` like any other service."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = _V1_FILE, V1_PACKAGE
    proto.options.Clear()  # v1alpha's language options name v1alpha packages
    for message in proto.message_type:
        for item in message.field:
            if item.HasField("type_name"):  # messages only: a scalar must not get one
                item.type_name = item.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


class _Server(Protocol):
    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None: ...


def enable_reflection(service_names: Iterable[str], server: _Server) -> None:
    """Serve reflection v1 and v1alpha for `service_names` (both reflection services are added
    to the list) on `server` (grpc.aio's, or the native front end's handlers), from the default
    descriptor pool."""
    _add_v1_file()
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = v1alpha.aio.ReflectionServicer(names)
    # v1's messages are v1alpha's byte for byte: v1alpha's classes read and write them.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(service, {_METHOD: handler})
            for service in (V1ALPHA_SERVICE, V1_SERVICE)
        )
    )
