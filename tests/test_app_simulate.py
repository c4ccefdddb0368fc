"""The simulated-rater experiment behind the app's active-vs-random curve."""

import numpy as np
import pytest

from diffpref.app.simulate import first_reaching, oracle_choice, simulate_raters
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
