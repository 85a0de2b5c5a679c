"""Generated code of ``fleet/protos/serve.proto`` (regenerate with grpc_tools.protoc)."""
