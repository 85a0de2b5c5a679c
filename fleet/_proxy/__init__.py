"""The proxies: HTTP (uvicorn) and gRPC (grpc.aio) in front of the Routers."""
