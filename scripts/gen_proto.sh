#!/usr/bin/env bash
# Regenerate the Python code for the rnnlm.v1 API (rnnlm/v1/*_pb2*.py) from proto/.
# The generated files are committed so that installs need no protoc; tests/test_proto.py checks
# that they match the .proto files. Run from anywhere: scripts/gen_proto.sh [OUT_DIR]; PYTHON
# names the interpreter that has grpcio-tools (`make proto` passes the venv's).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
cd "$root"
mkdir -p "$out/rnnlm/v1"
"${PYTHON:-python3}" -m grpc_tools.protoc \
  --proto_path=proto \
  --python_out="$out" \
  --pyi_out="$out" \
  --grpc_python_out="$out" \
  proto/rnnlm/v1/*.proto
