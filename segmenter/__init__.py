"""emserve.segmenter: a token stream's surprise (and keys) in, episodic events out.

Pure typed functions over numpy arrays and torch tensors: no vLLM, no gRPC, no I/O, no logging; of the
rest of emserve only the error root (``emserve.retrieval.errors.EmserveError``) is imported.

* :class:`SegmenterConfig` (``config.py``): the knobs, EM-LLM names.
* :func:`surprise_boundaries` (``surprise.py``): the online μ + γσ threshold over the last τ tokens.
* :func:`uniform_boundaries`, :func:`random_boundaries` (``splitters.py``): ablation splitters.
* :func:`adjacency`, :func:`refine_boundary`, :func:`refine_boundaries` (``refine.py``): moving
  boundaries to the best modularity / conductance split, O(1) per candidate after prefix sums.
* :class:`OnlineSegmenter`, :class:`Event` (``segmenter.py``, ``events.py``): the streaming pipeline
  (raw boundaries → acceptance and refinement → sizing → closing once out of the local window).
* ``reference.py``: a direct O(s³) refinement, the test oracle.
"""

from emserve.segmenter.config import Metric, SegmenterConfig, Splitter
from emserve.segmenter.errors import SegmenterError
from emserve.segmenter.events import Event, split_even
from emserve.segmenter.refine import (
    adjacency,
    best_candidate,
    refine_boundaries,
    refine_boundary,
    split_objective,
    split_sums,
    window,
)
from emserve.segmenter.segmenter import KeyFn, OnlineSegmenter
from emserve.segmenter.splitters import random_boundaries, uniform_boundaries
from emserve.segmenter.surprise import SurpriseState, quantize_surprise, surprise_boundaries

__all__ = [
    "Event",
    "KeyFn",
    "Metric",
    "OnlineSegmenter",
    "SegmenterConfig",
    "SegmenterError",
    "Splitter",
    "SurpriseState",
    "adjacency",
    "best_candidate",
    "quantize_surprise",
    "random_boundaries",
    "refine_boundaries",
    "refine_boundary",
    "split_even",
    "split_objective",
    "split_sums",
    "surprise_boundaries",
    "uniform_boundaries",
    "window",
]
