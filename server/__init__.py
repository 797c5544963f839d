"""emserve's server: the gRPC service, sessions, engines, CLI (``emserve.server.*``)."""

from __future__ import annotations


def version() -> str:
    """The installed emserve version ("0+unknown" when run from a tree that is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("emserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
