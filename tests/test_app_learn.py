"""``diffpref app --learn`` and the warm pool: held-out split, the never-worse gate, the implicit-reward judge."""

import sqlite3
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_app import adapter_dir  # noqa: F401  (module-scoped fixture shared with test_app)


def _service(tmp_path, **config):
    from diffpref.app.config import AppConfig
    from diffpref.app.service import RatingService

    pipe = SimpleNamespace(set_progress_bar_config=lambda **kw: None)
    cfg = AppConfig(db=str(tmp_path / "r.db"), pair_images="render", pair_mode="random", **config)
    return RatingService(cfg, pipe=pipe, start_worker=False)


def test_held_out_ratings_are_fixed_and_never_in_the_training_copy(tmp_path):
    from diffpref.app.learn import held_out, snapshot

    service = _service(tmp_path)
    try:
        for user in ("ann", "bob"):
            service.login(user)
            for k in range(20):
                pair = service.next_pair(user)
                service.rate(user, pair["pair_id"], ("left", "right", "tie")[k % 3])
        split = snapshot(service.store.path, tmp_path / "copy" / "ratings.db", 0.25)
    finally:
        service.close()
    out = {r["rating_id"] for rows in split.values() for r in rows}
    assert 0 < len(out) < 28 and all(held_out(r, 0.25) for r in out)
    assert all(r["label"] in (0.0, 1.0) for rows in split.values() for r in rows)  # ties say nothing to judge
    with sqlite3.connect(tmp_path / "copy" / "ratings.db") as conn:
        kept = {row[0] for row in conn.execute("SELECT rating_id FROM ratings")}
    conn.close()
    assert len(kept) + len(out) == 40 and not kept & out
    assert [held_out(r, 0.25) for r in range(50)] == [held_out(r, 0.25) for r in range(50)]  # same every round


@pytest.mark.parametrize("new_acc, served", [(0.5, False), (0.75, True)])
def test_a_round_serves_the_new_adapter_only_if_it_is_not_worse(tmp_path, monkeypatch, new_acc, served):
    from diffpref.app import learn

    service = _service(tmp_path, learn_dir=str(tmp_path / "learned"))
    old_pipe = service.pipe
    candidate = SimpleNamespace(set_progress_bar_config=lambda **kw: None)
    monkeypatch.setattr(learn, "train_round", lambda *a, **k: tmp_path / "round" / "adapter")
    monkeypatch.setattr(learn, "snapshot", lambda db, out, share: {"ann": [{"rating_id": 1, "pair_id": "p", "label": 1.0}]})
    monkeypatch.setattr(learn.Learner, "_train_counts", staticmethod(lambda data: {"ann": 7}))
    monkeypatch.setattr(learn.Learner, "_judged_people", lambda self, held: [([], [])])
    monkeypatch.setattr("diffpref.models.loading.load_pipeline", lambda *a, **k: None)
    monkeypatch.setattr("diffpref.personalize.pipeline.PersonalizedPipeline.from_base", lambda base, adapter: candidate)
    monkeypatch.setattr(learn, "implicit_accuracy", lambda pipe, people: (new_acc if pipe is candidate else 0.6, 8))
    try:
        learner = learn.Learner(service, start_thread=False)
        row = learner.run_round()
        assert row["served"] is served and row["accuracy_served"] == 0.6 and row["held_out"] == 8
        assert (service.pipe is candidate) is served and (service.pipe is old_pipe) is not served
        assert (service.adapter_updated is not None) is served
        assert ("updated" in service.model_info("ann")) is served and learner.trained_on("ann") == (7 if served else 0)
        assert (tmp_path / "learned" / "rounds.jsonl").read_text().count("\n") == 1
    finally:
        service.close()


def test_implicit_accuracy_matches_the_world_evals_ranking_accuracy(tmp_path, tiny_sd15_dir, adapter_dir):  # noqa: F811
    """The app's held-out judge and ``ppd_eval.ranking_accuracy`` (an independent implementation of the same
    Diffusion-DPO implicit reward, eq. 14 of Wallace et al. 2023) agree on the same draws."""
    from diffpref.app.learn import implicit_accuracy
    from diffpref.experiments.ppd_eval import ranking_accuracy
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.backbones import UserExample
    from diffpref.personalize.encoder import embed_user
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.world.render import render, sample_attributes

    pipe = PersonalizedPipeline.from_base(load_pipeline(str(tiny_sd15_dir)), str(adapter_dir))
    rng = np.random.default_rng(0)
    shapes = [np.asarray(render(sample_attributes(rng, color=c))) for c in ("red", "blue") * 6]
    examples = [UserExample("a shape", shapes[0], shapes[1]), UserExample("a shape", shapes[2], shapes[3])]
    held = [("a shape", shapes[k], shapes[k + 1]) for k in range(4, 12, 2)]
    ours, n = implicit_accuracy(pipe, [(examples, held)], draws=3, seed=5)
    with torch.no_grad():
        tokens = embed_user(pipe.user_encoder, pipe.backbone, examples).cpu()
    theirs = ranking_accuracy(pipe, tokens, [(c, a, b, 1.0) for c, a, b in held], draws=3, seed=5)
    assert n == 4 and ours == theirs
    swapped, _ = implicit_accuracy(pipe, [(examples, [(c, b, a) for c, a, b in held])], draws=3, seed=5)
    assert swapped == 1 - ours  # the other image chosen: every margin changes sign


def test_a_warm_pool_gives_a_new_person_a_pair_without_generating(tmp_path):
    service = _service(tmp_path, pool_groups=8, pool_batch=8)
    try:
        service._grow_pool()  # what the idle thread does before anyone comes
        calls = []
        service._candidate_images = lambda *a: calls.append(a) or []
        service.login("new")
        started = time.perf_counter()
        pair = service.next_pair("new")
        assert time.perf_counter() - started < 1.0 and not calls and pair["ratings"] == 0
        for k in range(8):  # 8 prompts x 4 candidates: 16 pairs for each person before the pool runs dry
            service.rate("new", pair["pair_id"], "left")
            assert service.pair_ready("new")
            pair = service.next_pair("new")
        assert not calls
    finally:
        service.close()


def test_a_personal_pair_in_the_making_does_not_hold_up_the_persons_ratings(tmp_path):
    import threading

    service = _service(tmp_path, pool_groups=8, pool_batch=8)
    release, started = threading.Event(), threading.Event()

    def slow_personal_images(user_id, prompt, rng):  # stands in for a generation with the person's model
        started.set()
        release.wait(10)
        return [(None, None, np.zeros((64, 64, 3), np.uint8), None, "model+ppd", 1, prompt)]

    service._personal_candidates = slow_personal_images
    try:
        service._grow_pool()
        service.login("ann")
        worker = threading.Thread(target=service._make_personal_pair, args=("ann",))
        worker.start()
        assert started.wait(10)
        t0 = time.perf_counter()
        assert service.top_up("ann") == service.config.queue_size  # not blocked by the generation
        assert time.perf_counter() - t0 < 5 and worker.is_alive()
        release.set()
        worker.join(10)
        assert len(service.store.pending_pairs("ann")) == service.config.queue_size + 1
    finally:
        release.set()
        service.close()


def test_best_of_shows_the_taste_models_first_choice_and_records_every_seed(tmp_path, tiny_sd15_dir, adapter_dir):  # noqa: F811
    """``--best-of N``: the shown image is the argmax of the recorded scores (w . CLIP embedding of the
    person's taste posterior) and comes back from its recorded seed; N = 1 is plain generation."""
    from diffpref.app.config import AppConfig
    from diffpref.app.service import RatingService

    cfg = AppConfig(model=str(tiny_sd15_dir), adapter=str(adapter_dir), db=str(tmp_path / "r.db"), steps=1,
                    profile="world", pair_images="render", pair_mode="random", best_of=3)
    service = RatingService(cfg, start_worker=False)
    try:
        service.login("ann")
        for choice in ("left", "right"):
            service.rate("ann", service.next_pair("ann")["pair_id"], choice)
        out = service.generate("ann", "a red star", 5, 1.0)
        record = out["best_of"]
        assert record["seeds"] == [5, 6, 7] and len(record["scores"]) == 3
        assert record["chosen"] == int(np.argmax(record["scores"])) and record["seed"] == record["seeds"][record["chosen"]]
        tokens = service.user_tokens("ann")
        again = service._generate(["a red star"], [record["seed"]], tokens, 1.0)[0]
        # alone rather than in a batch of 3: allow 8-bit rounding
        assert np.abs(again.astype(int) - np.asarray(out["personalized"]).astype(int)).max() <= 2
        weights = service.posterior("ann").mean
        scores = [float((service._embed([img]) @ weights)[0])
                  for img in service._generate(["a red star"] * 3, record["seeds"], tokens, 1.0)]
        assert np.allclose(scores, record["scores"], rtol=1e-3, atol=1e-4)
        service.config.best_of = 1
        plain = service.generate("ann", "a red star", 5, 1.0)
        assert plain["best_of"] is None
        assert np.array_equal(np.asarray(plain["personalized"]), service._generate(["a red star"], [5], tokens, 1.0)[0])
    finally:
        service.close()
