"""Tests of the synthetic preference world: renderer, captions, detector and simulated users."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffpref.world import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLORS,
    CONTINUOUS,
    EXAMPLE_USERS,
    FEATURE_KEYS,
    SHAPES,
    Detection,
    WorldAttributes,
    WorldUser,
    bradley_terry_choice,
    bradley_terry_probability,
    caption_for,
    detect,
    load_users,
    oracle_reward,
    parse_caption,
    random_users,
    render,
    render_batch,
    sample_attributes,
    sample_caption,
    save_users,
)

# Seeds not used to train the shape classifier (0) or to calibrate the detector (12345).
ACCURACY_SEED = 20240607
N_ACCURACY = 500


def _world(seed: int, n: int = 8):
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    captions = [sample_caption(rng, a) for a in attrs]
    return attrs, captions, render_batch(attrs)


# --- determinism -----------------------------------------------------------------------------


def test_world_is_deterministic_by_seed():
    a1, c1, x1 = _world(7)
    a2, c2, x2 = _world(7)
    assert a1 == a2 and c1 == c2
    np.testing.assert_array_equal(x1, x2)
    a3, c3, x3 = _world(8)
    assert a1 != a3
    assert not np.array_equal(x1, x3)


# --- detector ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accuracy_run():
    rng = np.random.default_rng(ACCURACY_SEED)
    attrs = [sample_attributes(rng) for _ in range(N_ACCURACY)]
    return attrs, detect(render_batch(attrs))


@pytest.mark.parametrize("name", ["shape", "color", "background"])
def test_detector_categorical_accuracy(accuracy_run, name):
    attrs, dets = accuracy_run
    acc = np.mean([getattr(d, name) == getattr(a, name) for a, d in zip(attrs, dets)])
    assert acc >= 0.99, f"{name} accuracy {acc:.3f}"


@pytest.mark.parametrize("name", CONTINUOUS)
def test_detector_continuous_accuracy(accuracy_run, name):
    attrs, dets = accuracy_run
    err = np.array([abs(getattr(d, name) - getattr(a, name)) for a, d in zip(attrs, dets)])
    acc = np.mean(err <= 0.05)
    assert acc >= 0.99, f"{name}: {acc:.3f} within 0.05 (max error {err.max():.3f})"


def test_detector_accepts_pil_single_array_and_float_images():
    attrs = WorldAttributes("star", "green", "beige", 0.6, 0.4, 0.3, angle=1.0)
    img = render(attrs)
    from_pil = detect(img)
    from_array = detect(np.asarray(img))
    from_float = detect(np.asarray(img) / 255.0)
    from_batch = detect(np.asarray(img)[None])
    assert isinstance(from_pil, Detection) and isinstance(from_batch, list)
    assert from_pil == from_array == from_batch[0]
    assert from_float.shape == "star" and from_float.color == "green"
    assert (from_pil.shape, from_pil.color, from_pil.background) == ("star", "green", "beige")
    with pytest.raises(ValueError):
        detect(np.zeros((32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_detector_degenerate_blank_images(background):
    blank = np.tile(np.array(BACKGROUND_RGB[background], dtype=np.uint8), (64, 64, 1))
    det = detect(blank)
    assert not det.found
    assert det.shape is None and det.color is None
    assert det.background == background
    assert (det.size, det.brightness, det.centered) == (0.0, 0.0, 0.0)
    feats = det.features()
    assert all(math.isfinite(v) for v in feats.values())
    assert sum(feats[f"shape:{s}"] for s in SHAPES) == 0 and feats[f"background:{background}"] == 1.0


def test_detector_degenerate_tiny_and_noisy_images_never_nan():
    tiny = np.full((64, 64, 3), 245, dtype=np.uint8)
    tiny[30, 30] = (255, 0, 0)  # a single pixel is not an object
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    det_tiny, det_noise = detect(np.stack([tiny, noise]))
    assert not det_tiny.found and det_tiny.shape is None
    for det in (det_tiny, det_noise):
        values = [det.size, det.brightness, det.centered]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)


def test_detection_features_keys():
    det = Detection("circle", "red", "white", 0.25, 0.5, 0.75)
    feats = det.features()
    assert tuple(feats) == FEATURE_KEYS
    assert feats["shape:circle"] == feats["color:red"] == feats["background:white"] == 1.0
    assert sum(feats.values()) == pytest.approx(3 + 0.25 + 0.5 + 0.75)


# --- captions ----------------------------------------------------------------------------------


def test_caption_parse_round_trip():
    for shape in (None, *SHAPES):
        for color in (None, *COLORS):
            for background in (None, *BACKGROUNDS):
                named = {k: v for k, v in (("shape", shape), ("color", color), ("background", background)) if v}
                assert parse_caption(caption_for(shape, color, background)) == named


# --- users ---------------------------------------------------------------------------------------


def test_users_json_round_trip(tmp_path):
    users = random_users(5, np.random.default_rng(3)) + list(EXAMPLE_USERS.values())
    path = tmp_path / "sub" / "users.json"
    save_users(users, path)
    assert load_users(path) == users
    assert json.loads(path.read_text())[0]["user_id"] == "u0"


def test_random_users_shape():
    users = random_users(20, np.random.default_rng(0), prefix="sim")
    assert [u.user_id for u in users] == [f"sim{i}" for i in range(20)]
    for u in users:
        assert 2 <= len(u.weights) <= 4
        values = list(u.weights.values())
        assert min(values) < 0 < max(values) and all(v != 0 for v in values)
        assert set(u.weights) <= set(FEATURE_KEYS)


@pytest.mark.parametrize("bad_key", ["color:pink", "shape", "sizes", "background:red", "hue:red"])
def test_user_bad_key_error_names_key_and_valid_ones(bad_key):
    with pytest.raises(ValueError) as err:
        WorldUser("u", {bad_key: 1.0})
    assert repr(bad_key) in str(err.value) and "color:red" in str(err.value) and "centered" in str(err.value)


def test_load_users_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_users(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"user_id": "u0", "weights": {"colour:red": 1.0}}]))
    with pytest.raises(ValueError, match=r"bad\.json.*colour:red"):
        load_users(bad)


def test_oracle_reward_matches_hand_computation():
    user = WorldUser("u1", {"color:red": 1.0, "size": -0.5, "background:black": 0.3})
    det = Detection("square", "red", "black", 0.4, 0.9, 0.2)
    assert oracle_reward(user, det) == pytest.approx(1.0 - 0.5 * 0.4 + 0.3)
    other = Detection("square", "blue", "white", 0.8, 0.1, 1.0)
    np.testing.assert_allclose(oracle_reward(user, [det, other]), [1.1, -0.4])
    assert oracle_reward(user, {"size": 1.0, "color:red": 1.0}) == pytest.approx(0.5)
    red_large = EXAMPLE_USERS["red_large"]
    assert oracle_reward(red_large, det) == pytest.approx(1.4)
    assert oracle_reward(EXAMPLE_USERS["dark_small"], det) == pytest.approx(0.6)


def test_oracle_reward_on_detected_images():
    big_red = render(WorldAttributes("circle", "red", "white", 1.0, 1.0, 1.0))
    small_blue = render(WorldAttributes("circle", "blue", "black", 0.0, 1.0, 1.0))
    r = oracle_reward(EXAMPLE_USERS["red_large"], detect([big_red, small_blue]))
    assert r[0] == pytest.approx(2.0, abs=0.05) and r[1] == pytest.approx(0.0, abs=0.05)


def test_bradley_terry_frequencies_match_sigmoid():
    user = WorldUser("s", {"size": 1.0})
    rng = np.random.default_rng(11)
    temperature, n = 0.8, 4000
    for diff in (-2.0, -0.5, 0.0, 0.7, 1.5):
        f0, f1 = {"size": 0.5 + diff / 2}, {"size": 0.5 - diff / 2}
        labels = bradley_terry_choice(user, [f0] * n, [f1] * n, temperature, rng)
        expected = 1.0 / (1.0 + math.exp(-diff / temperature))
        assert bradley_terry_probability(user, f0, f1, temperature) == pytest.approx(expected)
        # 4 binomial standard deviations (<= 0.032 at n=4000).
        assert abs(labels.mean() - expected) < 4 * math.sqrt(0.25 / n), (diff, labels.mean(), expected)
    single = bradley_terry_choice(user, {"size": 1.0}, {"size": 0.0}, 1.0, rng)
    assert single in (0.0, 1.0)


def test_bradley_terry_temperature_zero_is_deterministic():
    user = EXAMPLE_USERS["red_large"]
    better = Detection("star", "red", "gray", 0.9, 0.5, 0.5)
    worse = Detection("star", "blue", "gray", 0.9, 0.5, 0.5)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert bradley_terry_choice(user, better, worse, 0.0, rng) == 1.0
        assert bradley_terry_choice(user, worse, better, 0.0, rng) == 0.0
    assert bradley_terry_choice(user, better, better, 0.0) == 0.5
    with pytest.raises(ValueError):
        bradley_terry_choice(user, better, worse, 1.0, None)


def test_taste_users_have_few_clear_tastes_and_hold_out_combinations():
    from diffpref.world.users import TASTE_FAMILIES, taste_users

    train = taste_users(48, np.random.default_rng(0), prefix="t")
    again = taste_users(48, np.random.default_rng(0), prefix="t")
    assert [u.weights for u in train] == [u.weights for u in again]  # deterministic by seed
    family_of = {key: fam for fam, keys in TASTE_FAMILIES.items() for key in keys}
    for user in train:
        families = [family_of[k] for k in user.weights]
        assert 1 <= len(families) <= 2 and len(set(families)) == len(families)  # one value per family
        for key, w in user.weights.items():
            assert 1.0 <= abs(w) <= 2.0
            if len(TASTE_FAMILIES[family_of[key]]) > 1:
                assert w > 0  # categorical tastes are likes
    held_out = taste_users(30, np.random.default_rng(1), families_per_user=(2, 2), exclude=train)
    seen = {frozenset(u.weights) for u in train}
    assert all(len(u.weights) == 2 and frozenset(u.weights) not in seen for u in held_out)
    with pytest.raises(ValueError, match="families_per_user"):
        taste_users(1, np.random.default_rng(0), families_per_user=(0, 2))


def test_make_users_cli_writes_loadable_users(tmp_path):
    from diffpref.cli import main
    from diffpref.world.users import load_users

    train, unseen = tmp_path / "train.json", tmp_path / "unseen.json"
    assert main(["world", "make-users", "--out", str(train), "--n", "10", "--seed", "3"]) == 0
    assert main(["world", "make-users", "--out", str(unseen), "--n", "4", "--families", "2,2",
                 "--exclude", str(train), "--prefix", "new"]) == 0
    assert [u.user_id for u in load_users(unseen)] == ["new0", "new1", "new2", "new3"]
    assert len(load_users(train)) == 10
