"""The first answer token by contrast with the model's prior (server/contrast.py), on hand-made distributions."""

from __future__ import annotations

import math

import pytest

from emserve.server.contrast import PLAUSIBLE, contrast_choice

LN = math.log


def test_alpha_zero_is_greedy() -> None:
    window = {1: LN(0.5), 2: LN(0.3), 3: LN(0.2)}
    assert contrast_choice(window, {1: LN(0.9), 2: LN(0.05)}, 0.0) == 1


def test_what_the_model_says_without_the_memory_gives_way_to_what_the_memory_supports() -> None:
    # " the" is likely with and without the memory; the key's first digits only with it
    window = {10: LN(0.45), 20: LN(0.40), 30: LN(0.15)}
    prior = {10: LN(0.60), 30: LN(0.30), 40: LN(0.10)}
    assert contrast_choice(window, prior, 0.5) == 20  # not in the prior's list: its floor, 0.10
    assert contrast_choice(window, prior, 0.05) == 10  # a weak contrast keeps the greedy token


def test_implausible_tokens_are_never_chosen_for_the_contrast_alone() -> None:
    window = {1: LN(0.95), 2: LN(0.95 * PLAUSIBLE * 0.9)}  # token 2 just under the plausibility cut
    prior = {1: LN(0.99), 2: LN(1e-9)}
    assert contrast_choice(window, prior, 10.0) == 1
    window[2] = LN(0.95 * PLAUSIBLE * 1.1)  # just over it: now the contrast decides
    assert contrast_choice(window, prior, 1.0) == 2


def test_ties_go_to_the_window_ranking_and_empty_window_is_an_error() -> None:
    assert contrast_choice({1: LN(0.4), 2: LN(0.4)}, {}, 1.0) in (1, 2)
    assert contrast_choice({1: LN(0.5), 2: LN(0.3)}, {1: LN(0.5), 2: LN(0.3)}, 1.0) == 1
    with pytest.raises(ValueError):
        contrast_choice({}, {1: 0.0}, 1.0)
