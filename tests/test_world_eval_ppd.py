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
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is the JSON alone; per-user progress goes to stderr
    assert "likes_red: win rate" in captured.err and "likes_dark: win rate" in captured.err
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
    from diffpref.experiments.ppd_eval import draw_pairs, ranking_accuracy
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), "embedded-ppd")
    pipe.set_progress_bar_config(disable=True)
    pairs = draw_pairs(pipe, USERS[0], 8, seed=0, steps=3, guidance_scale=None)
    labels = np.array([label for *_, label in pairs])
    zero = torch.zeros(pipe.num_user_tokens, pipe.unet.config.cross_attention_dim)
    assert ranking_accuracy(pipe, zero, pairs, draws=2) == pytest.approx(float(np.mean(labels == 0.0)))


def test_policy_pairs_rate_the_adapters_own_images_by_each_users_oracle(tmp_path, capsys):
    """`diffpref world policy-pairs`: personalized images against the base image of the same caption and
    seed, and against another personalized seed, labelled by the user's oracle; decided pairs only."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from diffpref.experiments.make_data import make_preference_data
    from diffpref.experiments.policy_pairs import make_policy_pairs
    from diffpref.experiments.preference_eval import generate_world_images
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.context import is_policy_model
    from diffpref.world.detector import detect
    from diffpref.world.users import oracle_reward

    base = load_pipeline("embedded")
    base.set_progress_bar_config(disable=True)
    offline = make_preference_data(tmp_path / "offline", USERS, model=base, pairs_per_user=6, seed=1, temperature=0.0,
                                   steps=3, batch_size=12, progress=False)
    offline_users = {r["world_user_id"]: r["user_id"] for r in pq.read_table(offline["parquet"]).to_pylist()}
    kw = dict(captions_per_user=4, contexts_per_user=2, shots=2, steps=3, batch_size=8, temperature=0.0, progress=False)
    summary = make_policy_pairs(offline["parquet"], "embedded-ppd", tmp_path / "policy", **kw)
    assert summary["candidates"] == 2 * 2 * 4 and summary["users"] == 2
    assert summary["pairs"] + summary["ties_dropped"] == summary["candidates"]
    table = pq.read_table(summary["parquet"])
    assert table.schema.equals(pq.read_table(offline["parquet"]).schema)
    rows = table.to_pylist()
    assert len(rows) == summary["pairs"] > 0

    def image(blob):
        return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))

    users = {u.user_id: u for u in USERS}
    base_sides = []
    for r in rows:
        assert r["user_id"] == offline_users[r["world_user_id"]]  # trains beside the offline data as the same user
        policy = [is_policy_model(r[f"model_{s}"]) for s in (0, 1)]
        assert any(policy) and all(not p or r[f"model_{s}"].startswith(f"ppd-policy:{r['world_user_id']}:")
                                   for s, p in enumerate(policy))
        rewards = [oracle_reward(users[r["world_user_id"]], detect(image(r[f"jpg_{s}"]))) for s in (0, 1)]
        assert rewards == pytest.approx([r["reward_0"], r["reward_1"]]) and rewards[0] != rewards[1]
        assert r["label_0"] == (1.0 if rewards[0] > rewards[1] else 0.0)  # temperature 0: the oracle decides
        base_sides += [(r["caption"], r[f"seed_{s}"], image(r[f"jpg_{s}"])) for s in (0, 1) if not policy[s]]
    # The base side is exactly what the base model draws for that caption and seed.
    assert base_sides
    fresh = generate_world_images(base, [c for c, _, _ in base_sides], [s for _, s, _ in base_sides], 3, None, 8,
                                  False, "base")
    for (_, _, stored), again in zip(base_sides, fresh):
        np.testing.assert_array_equal(stored, again)
    # Deterministic in the seed; the CLI writes the same file.
    save_users(USERS, tmp_path / "users.json")
    assert main(["world", "policy-pairs", "--data", offline["parquet"], "--adapter", "embedded-ppd", "--out",
                 str(tmp_path / "cli"), "--users-file", str(tmp_path / "users.json"), "--captions-per-user", "4",
                 "--contexts-per-user", "2", "--shots", "2", "--steps", "3", "--batch-size", "8",
                 "--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == summary["pairs"]
    assert pq.read_table(tmp_path / "cli" / "pairs.parquet").equals(table)

    save_users(USERS[:1], tmp_path / "one.json")
    with pytest.raises(ValueError, match=r"users \['likes_dark'\] are not in"):
        make_policy_pairs(offline["parquet"], "embedded-ppd", tmp_path / "x", users_file=tmp_path / "one.json", **kw)
    with pytest.raises(ValueError, match="fewer than shots=99"):
        make_policy_pairs(offline["parquet"], "embedded-ppd", tmp_path / "x", **dict(kw, shots=99))
