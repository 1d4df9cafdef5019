"""Generated gRPC and protobuf code for the rnnlm.v1 API (scripts/gen_proto.sh writes it)."""
