"""Domain errors of the segmenter package (the server maps them to gRPC status codes).

The segmenter's one import from the rest of emserve is the error root, :class:`EmserveError`."""

from emserve.retrieval.errors import EmserveError


class SegmenterError(EmserveError, ValueError):
    """Invalid segmenter configuration, input or state (bad config, non-finite surprise, a resumed
    state that does not match, use after :meth:`OnlineSegmenter.flush`, ...)."""
