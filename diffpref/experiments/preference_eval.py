"""Oracle win rate of a tuned model against its base, judged by simulated users' true rewards.

Tuned and base generate the same world captions with the same seeds; for each user the tuned
image wins a prompt when that user's oracle reward of it is higher (ties count half). Captions are
under-specified (``sample_prompt``), so the free attributes are where a user's taste can act, and
prompt adherence is checked on the attributes the captions do name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffpref.experiments.make_data import generate_in_batches, world_pipeline
from diffpref.models.loading import load_adapter
from diffpref.world.captions import sample_prompt
from diffpref.world.ceiling import ceiling_win_rate
from diffpref.world.detector import detect_batch, feature_matrix
from diffpref.world.metrics import adherence_of, win_rate
from diffpref.world.users import WorldUser, load_users, oracle_reward


def eval_prompts(num_prompts: int, seed: int) -> tuple[list[str], list[int]]:
    """Fixed (caption, seed) pairs; a separate stream from make-data's, so evaluation prompts are fresh."""
    rng = np.random.default_rng([seed, 0xE7A1])
    prompts = [sample_prompt(rng) for _ in range(num_prompts)]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=num_prompts)]
    return prompts, seeds


def generate_world_images(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                          guidance_scale: float | None, batch_size: int, progress: bool, desc: str,
                          **image_kwargs) -> np.ndarray:
    """World-sized (64x64) uint8 images of every prompt, whatever the model's native size.

    ``image_kwargs`` go to the pipeline call (e.g. ``user_embedding=``, ``user_scale=``).
    """
    return np.concatenate([images for _, images in generate_in_batches(pipe, prompts, seeds, steps, guidance_scale,
                                                                      batch_size, progress, desc, **image_kwargs)])


def compare(tuned: np.ndarray, base: np.ndarray, prompts: Sequence[str], users: Sequence[WorldUser]) -> dict[str, Any]:
    """win_rate_vs_base (mean over users), adherence of both, and per-user rewards."""
    tuned_features = feature_matrix(detect_batch(tuned))
    base_features = feature_matrix(detect_batch(base))
    per_user = {}
    for user in users:
        r_tuned, r_base = oracle_reward(user, tuned_features), oracle_reward(user, base_features)
        per_user[user.user_id] = {"win_rate": win_rate(r_tuned, r_base), "mean_reward": float(np.mean(r_tuned)),
                                  "base_mean_reward": float(np.mean(r_base)),
                                  "ceiling_win_rate": ceiling_win_rate(user, prompts, base_features)}
    return {
        "win_rate_vs_base": float(np.mean([u["win_rate"] for u in per_user.values()])),
        "adherence": adherence_of(tuned, prompts)["mean_acc"],
        "base_adherence": adherence_of(base, prompts)["mean_acc"],
        "per_user": per_user,
        "n": len(prompts),
    }


def evaluate_preference(model: Any = "embedded", adapter: str | os.PathLike | None = None,
                        users: str | os.PathLike | Sequence[WorldUser] = (), num_prompts: int = 200, seed: int = 0,
                        steps: int = 20, guidance_scale: float | None = None, batch_size: int = 100,
                        progress: bool = True) -> dict[str, Any]:
    """``diffpref world eval --adapter DIR --users FILE``: tuned vs base on the same captions and seeds."""
    users = load_users(users) if isinstance(users, (str, os.PathLike)) else list(users)
    if not users:
        raise ValueError("no users to evaluate: pass --users FILE (a JSON list of world users)")
    prompts, seeds = eval_prompts(num_prompts, seed)
    pipe, _ = world_pipeline(model)
    base = generate_world_images(pipe, prompts, seeds, steps, guidance_scale, batch_size, progress, "base")
    if adapter is not None:
        load_adapter(pipe, adapter)
    tuned = generate_world_images(pipe, prompts, seeds, steps, guidance_scale, batch_size, progress, "tuned")
    return compare(tuned, base, prompts, users)


class TrainingEvaluator:
    """Evaluation during training: base images made once, the training UNet swapped in for each call.

    The trainer's evaluator (``diffpref.launch.build_parts`` makes it when ``eval_world`` is set):
    ``attach`` once on the main process, then ``evaluator(step)`` returns the oracle win rate against
    the base model and the prompt adherence of both.
    """

    def __init__(self, cfg, users: str | os.PathLike | Sequence[WorldUser], progress: bool = False):
        self.cfg, self.progress = cfg, progress
        self.users = load_users(users) if isinstance(users, (str, os.PathLike)) else list(users)
        self.prompts, self.seeds = eval_prompts(cfg.eval_prompts, cfg.seed)
        self.unet = self.pipe = self.base = None

    def attach(self, unet, pipeline_class=None, resolution: int | None = None) -> None:
        """Load the base pipeline beside the training UNet and generate the base images once.

        ``pipeline_class`` and ``resolution`` are part of the trainer's evaluator interface; the world
        pipeline is loaded by model name (its own class) and generates at its native 64 px.
        """
        self.unet = unet
        self.pipe, _ = world_pipeline(self.cfg.model, device=str(unet.device))
        self.base = generate_world_images(self.pipe, self.prompts, self.seeds, self.cfg.eval_sampling_steps, None, 100,
                                          self.progress, "base")

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        if self.unet is None:
            raise RuntimeError("TrainingEvaluator.attach(unet, ...) must be called before evaluating")
        base_unet, was_training = self.pipe.unet, self.unet.training
        self.pipe.unet = self.unet.eval()
        try:
            tuned = generate_world_images(self.pipe, self.prompts, self.seeds, self.cfg.eval_sampling_steps, None,
                                          100, self.progress, "eval")
        finally:
            self.pipe.unet = base_unet
            self.unet.train(was_training)
        result = compare(tuned, self.base, self.prompts, self.users)
        return {"win_rate_vs_base": result["win_rate_vs_base"], "adherence": result["adherence"],
                "base_adherence": result["base_adherence"]}


def evaluate_best_of(model: Any = "embedded", users: str | os.PathLike | Sequence[WorldUser] = (),
                     best_of: Sequence[int] = (1, 2, 4, 8, 16), adapter: str | os.PathLike | None = None,
                     shots: int = 4, num_prompts: int = 60, seed: int = 0, steps: int = 20,
                     guidance_scale: float | None = None, batch_size: int = 100,
                     reward_model: str | os.PathLike = "embedded-reward", progress: bool = True) -> dict[str, Any]:
    """``diffpref world eval --best-of N``: personalized best-of-N against the base image of the same seed.

    For each user, ``shots`` of their choices (base pairs labelled by their oracle, as ``world eval
    --shots``) give their few-shot reward (``diffpref.personalize.reward``). Each evaluation prompt i
    with seed s_i gets candidates at seeds s_i .. s_i + N - 1 -- base images, or PPD images for that
    user with ``adapter`` -- and the one the user's reward ranks first is shown. It is judged by the
    user's oracle against the base image at s_i (candidate 0 of the base candidates: a tie when the
    reward picks it, counted half). Every N in ``best_of`` reuses the first N candidates of the largest.
    Reports, per N, the win rate, the prompt adherence of the shown images, and the images generated
    and seconds spent per shown image (generation + reward scoring, this machine, single call).
    """
    import time

    from diffpref.experiments.ppd_eval import as_examples, draw_pairs
    from diffpref.personalize.reward import PrototypeRewardModel

    users = load_users(users) if isinstance(users, (str, os.PathLike)) else list(users)
    if not users:
        raise ValueError("no users to evaluate: pass --users FILE (a JSON list of world users)")
    sizes = sorted({int(n) for n in best_of})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--best-of values must be >= 1, got {list(best_of)}")
    n_max = sizes[-1]
    prompts, seeds = eval_prompts(num_prompts, seed)
    pipe, _ = world_pipeline(model)
    if adapter is not None:
        from diffpref.personalize.pipeline import PersonalizedPipeline

        pipe = PersonalizedPipeline.from_base(pipe, adapter)
        pipe.set_progress_bar_config(disable=True)
    rewards = PrototypeRewardModel.from_pretrained(reward_model)
    cand_prompts = [p for p in prompts for _ in range(n_max)]
    cand_seeds = [s + j for s in seeds for j in range(n_max)]
    clock = {"generate_s": 0.0, "generated": 0, "score_s": 0.0, "scored": 0}

    def candidates(desc, **kwargs) -> np.ndarray:
        start = time.perf_counter()
        images = generate_world_images(pipe, cand_prompts, cand_seeds, steps, guidance_scale, batch_size, progress,
                                       desc, **kwargs)
        clock["generate_s"] += time.perf_counter() - start
        clock["generated"] += len(images)
        return images.reshape(num_prompts, n_max, *images.shape[1:])

    if adapter is None:
        base_cands = candidates("base candidates")
        base = base_cands[:, 0]  # seed s_i: the base model's own image of prompt i
    else:  # PPD candidates: only the opponent, the base image at s_i, is a base image
        base = generate_world_images(pipe, prompts, seeds, steps, guidance_scale, batch_size, progress, "base")
    base_features = feature_matrix(detect_batch(base))
    per_user = {}
    for u, user in enumerate(users):
        context = draw_pairs(pipe, user, shots, seed, steps, guidance_scale, batch_size, user_salt=u)
        examples = as_examples(context)
        reward = rewards.person(examples)
        if adapter is not None:
            cands = candidates(f"{user.user_id} candidates", user_embedding=pipe.embed_user(examples))
        else:
            cands = base_cands
        start = time.perf_counter()
        flat = cands.reshape(-1, *cands.shape[2:])
        scores = reward.score(flat).reshape(num_prompts, n_max)
        clock["score_s"] += time.perf_counter() - start
        clock["scored"] += len(flat)
        oracle = oracle_reward(user, feature_matrix(detect_batch(flat))).reshape(num_prompts, n_max)
        r_base = oracle_reward(user, base_features)
        rows = {}
        for n in sizes:
            chosen = scores[:, :n].argmax(axis=1)
            shown = cands[np.arange(num_prompts), chosen]
            rows[n] = {"win_rate": win_rate(oracle[np.arange(num_prompts), chosen], r_base),
                       "oracle_best_win_rate": win_rate(oracle[:, :n].max(axis=1), r_base),
                       "adherence": adherence_of(shown, prompts)["mean_acc"]}
        per_user[user.user_id] = rows
    gen_per_image = clock["generate_s"] / clock["generated"]
    score_per_image = clock["score_s"] / clock["scored"]
    curve = {n: {"win_rate_vs_base": float(np.mean([per_user[u][n]["win_rate"] for u in per_user])),
                 "oracle_reranked_win_rate": float(np.mean([per_user[u][n]["oracle_best_win_rate"] for u in per_user])),
                 "adherence": float(np.mean([per_user[u][n]["adherence"] for u in per_user])),
                 "images_per_shown_image": n,
                 "seconds_per_shown_image": n * (gen_per_image + score_per_image)} for n in sizes}
    return {"best_of": curve, "base_adherence": adherence_of(base, prompts)["mean_acc"],
            "candidates": "ppd" if adapter is not None else "base", "adapter": None if adapter is None else str(adapter),
            "shots": shots, "n": num_prompts, "steps": steps, "reward_model": str(reward_model),
            "seconds_per_generated_image": gen_per_image, "seconds_per_scored_image": score_per_image,
            "load_average": list(os.getloadavg()), "per_user": per_user}
