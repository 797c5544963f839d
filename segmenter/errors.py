"""Domain errors of the segmenter package (the server maps them to gRPC status codes)."""


class SegmenterError(ValueError):
    """Invalid segmenter configuration, input or state (bad config, non-finite surprise, a resumed
    state that does not match, use after :meth:`OnlineSegmenter.flush`, ...)."""
