"""Generated code of the examples' gRPC schemas (regenerate with grpc_tools.protoc)."""
