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
