"""The emserve API, generated from ``proto/emserve/v1/emserve.proto`` (``python -m emserve.proto.generate``)."""
