"""The attainable ceiling of win_rate_vs_base against an independent brute force over renderable images."""

import itertools

import numpy as np
import pytest

from diffpref.world.captions import parse_caption, sample_prompt
from diffpref.world.ceiling import best_attainable_features, ceiling_win_rate
from diffpref.world.detector import FEATURE_KEYS
from diffpref.world.render import BACKGROUNDS, COLORS, SHAPES
from diffpref.world.users import WorldUser, oracle_reward


def brute_force_best_reward(user: WorldUser, prompt: str) -> float:
    """Max reward over every (shape, colour, background, continuous corner) the prompt allows."""
    named = parse_caption(prompt)
    best = -np.inf
    for shape, color, background in itertools.product(SHAPES, COLORS, BACKGROUNDS):
        chosen = {"shape": shape, "color": color, "background": background}
        if any(chosen[k] != v for k, v in named.items()):
            continue
        for size, brightness, centered in itertools.product((0.0, 0.5, 1.0), repeat=3):
            feats = {f"shape:{shape}": 1.0, f"color:{color}": 1.0, f"background:{background}": 1.0,
                     "size": size, "brightness": brightness, "centered": centered}
            best = max(best, oracle_reward(user, feats))
    return best


USERS = [
    WorldUser("red_large", {"color:red": 1.4, "size": 1.0}),
    WorldUser("dark_not_blue", {"brightness": -0.8, "color:blue": -1.2, "background:black": 0.5}),
    WorldUser("square", {"shape:square": 1.0}),
]


@pytest.mark.parametrize("user", USERS, ids=lambda u: u.user_id)
def test_best_attainable_matches_brute_force(user):
    rng = np.random.default_rng(0)
    for _ in range(40):
        prompt = sample_prompt(rng)
        best = best_attainable_features(user, prompt)
        assert oracle_reward(user, best) == pytest.approx(brute_force_best_reward(user, prompt))
        # and the image shows the prompt: every named attribute is kept
        for attribute, value in parse_caption(prompt).items():
            assert best[FEATURE_KEYS.index(f"{attribute}:{value}")] == 1.0


def test_ceiling_win_rate_counts_wins_and_ties():
    user = WorldUser("red", {"color:red": 1.0})
    prompts = ["a blue star", "a star", "a star", "a red star"]

    def feats(color):
        v = np.zeros(len(FEATURE_KEYS))
        v[FEATURE_KEYS.index(f"color:{color}")] = 1.0
        return v

    base = np.stack([feats("red"), feats("green"), feats("red"), feats("red")])
    # blue named, base (wrongly) red: the faithful ceiling loses; free colour vs green: win;
    # free vs red already: tie; red named and shown: tie
    assert ceiling_win_rate(user, prompts, base) == pytest.approx((0 + 1 + 0.5 + 0.5) / 4)
    with pytest.raises(ValueError, match="prompts"):
        ceiling_win_rate(user, prompts[:2], base)


def test_few_shot_ceiling_against_a_direct_computation():
    from diffpref.world.ceiling import few_shot_ceiling_win_rate
    from diffpref.world.metrics import win_rate

    rng = np.random.default_rng(3)
    prompts = [sample_prompt(rng) for _ in range(30)]
    base = np.zeros((30, len(FEATURE_KEYS)))
    for i in range(30):  # base images: a random shape, colour and background each
        for family, values in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS)):
            named = parse_caption(prompts[i]).get(family) or values[rng.integers(len(values))]
            base[i, FEATURE_KEYS.index(f"{family}:{named}")] = 1.0
    user = WorldUser("red", {"color:red": 1.0})
    red = np.zeros(len(FEATURE_KEYS))
    red[FEATURE_KEYS.index("color:red")] = 1.0
    # Choices that all say "red wins": the estimate is the user's own taste, so the full ceiling.
    clear = np.tile(red, (6, 1))
    assert few_shot_ceiling_win_rate(user, prompts, base, clear, shots=2) == ceiling_win_rate(user, prompts, base)
    # Choices that say "red loses": the estimate avoids red; its best images are orange where the
    # prompt leaves the colour open (the first of the colours tied at weight 0).
    opposite = -clear
    guess = np.stack([best_attainable_features(WorldUser("g", {"color:red": -1.0}), p) for p in prompts])
    assert all(guess[i, FEATURE_KEYS.index("color:orange")] == 1.0 for i, p in enumerate(prompts)
               if "color" not in parse_caption(p))
    expected = win_rate(oracle_reward(user, guess), oracle_reward(user, base))
    assert few_shot_ceiling_win_rate(user, prompts, base, opposite, shots=3) == pytest.approx(expected)
    assert expected < ceiling_win_rate(user, prompts, base)
    with pytest.raises(ValueError, match="shots=7"):
        few_shot_ceiling_win_rate(user, prompts, base, clear, shots=7)
    with pytest.raises(ValueError, match="winner_minus_loser"):
        few_shot_ceiling_win_rate(user, prompts, base, clear[:, :3], shots=1)
