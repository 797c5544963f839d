"""Version 1 of the emserve API: messages (``emserve_pb2``) and gRPC stubs (``emserve_pb2_grpc``), generated
from ``proto/emserve/v1/emserve.proto`` by ``python -m emserve.proto.generate``; do not edit."""
