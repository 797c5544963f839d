"""Domain errors of the retrieval package (the server maps them to gRPC status codes)."""


class EmserveError(Exception):
    """Base class of every error emserve raises on purpose."""


class PlanError(EmserveError, ValueError):
    """A WindowPlan is malformed (bad ranges, unequal per-layer lengths, ...)."""


class LogError(EmserveError):
    """A KV log is missing, inconsistent with the model, or read out of range."""
