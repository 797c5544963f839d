"""A question's first answer token by contrast with the model's prior (context-aware decoding).

Rule: the first token of a greedy answer is the one that the memory's window supports most *beyond what
the model would answer without it*:

    score(t) = (1 + alpha) * log p(t | window, question) - alpha * log p(t | question)

over the tokens the window itself finds plausible (``log p(t | window, question) >= max + log(PLAUSIBLE)``:
the adaptive plausibility constraint of contrastive decoding, so a token both distributions find
unlikely is never picked for the contrast alone). ``alpha = 0`` is plain greedy. Shi et al. 2023,
"Trusting Your Evidence: Hallucinate Less with Context-aware Decoding", apply it at every token; here it
decides the first token only, the rest of the answer continues greedily after it (the first token is where
a small model's prior answer, e.g. " the pass key." after "The pass key is", overrides the fact it has in
its window). Off by default (``question_contrast``, ``QuestionRules.contrast``): the question alone also predicts the
answer's *type* (a number after "The access code is"), and the contrast then penalizes the right value's
first digits (docs/recall.md, "Tried and not kept").

Both distributions are known by their ``k`` most likely tokens (``SamplingSpec.top_logprobs``); a token
outside the prior's top ``k`` gets the prior's lowest listed log-probability, an upper bound of its own
(the contrast is then understated, never overstated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

PLAUSIBLE = 0.1
"""A candidate's probability under the window is at least this share of the most likely token's."""
TOP_K = 20
"""Tokens of each distribution compared (``SamplingSpec.top_logprobs``)."""


def contrast_choice(window: Mapping[int, float], prior: Mapping[int, float], alpha: float) -> int:
    """The first answer token (see the module docstring). ``window`` and ``prior``: ``{token: log p}`` of
    the most likely tokens with and without the memory; ``window`` must not be empty."""
    if not window:
        raise ValueError("no window log-probabilities")
    best = max(window.values())
    floor = min(prior.values()) if prior else 0.0
    cutoff = best + math.log(PLAUSIBLE)
    scores = {t: (1 + alpha) * lp - alpha * prior.get(t, floor) for t, lp in window.items() if lp >= cutoff}
    # ties (and alpha = 0) go to the window's own ranking: the most likely of the best-scored
    return max(scores, key=lambda t: (scores[t], window[t]))
