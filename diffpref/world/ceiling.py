"""How much any prompt-faithful personalization could win for a user: the attainable ceiling.

A user's oracle reward is linear in the detected attributes, and a prompt pins the attributes it
names. The best image a generator that keeps to the prompt can show this user therefore has the
named attributes as named, every unnamed categorical attribute at the user's favourite value, and
each continuous attribute at the end of its range the user likes. Its win rate against the base
images of the same prompts is the ceiling of ``win_rate_vs_base`` at full prompt adherence: no
adapter that keeps the prompt can beat it (ties count half, as in the evaluation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffpref.world.captions import parse_caption
from diffpref.world.detector import FEATURE_KEYS
from diffpref.world.metrics import win_rate
from diffpref.world.render import CATEGORICAL, CONTINUOUS
from diffpref.world.users import WorldUser, oracle_reward

_INDEX = {key: i for i, key in enumerate(FEATURE_KEYS)}
CONTINUOUS_RANGE = (0.0, 1.0)  # what the renderer draws (render.sample_attributes) and the detector reads back


def best_attainable_features(user: WorldUser, prompt: str) -> np.ndarray:
    """Feature vector (ordered like ``FEATURE_KEYS``) of the image ``user`` likes most among those showing ``prompt``."""
    weights, named = user.weights, parse_caption(prompt)
    features = np.zeros(len(FEATURE_KEYS))
    for attribute, values in CATEGORICAL.items():
        # the first value of the highest weight (unweighted values count 0): ties leave the reward unchanged
        choice = named.get(attribute) or max(values, key=lambda v: weights.get(f"{attribute}:{v}", 0.0))
        features[_INDEX[f"{attribute}:{choice}"]] = 1.0
    for name in CONTINUOUS:
        features[_INDEX[name]] = CONTINUOUS_RANGE[1] if weights.get(name, 0.0) > 0 else CONTINUOUS_RANGE[0]
    return features


def ceiling_win_rate(user: WorldUser, prompts: Sequence[str], base_features: np.ndarray) -> float:
    """Win rate of the best prompt-faithful images against the base's (detected features, one row per prompt)."""
    if len(prompts) != len(base_features):
        raise ValueError(f"{len(prompts)} prompts but {len(base_features)} base feature rows")
    best = np.stack([best_attainable_features(user, p) for p in prompts])
    return win_rate(oracle_reward(user, best), oracle_reward(user, base_features))


def few_shot_ceiling_win_rate(user: WorldUser, prompts: Sequence[str], base_features: np.ndarray,
                              winner_minus_loser: np.ndarray, shots: int, trials: int = 20, seed: int = 0) -> float:
    """What knowing the user only from ``shots`` of their choices allows, with a perfect generator.

    Each trial takes ``shots`` rows of ``winner_minus_loser`` (detected features of the preferred
    minus the rejected image of the user's decided pairs, ``[N, F]``), estimates the taste as their
    mean (the plain estimate of linear weights from a few choices, which is also what the
    ``evidence`` user encoder computes in the backbone's space), and scores the best prompt-faithful
    image *for that estimate* with the user's true oracle against the base. The mean over trials
    bounds ``win_rate_vs_base`` at K = ``shots`` for an encoder that uses this estimate; the full
    ``ceiling_win_rate`` is the limit of many shots.
    """
    differences = np.asarray(winner_minus_loser, dtype=np.float64)
    if differences.ndim != 2 or differences.shape[1] != len(FEATURE_KEYS):
        raise ValueError(f"winner_minus_loser must be [N, {len(FEATURE_KEYS)}], got {differences.shape}")
    if not 1 <= shots <= len(differences):
        raise ValueError(f"shots={shots} must lie in [1, {len(differences)}] (the number of pairs given)")
    rng = np.random.default_rng(seed)
    base_reward = oracle_reward(user, base_features)
    rates = []
    for _ in range(trials):
        estimate = differences[rng.choice(len(differences), size=shots, replace=False)].mean(0)
        guess = WorldUser("estimate", {key: float(v) for key, v in zip(FEATURE_KEYS, estimate) if v != 0.0})
        best = np.stack([best_attainable_features(guess, p) for p in prompts])
        rates.append(win_rate(oracle_reward(user, best), base_reward))
    return float(np.mean(rates))
