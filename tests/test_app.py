"""The rating app: pair selection, the service, and the Gradio server driven through gradio_client."""

import json
import os
import time

import numpy as np
import pytest
import torch

from diffpref.app.pairs import all_pairs, bald_scores, fit_posterior, prior, select_pair

# ----------------------------------------------------------------------------- pair selection


def _simulate(mode: str, seed: int, dim: int = 8, candidates: int = 6, rounds: int = 30) -> float:
    """Cosine between the learned and the true weights of a simulated Bradley-Terry person."""
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(dim)
    w_true *= 3 / np.linalg.norm(w_true)
    diffs, labels, posterior = [], [], None
    for _ in range(rounds):
        features = rng.standard_normal((candidates, dim)) * 0.5
        choice = select_pair(features, posterior, rng, mode)
        diff = features[choice.first] - features[choice.second]
        diffs.append(diff)
        labels.append(float(rng.random() < 1 / (1 + np.exp(-diff @ w_true))))
        posterior = fit_posterior(np.array(diffs), np.array(labels))
    return float(posterior.mean @ w_true / np.linalg.norm(posterior.mean) / np.linalg.norm(w_true))


def test_posterior_recovers_a_simulated_taste():
    rng = np.random.default_rng(0)
    w_true = np.array([2.0, -1.0, 0.0, 0.5])
    x = rng.standard_normal((400, 4))
    y = (rng.random(400) < 1 / (1 + np.exp(-x @ w_true))).astype(float)
    post = fit_posterior(x, y)
    assert np.allclose(post.mean, w_true, atol=0.35)
    # The Laplace covariance shrinks with data: prior samples spread far more than posterior ones.
    assert post.sample(rng, 500).std(0).max() < 0.3 < prior(4).sample(rng, 500).std(0).min()
    assert fit_posterior(np.zeros((0, 3)), np.zeros(0)).num_ratings == 0
    with pytest.raises(ValueError, match="labels"):
        fit_posterior(x[:2], np.array([1.0, 2.0]))


def test_ties_pull_towards_indifference():
    x = np.tile([[1.0, 0.0]], (20, 1))
    assert abs(fit_posterior(x, np.full(20, 0.5)).mean[0]) < 1e-6
    assert fit_posterior(x, np.ones(20)).mean[0] > 1.0


def test_active_selection_ignores_near_duplicates_and_asks_about_the_unknown():
    rng = np.random.default_rng(0)
    # Dimension 0 is settled by many ratings; dimension 1 was never asked about.
    x = np.concatenate([np.tile([[1.0, 0.0]], (50, 1)), np.tile([[-1.0, 0.0]], (50, 1))])
    post = fit_posterior(x, np.concatenate([np.ones(50), np.zeros(50)]))
    features = np.array([[0.0, 0.0], [0.0, 0.001], [1.0, 0.0], [0.0, 1.0]])
    pairs = [(0, 1), (0, 2), (0, 3)]  # near-duplicate / known dimension / unknown dimension
    scores = bald_scores(np.stack([features[i] - features[j] for i, j in pairs]), post.sample(rng, 256))
    assert scores[0] < 0.01 and scores[2] > scores[1]
    assert (select_pair(features, post, rng, "active", pairs=pairs).first,
            select_pair(features, post, rng, "active", pairs=pairs).second) == (0, 3)


def test_active_learns_the_taste_faster_than_random():
    active = np.mean([_simulate("active", s) for s in range(12)])
    random = np.mean([_simulate("random", s) for s in range(12)])
    assert active > random


def test_random_mode_and_bad_inputs():
    rng = np.random.default_rng(0)
    picks = {(c.first, c.second) for c in (select_pair(np.eye(4), None, rng, "random") for _ in range(200))}
    assert picks == set(all_pairs(4))
    with pytest.raises(ValueError, match="valid modes are active, random"):
        select_pair(np.eye(3), None, rng, "greedy")
    with pytest.raises(ValueError, match="at least 2"):
        select_pair(np.eye(3)[:1], None, rng)
    with pytest.raises(ValueError, match="dimension"):
        select_pair(np.eye(3), prior(5), rng)


# ----------------------------------------------------------------------------- profiles


def test_world_profile_reads_the_attribute_shift():
    from diffpref.app.profile import world_profile
    from diffpref.world.render import render, sample_attributes

    rng = np.random.default_rng(0)
    base = np.stack([np.asarray(render(sample_attributes(rng, color="blue"))) for _ in range(6)])
    pers = np.stack([np.asarray(render(sample_attributes(rng, color="red"))) for _ in range(6)])
    result = world_profile(base, pers, top=2)
    assert {(row["attribute"], row["weight"]) for row in result["attributes"]} == {("color:red", 1.0), ("color:blue", -1.0)}
    assert result["objects_found"] == {"base": 1.0, "personalized": 1.0}
    with pytest.raises(ValueError, match="equally many"):
        world_profile(base, pers[:2])


def test_clip_profile_scores_text_probes():
    from diffpref.app.profile import clip_profile

    class Backbone:  # "dark" and "bright" are two axes; an image sits between them by its brightness
        def embed_texts(self, texts):
            return torch.tensor([[1.0, 0.0] if t == "dark" else [0.0, 1.0] for t in texts])

        def embed_images(self, images):
            m = torch.tensor([float(np.mean(im)) / 255 for im in images])
            return torch.nn.functional.normalize(torch.stack([1 - m, m], 1), dim=1)

    dark, bright = np.full((2, 8, 8, 3), 20, np.uint8), np.full((2, 8, 8, 3), 230, np.uint8)
    result = clip_profile(Backbone(), list(dark), list(bright), probes=("dark", "bright"))
    weights = {row["attribute"]: row["weight"] for row in result["attributes"]}
    assert weights["bright"] > 0.5 > -0.5 > weights["dark"]


# ----------------------------------------------------------------------------- passwords and validation


def test_auth_file_hashes_passwords_and_checks_them(tmp_path):
    from diffpref.app.server import hash_password, load_auth_file, make_auth

    path = tmp_path / "users.json"
    path.write_text(json.dumps({"alice": "wonderland", "bob": hash_password("builder")}))
    users = load_auth_file(path)
    assert all(v.startswith("scrypt$") and "wonderland" not in v for v in users.values())
    check = make_auth(users)
    assert check("alice", "wonderland") and check("bob", "builder")
    assert not check("alice", "builder") and not check("carol", "") and not check("bob", "")
    path.write_text(json.dumps({"../evil": "x"}))
    with pytest.raises(ValueError, match="invalid user name"):
        load_auth_file(path)


def test_input_validation():
    from diffpref.app.config import AppConfig
    from diffpref.app.service import check_choice, check_prompt, check_scale, check_seed

    assert check_prompt("  a red\nstar ") == "a red star"
    for bad in ("", "x" * 301, "a\x00b", 3):
        with pytest.raises(ValueError):
            check_prompt(bad)
    assert check_seed(5.0) == 5
    for bad in (-1, 2**31, 1.5, True, "3"):
        with pytest.raises(ValueError):
            check_seed(bad)
    for bad in (-0.1, 2.5, float("nan"), "1"):
        with pytest.raises(ValueError):
            check_scale(bad)
    with pytest.raises(ValueError, match="valid choices"):
        check_choice("up")
    with pytest.raises(ValueError, match="pair_mode"):
        AppConfig(pair_mode="greedy")


def test_active_pairs_come_from_one_pooled_prompt_and_are_the_most_informative(tmp_path):
    """Pairs come from the shared candidate pool: the pair shown is the within-prompt pair that differs most
    (BALD is ~0 for near-duplicates), stored with its own prompt; nobody sees an image twice, others still may."""
    from types import SimpleNamespace

    from diffpref.app.config import AppConfig
    from diffpref.app.service import RatingService, from_png

    service = RatingService(AppConfig(db=str(tmp_path / "r.db"), pair_images="render", candidates=3,
                                      candidate_prompts=2, pool_groups=4, pool_batch=4, seed=1),
                            pipe=SimpleNamespace(set_progress_bar_config=lambda **kw: None), start_worker=False)
    spread = {}

    def embed(images):  # group g: images at -a_g, 0, +a_g on one axis (a_g differs per group), the rest noise
        features = np.random.default_rng(len(spread)).normal(0, 1e-4, (len(images), 8))
        for g in range(len(images) // 3):
            spread[len(spread)] = a = 0.1 * (g + 1)
            features[3 * g:3 * g + 3, 0] += [-a, 0.0, a]
        return features

    service._embed = embed
    try:
        service.login("ann")
        service.login("bob")
        shown = {}
        for user in ("ann", "ann", "bob"):
            if user == "bob":  # what ann saw is gone for her, not for bob
                assert (service.pool.available("ann"), service.pool.available("bob")) == (2, 4)
            pair = service.store.get_pair(user, service._make_pair(user))
            images = [np.asarray(from_png(service.store.get_image(user, pair[k]))) for k in ("image_0", "image_1")]
            at = [(g, k) for g in service.pool._groups for k, im in enumerate(g.images)
                  if any(np.array_equal(im, s) for s in images)]
            assert len(at) == 2 and at[0][0] is at[1][0], "both images come from one pooled prompt"
            assert sorted(k for _, k in at) == [0, 2] and pair["prompt"] == at[0][0].prompt  # the extremes
            shown.setdefault(user, []).append(at[0][0].group_id)
        assert len(service.pool) == 4  # grown once, for everyone
        group = next(g for g in service.pool._groups if g.group_id == shown["ann"][0])
        assert group.unused("ann") == [1] and shown["ann"][0] != shown["ann"][1]
    finally:
        service.close()
    with pytest.raises(ValueError, match="candidate_prompts"):
        AppConfig(candidate_prompts=0)
    with pytest.raises(ValueError, match="pool_groups"):
        AppConfig(pool_groups=3)


# ----------------------------------------------------------------------------- the app end to end


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_sd15_dir):
    """A 3-step PPD adapter on the tiny SD1.5 pipeline with a random world CLIP (as in test_ppd.py)."""
    from diffpref.launch import build_parts
    from diffpref.models.world_clip import build_world_clip, save_world_clip
    from diffpref.training.config import TrainConfig
    from diffpref.training.trainer import train
    from diffpref.world.render import render, sample_attributes

    root = tmp_path_factory.mktemp("app_ppd")
    torch.manual_seed(0)
    clip_dir = save_world_clip(build_world_clip(), root / "world-clip")
    rng = np.random.default_rng(0)
    lines = []
    for u, (liked, other) in enumerate([("red", "blue"), ("blue", "green")]):
        for i in range(3):
            render(sample_attributes(rng, color=liked)).save(root / f"{u}_{i}_a.png")
            render(sample_attributes(rng, color=other)).save(root / f"{u}_{i}_b.png")
            lines.append({"prompt": "a shape", "image_0": f"{u}_{i}_a.png", "image_1": f"{u}_{i}_b.png",
                          "label": 1.0, "user_id": f"user{u}"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = TrainConfig(method="ppd", model=str(tiny_sd15_dir), data_path=str(root / "pairs.jsonl"),
                      output_dir=str(root / "out"), max_train_steps=3, train_batch_size=4, learning_rate=1e-2,
                      lora_rank=0, checkpointing_steps=10, report_to="none", cache_dir=str(root / "cache"),
                      ppd_backbone=str(clip_dir), ppd_num_tokens=2, ppd_shots_max=3, ppd_hidden=16, threads=1)
    train(cfg, *build_parts(cfg))
    return root / "out"


def _start(tmp_path, tiny_sd15_dir, adapter_dir, auth_file=None, pipe=None, **config):
    from diffpref.app.config import AppConfig
    from diffpref.app.server import launch_app
    from diffpref.app.service import RatingService

    started = time.perf_counter()
    cfg = AppConfig(model=str(tiny_sd15_dir), adapter=str(adapter_dir), db=str(tmp_path / "ratings.db"), steps=1,
                    profile="world", candidates=3, profile_seeds=2, **config)
    service = RatingService(cfg, pipe=pipe)
    demo, url = launch_app(service, "127.0.0.1", None, auth_file, prevent_thread_lock=True, quiet=True)
    return service, demo, url, time.perf_counter() - started


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_sd15_dir, adapter_dir):
    service, demo, url, seconds = _start(tmp_path_factory.mktemp("app"), tiny_sd15_dir, adapter_dir)
    print(f"\napp start (tiny model, load + launch): {seconds:.2f} s")
    yield service, url, seconds
    demo.close()
    service.close()


def _client(url, **kw):
    from gradio_client import Client

    return Client(url, verbose=False, **kw)


def test_app_starts_and_lists_the_api(app):
    service, url, seconds = app  # start time and pair latency targets: bench/app.py
    api = _client(url).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/next_pair", "/rate", "/generate", "/profile"} <= set(api)
    assert not any(name.startswith("/ui_") for name in api)  # UI handlers are private


def test_rate_then_profile_then_generate(app, capfd):
    from diffpref.app.server import decode_image

    service, url, _ = app
    client = _client(url)
    pair = client.predict("alice", api_name="/next_pair")
    assert len(pair["pair_id"]) == 32 and pair["prompt"] and pair["ratings"] == 0
    assert decode_image(pair["left"]).size == decode_image(pair["right"]).size
    assert client.predict("alice", api_name="/profile")["attributes"] == []
    base_only = client.predict("alice", "a red star", 3, 1.0, api_name="/generate")
    assert base_only["personalized"] is None and base_only["base"].startswith("data:image/png;base64,")

    service.fill_queue("alice")  # what the background thread does between ratings
    # Time from a rating to the next pair on screen: the rating is stored, the next pair is already made.
    t0 = time.perf_counter()
    rated = client.predict("alice", pair["pair_id"], "left", api_name="/rate")
    nxt = client.predict("alice", api_name="/next_pair")
    latency = time.perf_counter() - t0
    print(f"\nrating -> next pair: {latency * 1000:.0f} ms")
    assert rated["created"] and rated["label"] == 1.0 and rated["ratings"] == 1
    again = client.predict("alice", pair["pair_id"], "left", api_name="/rate")  # a retry changes nothing
    assert not again["created"] and again["rating_id"] == rated["rating_id"]
    assert service.store.count_ratings("alice") == 1
    assert nxt["pair_id"] != pair["pair_id"]

    profile = client.predict("alice", api_name="/profile")
    assert profile["method"] == "world-attributes" and profile["decided"] == 1 and len(profile["attributes"]) == 8
    out = client.predict("alice", "a red star", 3, 1.0, api_name="/generate")
    assert out["examples"] == 1 and decode_image(out["personalized"]).size == decode_image(out["base"]).size
    assert out["base"] == base_only["base"]  # same prompt and seed: the same base image
    zero = client.predict("alice", "a red star", 3, 0.0, api_name="/generate")
    assert zero["personalized"] == zero["base"]  # scale 0 is exactly the base model
    # Bad inputs come back as errors, not crashes.
    for args in [("alice", "x" * 400, 0, 1.0), ("alice", "a star", -1, 1.0), ("alice", "a star", 0, 9.0)]:
        with pytest.raises(Exception, match="prompt|seed|scale"):
            client.predict(*args, api_name="/generate")
    with pytest.raises(Exception, match="names are"):
        client.predict("../etc", api_name="/next_pair")
    with pytest.raises(Exception, match="enter your name"):
        client.predict("", api_name="/next_pair")
    logged = capfd.readouterr()
    assert "Traceback" not in logged.out + logged.err  # input errors are answers, not server faults


def test_embedding_follows_the_ratings(app):
    service, url, _ = app
    client = _client(url)
    for choice in ("left", "right"):
        pair = client.predict("dora", api_name="/next_pair")
        client.predict("dora", pair["pair_id"], choice, api_name="/rate")
        first = service.user_tokens("dora")
        assert service.user_tokens("dora") is first  # cached while the ratings stay the same
    pair = client.predict("dora", api_name="/next_pair")
    client.predict("dora", pair["pair_id"], "skip", api_name="/rate")
    assert service.user_tokens("dora") is first  # a skip says nothing about taste


def test_one_person_cannot_touch_another_persons_pairs_or_images(app):
    service, url, _ = app
    client = _client(url)
    pair = client.predict("anna", api_name="/next_pair")
    with pytest.raises(Exception, match="no such pair or image among yours"):
        client.predict("boris", pair["pair_id"], "right", api_name="/rate")
    assert service.store.get_pair("anna", pair["pair_id"])["choice"] is None
    stored = service.store.get_pair("anna", pair["pair_id"])
    from diffpref.app.store import NotFoundError

    for image_id in (stored["image_0"], stored["image_1"]):
        with pytest.raises(PermissionError):
            service.store.get_image("boris", image_id)
    # Anna's generations never show up in Boris's gallery.
    client.predict("anna", pair["pair_id"], "left", api_name="/rate")
    client.predict("anna", "a blue circle", 1, 1.0, api_name="/generate")
    assert service.recent("anna") and not service.recent("boris")
    with pytest.raises(NotFoundError):
        service.store.get_pair("anna", "0" * 32)


def test_auth_mode_takes_the_user_from_the_login(tmp_path, tiny_sd15_dir, adapter_dir, app):
    from gradio_client import Client

    auth = tmp_path / "users.json"
    auth.write_text(json.dumps({"alice": "wonderland", "bob": "builder"}))
    service, demo, url, _ = _start(tmp_path, tiny_sd15_dir, adapter_dir, auth_file=auth, pipe=app[0].pipe,
                                   pair_images="render")
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False)  # no login, no app
        with pytest.raises(Exception):
            Client(url, auth=("alice", "builder"), verbose=False)
        alice = Client(url, auth=("alice", "wonderland"), verbose=False)
        bob = Client(url, auth=("bob", "builder"), verbose=False)
        pair = alice.predict("", api_name="/next_pair")  # the user field may be left empty
        with pytest.raises(Exception, match="logged in as 'bob'"):
            bob.predict("alice", pair["pair_id"], "left", api_name="/rate")
        with pytest.raises(Exception, match="no such pair"):
            bob.predict("", pair["pair_id"], "left", api_name="/rate")
        assert alice.predict("alice", pair["pair_id"], "right", api_name="/rate")["user_id"] == "alice"
        assert service.store.count_ratings("alice") == 1 and service.store.count_ratings("bob") == 0
    finally:
        demo.close()
        service.close()


@pytest.mark.slow
def test_twenty_clients_rating_concurrently_lose_and_duplicate_nothing(tmp_path, tiny_sd15_dir, adapter_dir, app):
    """20 clients x 50 ratings through the API: exactly 1000 ratings, each pair rated once."""
    from diffpref.app.client_load import check_ratings, rate_concurrently

    service, demo, url, _ = _start(tmp_path, tiny_sd15_dir, adapter_dir, pipe=app[0].pipe, pair_images="render",
                                   pair_mode="random")
    try:
        run = rate_concurrently(url, clients=20, per_client=50)
        print(f"\n1000 ratings from 20 concurrent clients in {run['seconds']:.1f} s")
        assert run["error_count"] == 0, run["errors"]
        assert check_ratings(service.store, 20, 50) == {"stored": 1000, "expected": 1000, "people_with_wrong_ratings": []}
    finally:
        demo.close()
        service.close()


def test_cli_app_parser_and_entry_point(monkeypatch):
    from diffpref.app import server
    from diffpref.app.config import AppConfig, config_from_args
    from diffpref.cli import build_parser

    args = build_parser().parse_args(["app", "--db", "x.db", "--pair-mode", "random", "--port", "7999"])
    assert args.db == "x.db" and args.pair_mode == "random" and args.port == 7999 and args.host == "127.0.0.1"
    assert args.model == "embedded" and args.adapter == "embedded-ppd" and args.auth is None
    config = config_from_args(build_parser().parse_args(["app", "--pair-steps", "9", "--candidate-prompts", "3"]))
    assert (config.pair_steps, config.candidates, config.candidate_prompts, config.pair_mode) == (9, 4, 3, "active")
    # Flag defaults are AppConfig's defaults: the two cannot drift apart.
    assert config_from_args(build_parser().parse_args(["app"])) == AppConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["app", "--pair-images", "photo"])  # choices come from the config too

    # `python apps/app.py` (server.main) parses the same flags as `diffpref app`, without the CLI.
    seen = []
    monkeypatch.setattr(server, "run", lambda a: seen.append(a) or 0)
    argv = ["--db", "x.db", "--pair-mode", "random", "--port", "7999", "--steps", "3", "--auth", "a.json"]
    assert server.main(argv) == 0
    assert vars(seen[0]) == {k: v for k, v in vars(build_parser().parse_args(["app", *argv])).items()
                             if k not in ("command", "func")}
    monkeypatch.setattr(server, "run", lambda a: (_ for _ in ()).throw(ValueError("no such adapter")))
    assert server.main([]) == 2  # errors are reported as `diffpref app` reports them
    assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", "apps", "app.py"))