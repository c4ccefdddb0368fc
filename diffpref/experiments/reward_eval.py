"""Train the embedded world's few-shot reward model, and measure how well K choices rank a new person's pairs.

    python -m diffpref.experiments.reward_eval train --out diffpref/assets/world-reward
    python -m diffpref.experiments.reward_eval eval --reward diffpref/assets/world-reward --json

Both commands build (once, cached under ``--cache``) a pool of base-image pairs with their world
CLIP embeddings and exact detected features (``reward_data``). ``train`` fits the PAL prototype
model on the training users' oracle choices over the training pool, picks the Dirichlet prior and
likelihood scale of the few-shot step on held-out pool pairs of the *training* users, and saves.
``eval`` reads each unseen user from K of their decided pairs of a fresh pool and scores the
rest (held-out pair ranking accuracy against the user's oracle), for every estimator:

- ``reward`` / ``reward_map``: the PAL model, posterior-mean or PAL's MAP mixture;
- ``taste_clip``: the app's Bayesian taste model (``diffpref.app.pairs.fit_posterior``) on CLIP embeddings;
- ``ceiling_mean``: the "ceiling from K choices" estimator of ``diffpref.world.ceiling`` -- the mean of
  the K choices' winner-minus-loser *exact detected features* -- scored the same way;
- ``ceiling_bayes``: the app's Bayesian taste model on the exact detected features.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffpref.app.config import DEFAULT_PRIOR_STD
from diffpref.app.pairs import fit_posterior
from diffpref.experiments.reward_data import PairPool, load_or_build_pool
from diffpref.personalize.reward import PrototypeRewardModel, train_reward_model
from diffpref.world.users import WorldUser, load_users

TRAIN_USERS = "configs/users/ppd_train_pool480.json"  # 480 people: 0.704 at K = 4 vs 0.678 from 96 (reports/reward.md)
UNSEEN_USERS = "configs/users/ppd_unseen.json"
TRAIN_POOL = {"n": 1500, "seed": 11, "name_prob": 0.2, "steps": 15}   # like the PPD training data (make-data --name-prob 0.2)
EVAL_POOL = {"n": 600, "seed": 21, "name_prob": 0.5, "steps": 20}     # like `world eval`'s held-out pairs (ppd_eval.draw_pairs)
SHOTS = (1, 2, 4, 8)
ALPHAS = (0.05, 0.1, 0.3)
SCALES = (1.0, 3.0)


def _ranking_accuracy(scores_0: np.ndarray, scores_1: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of pairs ordered as the oracle orders them; a predicted tie counts half."""
    d = scores_0 - scores_1
    return float(np.mean(np.where(d == 0, 0.5, (d > 0) == (labels == 1.0))))


def _signed(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) rows of pairs labelled 1 (image 0 chosen) or 0."""
    first = (labels == 1.0)[:, None]
    return np.where(first, a, b), np.where(first, b, a)


def few_shot_accuracies(pool: PairPool, user: WorldUser, model: PrototypeRewardModel | None, shots: int,
                        trials: int, seed: int, estimators: tuple[str, ...]) -> dict[str, float]:
    """Mean held-out ranking accuracy over ``trials`` draws of ``shots`` context pairs, per estimator.

    Context and held-out pairs are the user's decided pairs of ``pool`` (oracle ties are dropped,
    as in ``ppd_eval.draw_pairs``); the held-out set is every decided pair not in the context.
    """
    labels = pool.labels_for(user)
    decided = np.flatnonzero(labels != 0.5)
    if len(decided) <= shots:
        raise ValueError(f"user {user.user_id}: only {len(decided)} decided pairs in the pool, need > {shots}")
    rng = np.random.default_rng([seed, shots])
    emb, feat = pool.embeddings, pool.features
    proto = model.prototype_rewards_np(emb) if model is not None else None  # [n, 2, M]
    out: dict[str, list[float]] = {name: [] for name in estimators}
    for trial in range(trials):
        context = rng.choice(decided, size=shots, replace=False)
        held = np.setdiff1d(decided, context)
        y_c, y_h = labels[context], labels[held]
        for name in estimators:
            if name in ("reward", "reward_map"):
                win, lose = _signed(emb[context, 0], emb[context, 1], y_c)
                w = model.mixture(win, lose, "posterior" if name == "reward" else "map", seed=trial)
                s0, s1 = proto[held, 0] @ w, proto[held, 1] @ w
            elif name in ("taste_clip", "ceiling_bayes", "ceiling_mean"):
                x = emb if name == "taste_clip" else feat
                win, lose = _signed(x[context, 0], x[context, 1], y_c)
                if name == "ceiling_mean":
                    w = (win - lose).mean(0)  # diffpref.world.ceiling.few_shot_ceiling_win_rate's estimate
                else:
                    w = fit_posterior(win - lose, np.ones(shots), prior_std=DEFAULT_PRIOR_STD).mean
                s0, s1 = x[held, 0] @ w, x[held, 1] @ w
            else:
                raise ValueError(f"unknown estimator {name!r}")
            out[name].append(_ranking_accuracy(s0, s1, y_h))
    return {name: float(np.mean(v)) for name, v in out.items()}


def evaluate(model: PrototypeRewardModel | None, pool: PairPool, users: list[WorldUser], shots=SHOTS,
             trials: int = 20, seed: int = 0,
             estimators=("reward", "reward_map", "taste_clip", "ceiling_mean", "ceiling_bayes")) -> dict[str, Any]:
    """{estimator: {K: mean over users}} plus per-user numbers."""
    if model is None:
        estimators = tuple(e for e in estimators if not e.startswith("reward"))
    per_user = {u.user_id: {k: few_shot_accuracies(pool, u, model, k, trials, seed + i, estimators) for k in shots}
                for i, u in enumerate(users)}
    table = {name: {k: float(np.mean([per_user[u][k][name] for u in per_user])) for k in shots} for name in estimators}
    return {"ranking_accuracy": table, "per_user": per_user, "shots": list(shots), "trials": trials,
            "users": len(users), "pool_pairs": len(pool)}


def ppd_ranking_accuracy(pool: PairPool, users: list[WorldUser], shots=SHOTS, trials: int = 1, max_pairs: int = 32,
                         seed: int = 0, adapter: str = "embedded-ppd") -> dict[int, float]:
    """The PPD adapter's ranking accuracy (``ppd_eval.ranking_accuracy``: its DPO implicit reward) on the same
    context draws as ``few_shot_accuracies`` (first ``trials``), scored on up to ``max_pairs`` held-out pairs."""
    from diffpref.experiments.ppd_eval import ranking_accuracy
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.backbones import UserExample
    from diffpref.personalize.pipeline import PersonalizedPipeline

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), adapter)
    out = {}
    for k in shots:
        accs = []
        for i, user in enumerate(users):
            labels = pool.labels_for(user)
            decided = np.flatnonzero(labels != 0.5)
            rng = np.random.default_rng([seed + i, k])  # the same stream as few_shot_accuracies
            for _ in range(trials):
                context = rng.choice(decided, size=k, replace=False)
                held = np.setdiff1d(decided, context)[:max_pairs]
                examples = [UserExample(pool.captions[r], *(pool.images[r] if labels[r] == 1.0 else pool.images[r, ::-1]))
                            for r in context]
                pairs = [(pool.captions[r], pool.images[r, 0], pool.images[r, 1], labels[r]) for r in held]
                accs.append(ranking_accuracy(pipe, pipe.embed_user(examples), pairs, seed=seed + i))
        out[k] = float(np.mean(accs))
    return out


def select_prior(model: PrototypeRewardModel, pool: PairPool, users: list[WorldUser], trials: int = 5,
                 shots=(2, 4), every: int = 4) -> dict[str, Any]:
    """The (alpha, scale) of the few-shot posterior with the best mean accuracy on ``pool``, over every
    ``every``-th training user (a quarter: the grid costs minutes on one core, not half an hour)."""
    users = users[::every]
    scores = {}
    for alpha in ALPHAS:
        for scale in SCALES:
            model.config.update(prior_alpha=alpha, likelihood_scale=scale)
            acc = [few_shot_accuracies(pool, u, model, k, trials, i, ("reward",))["reward"]
                   for i, u in enumerate(users) for k in shots]
            scores[(alpha, scale)] = float(np.mean(acc))
    alpha, scale = max(scores, key=scores.get)
    model.config.update(prior_alpha=alpha, likelihood_scale=scale)
    return {"prior_alpha": alpha, "likelihood_scale": scale,
            "validation": {f"alpha={a},scale={s}": v for (a, s), v in scores.items()}}


def train_world_reward(out: str | Path, users_file: str = TRAIN_USERS, cache: str | Path = "outputs/reward",
                       num_prototypes: int = 20, feature_dim: int = 32, hidden: int = 128, steps: int = 1500,
                       seed: int = 0, validation_fraction: float = 0.2, progress: bool = True) -> dict[str, Any]:
    """Train on the training users' pool pairs (all but a validation tail), pick the prior, save to ``out``."""
    import torch

    torch.set_num_threads(1)
    users = load_users(users_file)
    pool = load_or_build_pool(Path(cache) / "pool_train.npz", "embedded", **TRAIN_POOL)
    n_fit = int(len(pool) * (1 - validation_fraction))
    fit_pool, val_pool = _slice(pool, slice(0, n_fit)), _slice(pool, slice(n_fit, None))
    labels = np.stack([fit_pool.labels_for(u) for u in users])
    start = time.perf_counter()
    model, mixtures = train_reward_model(fit_pool.embeddings, labels, num_prototypes, feature_dim, hidden, steps,
                                         seed=seed, progress=progress)
    train_s = time.perf_counter() - start
    selection = select_prior(model, val_pool, users)
    info = {"train_users": users_file, "train_pool": TRAIN_POOL, "fit_pairs": n_fit, "steps": steps, "seed": seed,
            "train_seconds": round(train_s, 1), "selection": selection,
            "command": "python -m diffpref.experiments.reward_eval train --out " + str(out)}
    model.save_pretrained(out, extra={"training": info})
    return {"out": str(out), **info, "mean_mixture_max": float(mixtures.max(1).mean())}


def _slice(pool: PairPool, s: slice) -> PairPool:
    return PairPool(pool.captions[s], pool.seeds[s], pool.images[s], pool.embeddings[s], pool.features[s])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffpref.experiments.reward_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the few-shot reward model on the training users")
    t.add_argument("--out", required=True)
    t.add_argument("--users", default=TRAIN_USERS)
    t.add_argument("--cache", default="outputs/reward", help="folder of the cached pair pools")
    t.add_argument("--prototypes", type=int, default=20)
    t.add_argument("--feature-dim", type=int, default=32)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="held-out pair ranking accuracy of unseen users from K choices")
    e.add_argument("--reward", default="embedded-reward")
    e.add_argument("--users", default=UNSEEN_USERS)
    e.add_argument("--cache", default="outputs/reward")
    e.add_argument("--trials", type=int, default=20)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--ppd", action="store_true", help="also the PPD adapter's ranking accuracy (embedded-ppd)")
    e.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "train":
        result = train_world_reward(args.out, args.users, args.cache, args.prototypes, args.feature_dim,
                                    steps=args.steps, seed=args.seed)
    else:
        pool = load_or_build_pool(Path(args.cache) / "pool_eval.npz", "embedded", **EVAL_POOL)
        users = load_users(args.users)
        result = evaluate(PrototypeRewardModel.from_pretrained(args.reward), pool, users, trials=args.trials,
                          seed=args.seed)
        if args.ppd:
            result["ranking_accuracy"]["ppd"] = ppd_ranking_accuracy(pool, users, seed=args.seed)
        if not args.json:
            for name, row in result["ranking_accuracy"].items():
                print(f"{name:14s} " + "  ".join(f"K={k}: {v:.3f}" for k, v in row.items()))
            return 0
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
