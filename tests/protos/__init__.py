"""Test-only gRPC schema and its generated code (regenerate with grpc_tools.protoc)."""
