"""The root of emserve's errors, and the retrieval package's own.

Every error emserve raises on purpose derives from :class:`EmserveError` (the segmenter's, the
server's, the engine's); one class per name. The server maps them to gRPC status codes in one place
(``emserve.server.rpc.service.status_of``). The client distribution has its own root (``ClientError``): it
depends on nothing of the server.
"""


class EmserveError(Exception):
    """Base class of every error emserve raises on purpose."""


class PlanError(EmserveError, ValueError):
    """A WindowPlan is malformed (bad ranges, unequal per-layer lengths, ...)."""


class WindowFull(PlanError):
    """A step's window cannot hold its new tokens and the generation room it reserves next to the fixed
    part of the window. ``cause``: ``"reserve"`` when the new tokens alone would fit (the reserved room is
    too large), ``"new"`` when they would not."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class LogError(EmserveError):
    """A KV log is missing, inconsistent with the model, or read out of range."""


class ConfigError(EmserveError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class EventTableError(EmserveError):
    """An event table is missing, inconsistent with its log, or used out of range."""


class IndexStoreError(EmserveError):
    """A persisted similarity index cannot be opened or does not match its event table."""


class DeviceMemoryError(EmserveError):
    """The retrieval device (a GPU) ran out of memory: a session's mirror could not grow, or a step's
    scoring could not allocate. Nothing of the session changed on disk."""
