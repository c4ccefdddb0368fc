"""`diffpref world eval --adapter embedded-ppd --users FILE --shots K --json` on the shipped model and adapter."""

import json

import numpy as np
import pytest
import torch

from diffpref.cli import main
from diffpref.world.users import WorldUser, save_users

USERS = [WorldUser("likes_red", {"color:red": 1.5, "size": 0.5}), WorldUser("likes_dark", {"brightness": -1.0})]


def test_world_eval_ppd_prints_the_issue_keys(tmp_path, capsys):
    save_users(USERS, tmp_path / "users.json")
    args = ["world", "eval", "--adapter", "embedded-ppd", "--users", str(tmp_path / "users.json"), "--shots", "2",
            "--prompts", "6", "--steps", "3", "--batch-size", "16", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"win_rate_vs_base", "adherence", "base_adherence", "per_user", "ranking_accuracy",
            "ceiling_win_rate"} <= set(result)
    assert set(result["per_user"]) == {"likes_red", "likes_dark"} and (result["shots"], result["n"]) == (2, 6)
    per_user = result["per_user"].values()
    for key in ("win_rate_vs_base", "adherence", "base_adherence", "ranking_accuracy", "ceiling_win_rate"):
        assert 0.0 <= result[key] <= 1.0, key
    # the means are the means of the per-user numbers; win rates move in steps of half a prompt
    assert result["win_rate_vs_base"] == pytest.approx(np.mean([u["win_rate"] for u in per_user]))
    assert result["ceiling_win_rate"] == pytest.approx(np.mean([u["ceiling_win_rate"] for u in per_user]))
    assert all((u["win_rate"] * 12) % 1 == pytest.approx(0) for u in per_user)
    # the same seed gives the same numbers
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == result


def test_ranking_accuracy_without_a_user_predicts_no_preference():
    """Zero user tokens add exactly nothing, so every implicit-reward margin is 0 and no pair is called for
    image 0: the accuracy is then the share of pairs whose label is 1 - 1 = 0 (an independent count)."""
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.personalize.world_eval import draw_pairs, ranking_accuracy

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), "embedded-ppd")
    pipe.set_progress_bar_config(disable=True)
    pairs = draw_pairs(pipe, USERS[0], 8, seed=0, steps=3, guidance_scale=None)
    labels = np.array([label for *_, label in pairs])
    zero = torch.zeros(pipe.num_user_tokens, pipe.unet.config.cross_attention_dim)
    assert ranking_accuracy(pipe, zero, pairs, draws=2) == pytest.approx(float(np.mean(labels == 0.0)))
