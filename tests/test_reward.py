"""The few-shot user reward model (diffpref.personalize.reward) and personalized best-of-N."""

import numpy as np
import pytest
import torch

from diffpref.personalize.backbones import UserExample
from diffpref.personalize.reward import (
    PrototypeRewardModel,
    embedded_reward_path,
    mixture_map,
    mixture_posterior_mean,
    train_reward_model,
)
from diffpref.world.render import WorldAttributes, render


def _image(color, shape="circle", background="white", size=0.5, brightness=0.6):
    return np.asarray(render(WorldAttributes(shape, color, background, size, brightness, 0.8)))


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_posterior_mean_matches_quadrature_on_two_prototypes(alpha):
    """Two prototypes: w = (t, 1 - t), t ~ Beta(alpha, alpha); E[t | choices] by 1-d quadrature."""
    diffs = np.array([[1.5, -0.5], [0.8, 0.3], [-0.2, 0.4]])
    scale = 2.0

    def likelihood(t):  # Bradley-Terry likelihood of the choices at w = (t, 1 - t), vectorised over t
        z = scale * (np.outer(t, diffs[:, 0]) + np.outer(1 - t, diffs[:, 1]))
        return np.prod(1 / (1 + np.exp(-z)), axis=1)

    def beta_integral(f):  # int_0^1 t^(a-1) (1-t)^(a-1) f(t) dt; t = u^(1/a) on each half removes the end singularity
        u = np.linspace(0.0, 0.5 ** alpha, 400_001)
        t = u ** (1 / alpha)
        half = lambda g: np.trapezoid((1 - t) ** (alpha - 1) * g(t), u) / alpha  # noqa: E731
        return half(f) + half(lambda s: f(1 - s))

    mass = beta_integral(likelihood)
    expected = beta_integral(lambda t: t * likelihood(t)) / mass
    estimate = mixture_posterior_mean(diffs, alpha, scale=scale, samples=400_000, seed=1)
    assert estimate.sum() == pytest.approx(1.0)
    assert estimate[0] == pytest.approx(expected, abs=3e-3)
    # the evidence favours prototype 0, so the posterior moves off the prior mean 0.5 towards it
    assert expected > 0.55


def test_map_mixture_follows_the_evidence_and_no_choice_is_the_prior_mean():
    diffs = np.array([[2.0, -1.0, 0.0]] * 4)
    w = mixture_map(diffs, scale=1.0)
    assert w.argmax() == 0 and w.sum() == pytest.approx(1.0)
    assert np.allclose(mixture_posterior_mean(np.zeros((0, 3)), 0.3), 1 / 3)


def test_training_recovers_tastes_on_known_features():
    """Embeddings = the true features: the model must rank held-out pairs of new mixtures of the tastes."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 2, 6)).astype(np.float32)
    tastes = np.eye(6)[:3] * 3.0  # three people, each caring about one feature
    labels = np.stack([((feats[:, 0] - feats[:, 1]) @ t > 0).astype(np.float32) for t in tastes])
    model, mixtures = train_reward_model(feats, labels, num_prototypes=3, feature_dim=6, hidden=16, steps=300,
                                         lr=1e-2, progress=False)
    proto = model.prototype_rewards_np(feats)
    for u, t in enumerate(tastes):
        margin = (proto[:, 0] - proto[:, 1]) @ mixtures[u]
        truth = (feats[:, 0] - feats[:, 1]) @ t
        assert np.mean((margin > 0) == (truth > 0)) > 0.9


@pytest.fixture(scope="module")
def shipped():
    return PrototypeRewardModel.from_pretrained("embedded-reward")


def test_shipped_reward_model_loads_offline_and_round_trips(shipped, tmp_path):
    assert (embedded_reward_path() / "reward.safetensors").stat().st_size < 5_000_000
    shipped.save_pretrained(tmp_path / "copy")
    again = PrototypeRewardModel.from_pretrained(tmp_path / "copy")
    x = np.random.default_rng(0).normal(size=(5, shipped.config["embed_dim"]))
    assert np.array_equal(again.prototype_rewards_np(x), shipped.prototype_rewards_np(x))
    with pytest.raises(FileNotFoundError, match="not a reward model folder"):
        PrototypeRewardModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("estimator", ["posterior", "map"])
def test_reward_orders_a_clear_preference_the_right_way(shipped, estimator):
    """Four choices of red over other colours: red scores higher on new images; the flipped choices flip it."""
    others = ["blue", "green", "purple", "yellow"]
    shapes = ["circle", "square", "star", "triangle"]
    likes_red = [UserExample("a shape", _image("red", s), _image(c, s)) for c, s in zip(others, shapes)]
    dislikes_red = [UserExample(e.prompt, e.rejected, e.preferred) for e in likes_red]
    tests = [(_image("red", s, bg, size), _image(c, s, bg, size))
             for s, bg, size, c in [("square", "gray", 0.3, "blue"), ("star", "beige", 0.7, "green"),
                                    ("circle", "black", 0.5, "orange"), ("triangle", "white", 0.6, "purple")]]
    red, other = np.stack([a for a, _ in tests]), np.stack([b for _, b in tests])
    for examples, sign in ((likes_red, 1), (dislikes_red, -1)):
        reward = shipped.person(examples, estimator=estimator)
        assert np.all(sign * (reward.score(red) - reward.score(other)) > 0)


@pytest.fixture(scope="module")
def world_pipe():
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), "embedded-ppd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Brightness:
    """A stand-in reward with an independent, obvious order: mean pixel value."""

    def score(self, images, prompts=None):
        return np.asarray(images, dtype=np.float64).reshape(len(images), -1).mean(1)


def test_best_of_one_is_plain_generation_bit_for_bit(world_pipe):
    from diffpref.generate import generate_images

    prompts, seeds = ["a red star", "a shape on a black background"], [5, 77]
    plain = generate_images(world_pipe, prompts, seeds, 4, 7.5)
    out = world_pipe(prompts, seed=seeds, best_of=1, reward=_Brightness(), num_inference_steps=4, guidance_scale=7.5,
                     output_type="np")
    assert np.array_equal((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8), plain)
    assert [r["seeds"] for r in out.candidates] == [[5], [77]]


def test_chosen_image_is_the_argmax_of_the_recorded_scores_and_regenerates(world_pipe):
    from diffpref.generate import generate_images

    prompts = ["a circle", "a green shape"]
    out = world_pipe(prompts, seed=[3, 40], best_of=4, reward=_Brightness(), num_inference_steps=4,
                     guidance_scale=7.5, output_type="np")
    shown = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    for i, record in enumerate(out.candidates):
        assert record["seeds"] == [record["seeds"][0] + j for j in range(4)]
        assert record["chosen"] == int(np.argmax(record["scores"])) and record["score"] == max(record["scores"])
        again = generate_images(world_pipe, [prompts[i]], [record["seed"]], 4, 7.5)[0]
        # the shown image comes back from its recorded seed (alone, not in a batch of 8: allow 8-bit rounding)
        assert np.abs(again.astype(int) - shown[i].astype(int)).max() <= 2
        assert record["score"] == pytest.approx(_Brightness().score(shown[i:i + 1])[0])


def test_best_of_reads_the_reward_from_user_examples_and_refuses_bad_input(world_pipe):
    examples = [UserExample("a shape", _image("red"), _image("blue"))]
    out = world_pipe("a shape", seed=1, best_of=2, user_examples=examples, num_inference_steps=3, output_type="np")
    assert len(out.candidates[0]["scores"]) == 2
    with pytest.raises(ValueError, match="needs reward="):
        world_pipe("a shape", seed=1, best_of=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="seed="):
        world_pipe("a shape", best_of=2, reward=_Brightness(), generator=torch.Generator(), num_inference_steps=2)
    with pytest.raises(ValueError, match="best_of must be"):
        world_pipe("a shape", seed=1, best_of=0, reward=_Brightness(), num_inference_steps=2)


def test_world_eval_best_of_cli(tmp_path, capsys):
    import json

    from diffpref.cli import main

    users = tmp_path / "users.json"
    users.write_text(json.dumps([{"user_id": "r", "weights": {"color:red": 1.0, "size": 0.5}}]))
    assert main(["world", "eval", "--users", str(users), "--best-of", "1,2", "--shots", "1", "--prompts", "4",
                 "--steps", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    one, two = result["best_of"]["1"], result["best_of"]["2"]
    # best-of-1 shows the base image itself: every comparison is a tie
    assert one["win_rate_vs_base"] == 0.5 and one["adherence"] == result["base_adherence"]
    assert (one["images_per_shown_image"], two["images_per_shown_image"]) == (1, 2)
    assert two["seconds_per_shown_image"] > one["seconds_per_shown_image"] > 0
    # picking by the true oracle bounds picking by the few-shot reward
    assert two["oracle_reranked_win_rate"] >= two["win_rate_vs_base"]


def test_policy_pairs_labelled_by_the_few_shot_reward(tmp_path):
    """`world policy-pairs --labeller reward`: labels from each user's reward, agreement with the oracle recorded."""
    import pyarrow.parquet as pq

    from diffpref.experiments.make_data import make_preference_data
    from diffpref.experiments.policy_pairs import make_policy_pairs
    from diffpref.models.loading import load_pipeline
    from diffpref.world.users import WorldUser

    users = [WorldUser("red_bright", {"color:red": 1.5, "brightness": 1.0}), WorldUser("small", {"size": -1.0})]
    base = load_pipeline("embedded")
    base.set_progress_bar_config(disable=True)
    offline = make_preference_data(tmp_path / "offline", users, model=base, pairs_per_user=6, seed=1, temperature=0.0,
                                   steps=3, batch_size=12, progress=False)
    kw = {"captions_per_user": 4, "contexts_per_user": 2, "shots": 2, "steps": 3, "batch_size": 8, "temperature": 0.0,
          "progress": False}
    oracle = make_policy_pairs(offline["parquet"], "embedded-ppd", tmp_path / "oracle", **kw)
    reward = make_policy_pairs(offline["parquet"], "embedded-ppd", tmp_path / "reward", labeller="reward", **kw)
    assert oracle["agreement_with_oracle"] == 1.0  # temperature 0: the oracle labeller is the oracle
    rows = pq.read_table(reward["parquet"]).to_pylist()
    assert reward["labeller"] == "reward" and len(rows) == reward["pairs"] > 0
    decided = [r for r in rows if r["reward_0"] != r["reward_1"]]
    agree = np.mean([r["label_0"] == float(r["reward_0"] > r["reward_1"]) for r in decided])
    assert reward["agreement_with_oracle"] == pytest.approx(agree)
    assert reward["oracle_ties_kept"] == len(rows) - len(decided)
    with pytest.raises(ValueError, match="labeller"):
        make_policy_pairs(offline["parquet"], "embedded-ppd", tmp_path / "x", labeller="human", **kw)
