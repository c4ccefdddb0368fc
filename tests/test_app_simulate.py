"""The simulated-rater experiment behind the app's active-vs-random curve."""

import numpy as np
import pytest

from diffpref.experiments.simulate import first_reaching, oracle_choice, simulate_raters
from diffpref.world.render import WorldAttributes, render
from diffpref.world.users import WorldUser


def _image(color: str) -> np.ndarray:
    return np.asarray(render(WorldAttributes(shape="circle", color=color, background="white", size=0.6,
                                             brightness=0.6, centered=0.8)))


def test_oracle_choice_follows_the_users_reward():
    likes_red = WorldUser("r", {"color:red": 1.0})
    assert oracle_choice(likes_red, _image("red"), _image("blue")) == "left"
    assert oracle_choice(likes_red, _image("blue"), _image("red")) == "right"
    assert oracle_choice(likes_red, _image("blue"), _image("green")) == "tie"


def test_first_reaching():
    assert first_reaching([0.4, 0.6, 0.7], 0.6) == 2
    assert first_reaching([0.4, 0.5], 0.6) is None


@pytest.mark.slow
def test_simulated_raters_drive_the_service_in_both_modes(tmp_path):
    users = [WorldUser("r", {"color:red": 1.5}), WorldUser("d", {"background:black": 1.5, "size": -1.0})]
    result = simulate_raters(users, ratings=2, num_prompts=3, steps=2, db_dir=str(tmp_path), progress=False)
    assert result["ratings"] == [1, 2]
    for mode in ("active", "random"):
        assert set(result["per_user"][mode]) == {"r", "d"}
        assert len(result[mode]) == 2 and all(0.0 <= v <= 1.0 for v in result[mode])
        first, second = result[f"{mode}_decided"]
        assert 0 <= first <= 1 and first <= second <= first + 1  # cumulative count of non-tie answers
    with pytest.raises(ValueError, match="pair modes"):
        simulate_raters(users, modes=["clever"])


def test_compare_modes_resamples_raters():
    from diffpref.experiments.simulate import compare_modes

    random = {"a": [0.5] * 10, "b": [0.6] * 10}
    shifted = compare_modes({u: [v + 0.1 for v in c] for u, c in random.items()}, random)
    assert shifted["active_minus_random"] == {"mean": 0.1, "ci90": [0.1, 0.1]}  # every rater gains the same
    assert shifted["raters"] == 2 and shifted["active_at_5_minus_random_at_8"]["mean"] == 0.1
    mixed = compare_modes({"a": [0.7] * 10, "b": [0.5] * 10}, random)  # +0.2 and -0.1: mean +0.05
    assert mixed["active_minus_random"]["mean"] == 0.05
    low, high = mixed["active_minus_random"]["ci90"]
    assert low == pytest.approx(-0.1) and high == pytest.approx(0.2)  # resampling 2 raters reaches both ends
    assert "active_at_5_minus_random_at_8" not in compare_modes({"a": [0.5] * 4}, {"a": [0.5] * 4})
