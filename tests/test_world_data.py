"""World preference data (Pick-a-Pic schema), prompt adherence and win rates."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffpref.cli import main
from diffpref.data import read_pickapic
from diffpref.data.pickapic_writer import PICKAPIC_V2_SCHEMA
from diffpref.experiments.adherence import evaluate_adherence
from diffpref.experiments.make_data import make_preference_data, pair_seeds
from diffpref.models.builders import tiny_sd15_pipeline
from diffpref.world import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    WorldAttributes,
    WorldUser,
    caption_for,
    detect,
    load_users,
    oracle_reward,
    parse_caption,
    render_batch,
    sample_attributes,
    save_users,
)
from diffpref.world.metrics import adherence_of, balanced_captions, win_rate

USERS = [
    WorldUser("likes_red", {"color:red": 1.0, "size": 0.5}),
    WorldUser("dark_small", {"background:black": 1.0, "size": -1.0, "shape:star": 0.4}),
]
PICKAPIC_COLUMNS = {field.name: field.type for field in PICKAPIC_V2_SCHEMA}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A training job shares the CPU: one thread is faster for tiny models and leaves it alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = tiny_sd15_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class RenderPipe:
    """A stand-in pipeline that renders the world itself: what the caption names, the rest drawn from the seed.

    Its images have varied attributes (the random tiny model's do not), so labels carry information.
    """

    name_or_path = "render-oracle"
    vae_scale_factor = 8
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=8))

    def __call__(self, prompt, generator, height, width, output_type, **_):
        assert (height, width, output_type) == (64, 64, "np")
        attrs = [sample_attributes(np.random.default_rng(g.initial_seed()), **parse_caption(p))
                 for p, g in zip(prompt, generator)]
        return SimpleNamespace(images=render_batch(attrs).astype(np.float32) / 255.0)


def _make(tmp_path: Path, name: str, model, **kwargs) -> dict:
    kwargs = {"pairs_per_user": 3, "seed": 5, "temperature": 0.0, "steps": 2, "batch_size": 4, "progress": False,
              **kwargs}
    return make_preference_data(tmp_path / name, USERS, model=model, **kwargs)


# ----------------------------------------------------------------------------- make-data
def test_make_data_schema_round_trip_and_determinism(tmp_path: Path, tiny_pipe) -> None:
    summary = _make(tmp_path, "a", tiny_pipe)
    assert summary["pairs"] == 6 and summary["users"] == 2
    assert summary["parquet"] == str(tmp_path / "a" / "pairs.parquet")
    table = pq.read_table(summary["parquet"])
    for name, arrow_type in PICKAPIC_COLUMNS.items():
        assert table.schema.field(name).type == arrow_type, name
    for name, arrow_type in [("world_user_id", pa.string()), ("seed_0", pa.int64()), ("seed_1", pa.int64()),
                             ("reward_0", pa.float64()), ("reward_1", pa.float64())]:
        assert table.schema.field(name).type == arrow_type, name
    rows = table.to_pylist()
    assert [r["user_id"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [r["world_user_id"] for r in rows] == ["likes_red"] * 3 + ["dark_small"] * 3
    seeds = [s for r in rows for s in (r["seed_0"], r["seed_1"])]
    assert len(set(seeds)) == 12 and (rows[0]["seed_0"], rows[0]["seed_1"]) == pair_seeds(5, 0, 0)
    assert sum(r["label_0"] == 0.5 for r in rows) == summary["ties"]
    for r in rows:
        assert r["label_0"] + r["label_1"] == 1.0 and r["has_label"] and r["model_0"] == r["model_1"]
        assert r["jpg_0"].startswith(b"\x89PNG")
        assert r["num_example_per_prompt"] == sum(o["caption"] == r["caption"] for o in rows)

    result = read_pickapic(summary["parquet"], tie_policy="soft")
    assert len(result.pairs) == 6 and result.ties == summary["ties"]
    assert [p.user_id for p in result.pairs] == ["0"] * 3 + ["1"] * 3
    for pair, row in zip(result.pairs, rows):
        assert pair.prompt == row["caption"] and pair.image_0.size == (64, 64)
        expected = 1.0 if row["reward_0"] > row["reward_1"] else 0.0 if row["reward_0"] < row["reward_1"] else 0.5
        assert pair.label == expected
        # PNG is lossless: the decoded images give back the stored rewards.
        user = USERS[int(pair.user_id)]
        assert oracle_reward(user, detect(pair.image_0)) == pytest.approx(row["reward_0"])
        assert oracle_reward(user, detect(pair.image_1)) == pytest.approx(row["reward_1"])

    assert load_users(summary["users_file"]) == USERS
    # Same seed, other batch size: identical content.
    again = _make(tmp_path, "b", tiny_pipe, batch_size=6)
    assert pq.read_table(again["parquet"]).equals(table)


def test_make_data_labels_follow_rewards(tmp_path: Path) -> None:
    summary = _make(tmp_path, "render", RenderPipe(), pairs_per_user=8)
    table = pq.read_table(summary["parquet"]).to_pylist()
    decided = [r for r in table if r["label_0"] != 0.5]
    assert len(decided) >= 12, "rendered pairs should mostly differ in reward"
    for r in table:
        assert (r["label_0"] == 1.0) == (r["reward_0"] > r["reward_1"])
        assert r["best_image_uid"] == (r["image_0_uid"] if r["label_0"] == 1.0 else
                                       r["image_1_uid"] if r["label_0"] == 0.0 else "")
        assert r["model_0"] == "render-oracle"
    result = read_pickapic(summary["parquet"])  # ties dropped by default
    assert len(result.pairs) == len(decided)
    for pair in result.pairs:
        user = USERS[int(pair.user_id)]
        assert oracle_reward(user, detect(pair.preferred)) > oracle_reward(user, detect(pair.rejected))

    # Temperature > 0: labels are drawn, yet reproducible from the seed; another seed gives other data.
    soft_a = pq.read_table(_make(tmp_path, "t1", RenderPipe(), temperature=0.5)["parquet"])
    soft_b = pq.read_table(_make(tmp_path, "t2", RenderPipe(), temperature=0.5, batch_size=2)["parquet"])
    other = pq.read_table(_make(tmp_path, "t3", RenderPipe(), temperature=0.5, seed=6)["parquet"])
    assert soft_a.equals(soft_b) and not soft_a.equals(other)
    assert set(soft_a.column("label_0").to_pylist()) <= {0.0, 1.0}


def test_make_data_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one user"):
        make_preference_data(tmp_path, [], 1, 0, model=RenderPipe())
    with pytest.raises(ValueError, match="duplicate"):
        make_preference_data(tmp_path, [USERS[0], USERS[0]], 1, 0, model=RenderPipe())
    with pytest.raises(ValueError, match="pairs_per_user"):
        make_preference_data(tmp_path, USERS, 0, 0, model=RenderPipe())
    assert not (tmp_path / "pairs.parquet").exists()


# ----------------------------------------------------------------------------- adherence
def _renders(specs: list[tuple[str, str, str]]) -> np.ndarray:
    # Mid size, bright and centred: the detector reads these renders exactly.
    return render_batch([WorldAttributes(s, c, b, size=0.6, brightness=0.9, centered=1.0) for s, c, b in specs])


def test_adherence_of_hand_computed() -> None:
    specs = [("circle", "red", "white"), ("star", "blue", "black"), ("square", "yellow", "gray"),
             ("triangle", "purple", "beige")]
    images = _renders(specs)
    right = adherence_of(images, [caption_for(*spec) for spec in specs])
    assert right == {"color_acc": 1.0, "shape_acc": 1.0, "background_acc": 1.0, "mean_acc": 1.0, "n": 4}

    wrong = [caption_for(SHAPES[(SHAPES.index(s) + 1) % 4], COLORS[(COLORS.index(c) + 1) % 6],
                         BACKGROUNDS[(BACKGROUNDS.index(b) + 1) % 4]) for s, c, b in specs]
    assert adherence_of(images, wrong) == {"color_acc": 0.0, "shape_acc": 0.0, "background_acc": 0.0,
                                           "mean_acc": 0.0, "n": 4}

    # Partial captions: colour named 4x (3 right), shape 2x (1 right), background never.
    mixed = ["a red shape", "a green star", "a yellow circle", "a purple shape"]
    result = adherence_of(images, mixed)
    assert result["color_acc"] == 0.75 and result["shape_acc"] == 0.5 and math.isnan(result["background_acc"])
    assert result["mean_acc"] == pytest.approx(0.625)

    with pytest.raises(ValueError, match="captions"):
        adherence_of(images, mixed[:3])


def test_balanced_captions_cover_every_combination() -> None:
    assert len(set(balanced_captions(96))) == 96
    named = [parse_caption(c) for c in balanced_captions(240)]
    assert all(len(n) == 3 for n in named)
    for attr, values in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS)):
        counts = [sum(n[attr] == v for n in named) for v in values]
        assert counts == [240 // len(values)] * len(values), attr


def test_evaluate_adherence(tiny_pipe) -> None:
    result = evaluate_adherence(tiny_pipe, num_prompts=4, steps=2, batch_size=3, progress=False)
    assert set(result) == {"color_acc", "shape_acc", "background_acc", "mean_acc", "n", "model"}
    assert result["n"] == 4 and 0.0 <= result["mean_acc"] <= 1.0
    perfect = evaluate_adherence(RenderPipe(), num_prompts=12, progress=False)
    assert perfect["mean_acc"] == 1.0 and perfect["model"] == "render-oracle"


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([3, 1, 2, 2], [1, 3, 2, 0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert win_rate(np.ones(5), np.ones(5)) == 0.5
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError):
        win_rate([], [])


# ----------------------------------------------------------------------------- CLI
def test_cli_make_data_and_eval(tmp_path: Path, tiny_pipe, capsys) -> None:
    model_dir = tmp_path / "tiny"
    tiny_pipe.save_pretrained(model_dir)
    users_file = tmp_path / "users.json"
    save_users(USERS[:1], users_file)
    out = tmp_path / "data"
    rc = main(["world", "make-data", "--out", str(out), "--users-file", str(users_file), "--pairs-per-user", "2",
               "--model", str(model_dir), "--temperature", "0", "--batch-size", "4"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 2 and summary["users"] == 1
    assert len(read_pickapic(out / "pairs.parquet", tie_policy="soft").pairs) == 2
    assert load_users(out / "users.json") == USERS[:1]

    rc = main(["world", "eval", "--model", str(model_dir), "--prompts", "4", "--steps", "2", "--batch-size", "4",
               "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["model"] == str(model_dir) and 0.0 <= result["mean_acc"] <= 1.0


def test_plan_pairs_name_prob_controls_how_much_captions_name():
    from diffpref.experiments.make_data import plan_pairs
    from diffpref.world.captions import parse_caption

    assert {job.caption for job in plan_pairs(2, 20, seed=3, name_prob=0.0)} == {"a shape"}
    assert all(len(parse_caption(job.caption)) == 3 for job in plan_pairs(2, 20, seed=3, name_prob=1.0))
    default, explicit = plan_pairs(3, 10, seed=1), plan_pairs(3, 10, seed=1, name_prob=0.5)
    assert [j.caption for j in default] == [j.caption for j in explicit]
    # seeds do not depend on the captions' wording
    assert [j.seed_0 for j in default] == [j.seed_0 for j in plan_pairs(3, 10, seed=1, name_prob=0.1)]
    with pytest.raises(ValueError, match="name_prob"):
        plan_pairs(1, 1, seed=0, name_prob=1.5)


# ----------------------------------------------------------------------------- relabel
def test_relabel_rates_pool_pairs_by_each_users_oracle(tmp_path: Path, capsys) -> None:
    from diffpref.experiments.relabel import relabel_pairs

    pool = _make(tmp_path, "pool", RenderPipe(), pairs_per_user=6)["parquet"]  # 12 generated pairs
    pool_rows = {(r["image_0_uid"], r["image_1_uid"]): r for r in pq.read_table(pool).to_pylist()}
    # Opposite tastes: on a pair whose images differ in size they must disagree.
    users = [WorldUser("big", {"size": 1.0}), WorldUser("small", {"size": -1.0}), WorldUser("red", {"color:red": 2.0})]
    summary = relabel_pairs(pool, tmp_path / "relabelled", users, pairs_per_user=10, seed=3, temperature=0.0,
                            progress=False)
    assert summary["pairs"] == 30 and summary["pool"] == 12
    table = pq.read_table(summary["parquet"])
    assert table.schema.equals(pq.read_table(pool).schema)
    rows = table.to_pylist()
    labels: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        key = (r["image_0_uid"], r["image_1_uid"])
        source = pool_rows[key]  # every rated pair comes from the pool, with its images and caption
        assert (r["jpg_0"], r["jpg_1"], r["caption"]) == (source["jpg_0"], source["jpg_1"], source["caption"])
        user = users[r["user_id"]]
        assert r["world_user_id"] == user.user_id
        # Rewards recomputed for this user from the pool's images, and the label follows them.
        for side in (0, 1):
            assert r[f"reward_{side}"] == pytest.approx(oracle_reward(user, detect(_png(r[f"jpg_{side}"]))))
        expected = 1.0 if r["reward_0"] > r["reward_1"] else 0.0 if r["reward_0"] < r["reward_1"] else 0.5
        assert r["label_0"] == expected
        labels.setdefault(key, {})[user.user_id] = r["label_0"]
    per_user = [sum(r["user_id"] == u for r in rows) for u in range(3)]
    assert per_user == [10, 10, 10]
    assert len({(r["user_id"], r["image_0_uid"]) for r in rows}) == 30, "a user rates a pool pair at most once"
    disagreements = [v for v in labels.values() if {"big", "small"} <= set(v) and v["big"] != 0.5 and v["big"] != v["small"]]
    assert disagreements, "opposite users rating the same pairs must disagree somewhere"
    # The readers take it as any Pick-a-Pic file; deterministic in the seed.
    assert len(read_pickapic(summary["parquet"], tie_policy="soft").pairs) == 30
    again = relabel_pairs(pool, tmp_path / "again", users, pairs_per_user=10, seed=3, temperature=0.0, progress=False)
    assert pq.read_table(again["parquet"]).equals(table)

    # decided_only: nobody is given a pair they are indifferent to, so no label is a coin flip.
    decided = relabel_pairs(pool, tmp_path / "decided", users[:2], pairs_per_user=8, seed=3, temperature=0.5,
                            decided_only=True, progress=False)
    decided_rows = pq.read_table(decided["parquet"]).to_pylist()
    assert len(decided_rows) == 16 and all(r["reward_0"] != r["reward_1"] for r in decided_rows)
    indifferent = sum(r["reward_0"] == r["reward_1"] for r in rows if r["user_id"] == 2)
    red_decided = 12 - sum(r["reward_0"] == r["reward_1"] for r in pq.read_table(
        relabel_pairs(pool, tmp_path / "red", users[2:], pairs_per_user=12, seed=0, progress=False)["parquet"]).to_pylist())
    assert indifferent > 0 and red_decided < 12, "the pool should hold pairs a colour-only user does not care about"
    with pytest.raises(ValueError, match=f"prefers one image in only {red_decided} of the pool's 12 pairs"):
        relabel_pairs(pool, tmp_path / "x", users[2:], pairs_per_user=12, seed=0, decided_only=True, progress=False)

    # Several files make one pool.
    pool_b = _make(tmp_path, "pool_b", RenderPipe(), pairs_per_user=2, seed=9)["parquet"]  # 4 more pairs
    both = relabel_pairs([pool, pool_b], tmp_path / "both", users[:1], pairs_per_user=16, seed=3, progress=False)
    uids = {r["image_0_uid"] for r in pq.read_table(both["parquet"]).to_pylist()}
    assert both["pool"] == 16 and uids == {r["image_0_uid"] for p in (pool, pool_b) for r in pq.read_table(p).to_pylist()}

    # CLI, and the errors.
    save_users(users, tmp_path / "users.json")
    assert main(["world", "relabel", "--pool", str(pool), "--users-file", str(tmp_path / "users.json"),
                 "--pairs-per-user", "4", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 12
    with pytest.raises(ValueError, match=r"pairs_per_user must be in \[1, 12\]"):
        relabel_pairs(pool, tmp_path / "x", users, pairs_per_user=13, seed=0, progress=False)
    with pytest.raises(FileNotFoundError, match="make-data"):
        relabel_pairs(tmp_path / "missing.parquet", tmp_path / "x", users, pairs_per_user=1, seed=0, progress=False)
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing column"):
        relabel_pairs(tmp_path / "bad.parquet", tmp_path / "x", users, pairs_per_user=1, seed=0, progress=False)


def _png(blob: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
