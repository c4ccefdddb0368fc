"""Simulated raters: world users answer the app's pairs by their oracle; how fast does their model improve?

Each rater logs in to a ``RatingService`` (the code behind the app's ``next_pair`` / ``rate``
endpoints), takes the pair it is shown, chooses the image its oracle reward prefers (a tie when
equal), and after every rating the service's current tokens for that person personalize a fixed
set of evaluation captions. Their oracle compares those images with the base model's for the
same captions and seeds (ties count half). Run once with active pair choice and once with
random pairs, the curves say how many ratings each needs.

    python -m diffpref.experiments.simulate --users configs/users/ppd_unseen.json --ratings 10 --out outputs/app_raters.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffpref.app.config import AppConfig
from diffpref.app.pairs import PAIR_MODES
from diffpref.app.service import RatingService, from_png
from diffpref.personalize.backbones import UserExample
from diffpref.world.detector import detect_batch, feature_matrix
from diffpref.world.metrics import win_rate
from diffpref.world.users import WorldUser, load_users, oracle_reward


def oracle_choice(user: WorldUser, left: np.ndarray, right: np.ndarray) -> str:
    """"left", "right" or "tie": what this user's oracle reward says of two images."""
    r_left, r_right = oracle_reward(user, feature_matrix(detect_batch(np.stack([left, right]))))
    return "left" if r_left > r_right else "right" if r_right > r_left else "tie"


def first_reaching(curve: Sequence[float], target: float) -> int | None:
    """1-based number of ratings at which ``curve`` first reaches ``target`` (None if never)."""
    return next((n + 1 for n, value in enumerate(curve) if value >= target), None)


def compare_modes(active: dict[str, Sequence[float]], random: dict[str, Sequence[float]], n_boot: int = 10_000,
                  seed: int = 0) -> dict[str, Any]:
    """Active minus random, per rater averaged over the curve, with a 90 % bootstrap interval over raters.

    The raters are the unit that varies (prompts and seeds are shared by both modes), so they are
    what is resampled. Also the same for active after 5 ratings against random after 8."""
    users = sorted(set(active) & set(random))
    a = np.array([active[u] for u in users], dtype=np.float64)
    r = np.array([random[u] for u in users], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(users), size=(n_boot, len(users)))

    def summary(per_rater: np.ndarray) -> dict[str, Any]:
        boot = per_rater[picks].mean(axis=1)
        return {"mean": round(float(per_rater.mean()), 4),
                "ci90": [round(float(q), 4) for q in np.percentile(boot, [5, 95])]}

    out = {"raters": len(users), "active_minus_random": summary((a - r).mean(axis=1))}
    if a.shape[1] >= 8:
        out["active_at_5_minus_random_at_8"] = summary(a[:, 4] - r[:, 7])
    return out


def simulate_raters(users: Sequence[WorldUser], ratings: int = 10, modes: Sequence[str] = PAIR_MODES,
                    num_prompts: int = 32, seed: int = 0, adapter: str = "embedded-ppd", candidates: int = 4,
                    steps: int = 15, candidate_prompts: int = 2, db_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Win rate against the base after 1..``ratings`` ratings, per pair mode (mean over users)."""
    from diffpref.experiments.ppd_eval import generate_personalized
    from diffpref.experiments.preference_eval import eval_prompts, generate_world_images
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline

    unknown = set(modes) - set(PAIR_MODES)
    if unknown:
        raise ValueError(f"unknown pair modes {sorted(unknown)}; valid modes are {PAIR_MODES}")
    if ratings < 1:
        raise ValueError(f"ratings must be >= 1, got {ratings}")
    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), adapter)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = eval_prompts(num_prompts, seed + 1)
    base = feature_matrix(detect_batch(generate_world_images(pipe, prompts, seeds, steps, None, 64, False, "base")))
    curves: dict[str, dict[str, list[float]]] = {}
    decided: dict[str, dict[str, list[int]]] = {}  # cumulative non-tie answers: the ratings that taught something
    with tempfile.TemporaryDirectory(dir=db_dir) as tmp:
        for mode in modes:
            # queue_size 1 and no background worker: every pair is chosen knowing every earlier answer.
            config = AppConfig(db=str(Path(tmp) / f"{mode}.db"), pair_mode=mode, queue_size=1, candidates=candidates,
                               candidate_prompts=candidate_prompts,
                               steps=steps, adapter=adapter, seed=seed)
            service = RatingService(config, pipe=pipe, start_worker=False)
            try:
                curves[mode], decided[mode] = {}, {}
                bar = tqdm(total=len(users) * ratings, desc=f"raters ({mode})", disable=not progress, dynamic_ncols=True)
                for user in users:
                    service.login(user.user_id)
                    curve, answered = [], []
                    for _ in range(ratings):
                        pair = service.next_pair(user.user_id)
                        choice = oracle_choice(user, np.asarray(pair["left"]), np.asarray(pair["right"]))
                        service.rate(user.user_id, pair["pair_id"], choice)
                        answered.append((answered[-1] if answered else 0) + (choice != "tie"))
                        tokens = service.user_tokens(user.user_id)
                        if tokens is None:  # only ties so far: the person still sees the base model
                            curve.append(0.5)
                        else:
                            tuned = generate_personalized(pipe, prompts, seeds, tokens, 1.0, steps, None, 64)
                            curve.append(win_rate(oracle_reward(user, feature_matrix(detect_batch(tuned))),
                                                  oracle_reward(user, base)))
                        bar.update(1)
                    curves[mode][user.user_id] = curve
                    decided[mode][user.user_id] = answered
                bar.close()
            finally:
                service.close()
    result: dict[str, Any] = {"ratings": list(range(1, ratings + 1)), "users": [u.user_id for u in users],
                              "prompts": num_prompts, "steps": steps, "candidates": candidates,
                              "candidate_prompts": candidate_prompts, "per_user": curves}
    for mode, per_user in curves.items():
        result[mode] = np.mean(list(per_user.values()), axis=0).round(4).tolist()
        result[f"{mode}_decided"] = np.mean(list(decided[mode].values()), axis=0).round(3).tolist()
    if {"active", "random"} <= set(curves) and ratings >= 8:
        target = result["random"][7]
        result["random_at_8"] = target
        result["active_reaches_random_at_8_after"] = first_reaching(result["active"], target)
        result["comparison"] = compare_modes(curves["active"], curves["random"])
    return result


def bootstrap_mean(values: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Mean over raters with a 90 % bootstrap interval (raters resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    boot = values[np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return {"mean": round(float(values.mean()), 4), "ci90": [round(float(q), 4) for q in np.percentile(boot, [5, 95])]}


def simulate_learning(users: Sequence[WorldUser], checkpoints: Sequence[int] = (10, 20, 30), num_prompts: int = 32,
                      seed: int = 0, adapter: str = "embedded-ppd", steps: int = 15, learn_config: str | None = None,
                      learn_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``--learn`` on and off: oracle win rate against the base after each checkpoint's ratings, per rater.

    The raters rate in lockstep through one ``RatingService``; at each checkpoint the learner runs one
    round on everything stored so far (``Learner.run_round``: train, judge on held-out ratings, serve
    only if not worse), then each rater's tokens personalize the evaluation captions twice: with the
    shipped adapter (``--learn`` off) and with the adapter being served (on). Both arms see the same
    pairs: pair candidates are base-model images and the active choice reads the adapter's frozen
    image backbone, so learning changes the person's model, not the pairs they are shown."""
    from diffpref.app.learn import Learner
    from diffpref.experiments.ppd_eval import generate_personalized
    from diffpref.experiments.preference_eval import eval_prompts, generate_world_images
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.encoder import embed_user
    from diffpref.personalize.pipeline import PersonalizedPipeline

    checkpoints = sorted({int(c) for c in checkpoints})
    if not checkpoints or checkpoints[0] < 1:
        raise ValueError(f"checkpoints must be positive rating counts, got {checkpoints}")
    shipped = PersonalizedPipeline.from_base(load_pipeline("embedded"), adapter)
    shipped.set_progress_bar_config(disable=True)
    prompts, seeds = eval_prompts(num_prompts, seed + 1)
    base = feature_matrix(detect_batch(generate_world_images(shipped, prompts, seeds, steps, None, 64, False, "base")))
    # "ungated": the last round's adapter whether or not the gate served it: what the gate kept out.
    curves: dict[str, dict[str, list[float]]] = {arm: {u.user_id: [] for u in users} for arm in ("off", "on", "ungated")}
    rounds = []
    with tempfile.TemporaryDirectory(dir=learn_dir) as tmp:
        config = AppConfig(db=str(Path(tmp) / "ratings.db"), queue_size=1, steps=steps, adapter=adapter, seed=seed,
                           learn_dir=str(Path(tmp) / "learned"), learn_config=learn_config)
        service = RatingService(config, pipe=shipped, start_worker=False)
        learner = Learner(service, start_thread=False)
        try:
            for user in users:
                service.login(user.user_id)
            done = 0
            bar = tqdm(total=len(users) * checkpoints[-1], desc="raters (learn)", disable=not progress, dynamic_ncols=True)
            for checkpoint in checkpoints:
                for _ in range(checkpoint - done):
                    for user in users:
                        pair = service.next_pair(user.user_id)
                        choice = oracle_choice(user, np.asarray(pair["left"]), np.asarray(pair["right"]))
                        service.rate(user.user_id, pair["pair_id"], choice)
                        bar.update(1)
                done = checkpoint
                rounds.append({"after": checkpoint, **learner.run_round()})
                for user in users:
                    rows = service.store.rated_examples(user.user_id, limit=config.max_examples)
                    if not rows:
                        for arm in curves:
                            curves[arm][user.user_id].append(0.5)
                        continue
                    examples = [UserExample(p, from_png(g), from_png(b)) for p, g, b in rows]
                    for arm, pipe in (("off", shipped), ("on", service.pipe), ("ungated", learner.last_candidate)):
                        with torch.no_grad():
                            tokens = embed_user(pipe.user_encoder, pipe.backbone, examples).cpu()
                        tuned = generate_personalized(pipe, prompts, seeds, tokens, 1.0, steps, None, 64)
                        curves[arm][user.user_id].append(win_rate(oracle_reward(user, feature_matrix(detect_batch(tuned))),
                                                                  oracle_reward(user, base)))
            bar.close()
        finally:
            service.close()
    on, off, ungated = (np.array([curves[arm][u.user_id] for u in users]) for arm in ("on", "off", "ungated"))
    table = [{"ratings": c, "learn_off": bootstrap_mean(off[:, k]), "learn_on": bootstrap_mean(on[:, k]),
              "on_minus_off": bootstrap_mean(on[:, k] - off[:, k]), "ungated": bootstrap_mean(ungated[:, k]),
              "ungated_minus_off": bootstrap_mean(ungated[:, k] - off[:, k])} for k, c in enumerate(checkpoints)]
    return {"checkpoints": checkpoints, "users": [u.user_id for u in users], "prompts": num_prompts, "steps": steps,
            "rounds": rounds, "table": table, "per_user": curves}


# Per-person LoRA keys: configs/embedded_dpo.yaml's recipe with the step budget of a `--learn` round.
PERSON_LORA_KEYS = {"method": "dpo", "beta": 5000, "learning_rate": 0.0005, "train_batch_size": 8, "max_train_steps": 150,
                    "lora_rank": 8, "prompt_dropout": 0.1, "lr_warmup_steps": 20, "checkpointing_steps": 100000,
                    "report_to": "none", "seed": 0, "threads": 1}


def simulate_person_loras(users: Sequence[WorldUser], ratings: int = 30, num_prompts: int = 32, seed: int = 0,
                          adapter: str = "embedded-ppd", steps: int = 15, work_dir: str | None = None,
                          progress: bool = True) -> dict[str, Any]:
    """The alternative to ``--learn``: one DPO LoRA per person, trained on that person's ratings only.

    The raters rate ``ratings`` pairs through the service (as in ``simulate_learning``); then per rater the
    oracle win rate against the base of (a) the shared PPD adapter with their tokens (no training) and
    (b) their own LoRA (``PERSON_LORA_KEYS``, the shared trainer without user conditioning)."""
    import sqlite3

    from diffpref.config import load_config
    from diffpref.experiments.ppd_eval import generate_personalized
    from diffpref.experiments.preference_eval import eval_prompts, generate_world_images
    from diffpref.models.loading import load_adapter, load_pipeline
    from diffpref.personalize.encoder import embed_user
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.training.config import TrainConfig
    from diffpref.training.trainer import train

    shipped = PersonalizedPipeline.from_base(load_pipeline("embedded"), adapter)
    shipped.set_progress_bar_config(disable=True)
    prompts, seeds = eval_prompts(num_prompts, seed + 1)
    base = feature_matrix(detect_batch(generate_world_images(shipped, prompts, seeds, steps, None, 64, False, "base")))
    result: dict[str, dict[str, float]] = {"ppd": {}, "lora": {}}
    untrained: list[str] = []  # raters with fewer than 2 decided ratings: no LoRA, the base model (win rate 0.5)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        config = AppConfig(db=str(Path(tmp) / "ratings.db"), queue_size=1, steps=steps, adapter=adapter, seed=seed)
        service = RatingService(config, pipe=shipped, start_worker=False)
        try:
            for user in users:
                service.login(user.user_id)
            for _ in range(ratings):
                for user in users:
                    pair = service.next_pair(user.user_id)
                    service.rate(user.user_id, pair["pair_id"], oracle_choice(user, np.asarray(pair["left"]),
                                                                               np.asarray(pair["right"])))
            for user in tqdm(users, desc="per-person LoRAs", disable=not progress):
                rows = service.store.rated_examples(user.user_id, limit=config.max_examples)
                examples = [UserExample(p, from_png(g), from_png(b)) for p, g, b in rows]
                with torch.no_grad():
                    tokens = embed_user(shipped.user_encoder, shipped.backbone, examples).cpu()
                tuned = generate_personalized(shipped, prompts, seeds, tokens, 1.0, steps, None, 64)
                result["ppd"][user.user_id] = win_rate(oracle_reward(user, feature_matrix(detect_batch(tuned))),
                                                       oracle_reward(user, base))
                own = Path(tmp) / user.user_id
                own.mkdir()
                with sqlite3.connect(service.store.path) as src, sqlite3.connect(own / "ratings.db") as dst:
                    src.backup(dst)
                with sqlite3.connect(own / "ratings.db") as conn:
                    conn.execute("DELETE FROM ratings WHERE user_id != ?", (user.user_id,))
                    decided = conn.execute("SELECT COUNT(*) FROM ratings WHERE label IN (0.0, 1.0)").fetchone()[0]
                conn.close()
                if decided < 2:  # nothing to train on: the person keeps the base model
                    untrained.append(user.user_id)
                    result["lora"][user.user_id] = 0.5
                    continue
                keys = {**PERSON_LORA_KEYS, "model": "embedded", "data_path": str(own / "ratings.db"),
                        "output_dir": str(own / "lora"), "cache_dir": str(own / "cache"),
                        "train_batch_size": min(PERSON_LORA_KEYS["train_batch_size"], decided)}
                train(load_config(TrainConfig, None, [f"{k}={v}" for k, v in keys.items()]))
                lora = load_adapter(load_pipeline("embedded"), own / "lora")
                lora.set_progress_bar_config(disable=True)
                images = generate_world_images(lora, prompts, seeds, steps, None, 64, False, "lora")
                result["lora"][user.user_id] = win_rate(oracle_reward(user, feature_matrix(detect_batch(images))),
                                                        oracle_reward(user, base))
        finally:
            service.close()
    ids = [u.user_id for u in users]
    ppd, lora = (np.array([result[k][u] for u in ids]) for k in ("ppd", "lora"))
    return {"ratings": ratings, "users": ids, "prompts": num_prompts, "steps": steps, "lora_keys": PERSON_LORA_KEYS,
            "ppd_tokens": bootstrap_mean(ppd), "person_lora": bootstrap_mean(lora),
            "lora_minus_ppd": bootstrap_mean(lora - ppd), "untrained": untrained, "per_user": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", required=True, help="JSON list of world users (the raters)")
    parser.add_argument("--ratings", type=int, default=10, help="ratings per rater")
    parser.add_argument("--modes", default=",".join(PAIR_MODES), help=f"comma-separated subset of {PAIR_MODES}")
    parser.add_argument("--prompts", type=int, default=32, help="evaluation captions per point of the curve")
    parser.add_argument("--adapter", default="embedded-ppd")
    parser.add_argument("--candidates", type=int, default=4, help="candidate images per pair in active mode")
    parser.add_argument("--candidate-prompts", type=int, default=2,
                        help="active mode: prompts with --candidates images each (the pair is chosen across them)")
    parser.add_argument("--steps", type=int, default=15, help="sampling steps of pairs and evaluation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON here too")
    parser.add_argument("--learn", action="store_true",
                        help="compare `diffpref app --learn` on and off (win rate after --checkpoints ratings)")
    parser.add_argument("--checkpoints", default="10,20,30", help="--learn: rating counts to evaluate at")
    parser.add_argument("--learn-config", default=None, help="--learn: YAML of training keys for each round")
    parser.add_argument("--person-loras", action="store_true",
                        help="per-person DPO LoRAs after --ratings ratings, against the shared adapter's tokens")
    args = parser.parse_args(argv)
    if args.person_loras:
        result = simulate_person_loras(load_users(args.users), args.ratings, args.prompts, args.seed, args.adapter,
                                       args.steps)
    elif args.learn:
        result = simulate_learning(load_users(args.users), [int(c) for c in args.checkpoints.split(",") if c],
                                   args.prompts, args.seed, args.adapter, args.steps, args.learn_config)
    else:
        result = simulate_raters(load_users(args.users), args.ratings, [m for m in args.modes.split(",") if m],
                                 args.prompts, args.seed, args.adapter, args.candidates, args.steps,
                                 args.candidate_prompts)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
