"""``diffpref eval``: a tuned model against its base, judged by reward models (HPSv2, PickScore, ...).

Base and tuned models generate the same prompts with the same seeds (prompt i with seed + i), so every
tuned image has a base twin; a reward model scores both, and the tuned image wins when its reward is
higher (ties count half). With a PPD adapter and ``--users`` each user gets their own personalized
generations and their own win rate; the report gives each user and the mean over users.

All images are generated first and the pipeline is freed before the first reward model loads, and
reward models are loaded one at a time: on a GPU, the diffusion model and several CLIP-H-sized
scorers are never resident together.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffpref.generate import EMBEDDED_STEPS, default_guidance, generate_all, read_prompts
from diffpref.models.loading import default_device, load_adapter, load_pipeline
from diffpref.paths import EMBEDDED_NAMES
from diffpref.personalize.adapter import is_ppd_adapter
from diffpref.rewards.specs import RewardSpec, check_reward_files, load_reward, parse_rewards
from diffpref.world.metrics import win_rate


def check_adapter(adapter: str | os.PathLike | None, users: str | os.PathLike | None) -> bool:
    """Whether this is a personalized (PPD) evaluation; refuses a PPD adapter without users and users without one."""
    ppd = users is not None or is_ppd_adapter(adapter)
    if ppd and users is None:
        raise ValueError(f"{adapter} is a PPD adapter, which personalizes per user: pass --users FILE")
    if ppd and adapter is not None and not is_ppd_adapter(adapter):
        raise ValueError(f"--users needs a PPD adapter (a folder with ppd_config.json, or 'embedded-ppd'); "
                         f"{adapter} is not one")
    return ppd


def generate_eval_images(pipe, prompts: Sequence[str], seeds: Sequence[int], adapter: str | os.PathLike | None = None,
                         users: str | os.PathLike | None = None, steps: int = EMBEDDED_STEPS,
                         guidance_scale: float | None = None, batch_size: int = 8, user_scale: float = 1.0,
                         progress: bool = True) -> tuple[np.ndarray, dict[str | None, np.ndarray]]:
    """(base images, {user or None: tuned images}); the adapter is applied to ``pipe`` after the base images.

    No adapter: the model is its own base, and ``{None: base}`` is returned without generating twice.
    """
    ppd = check_adapter(adapter, users)
    base = generate_all(pipe, prompts, seeds, steps, guidance_scale, batch_size, progress, "base")
    if not ppd:
        if adapter is None:
            return base, {None: base}
        load_adapter(pipe, adapter)  # a LoRA (file or folder) or a full UNet folder
        return base, {None: generate_all(pipe, prompts, seeds, steps, guidance_scale, batch_size, progress, "tuned")}

    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.personalize.users_file import load_generation_users

    personal = PersonalizedPipeline.from_base(pipe, adapter or "embedded-ppd")
    personal.set_progress_bar_config(disable=True)
    tokens = load_generation_users(users, personal)
    return base, {user: generate_all(personal, prompts, seeds, steps, guidance_scale, batch_size, progress,
                                     f"user {user}", user_embedding=tokens[user], user_scale=user_scale)
                  for user in sorted(tokens)}


def summarize(base_scores: np.ndarray, tuned_scores: dict[str | None, np.ndarray]) -> dict[str, Any]:
    """mean_reward, base_mean_reward, win_rate_vs_base; per user (and their mean) when tuned images are per user."""
    if list(tuned_scores) == [None]:
        scores = tuned_scores[None]
        return {"mean_reward": float(np.mean(scores)), "base_mean_reward": float(np.mean(base_scores)),
                "win_rate_vs_base": win_rate(scores, base_scores)}
    per_user = {user: {"mean_reward": float(np.mean(scores)), "win_rate_vs_base": win_rate(scores, base_scores)}
                for user, scores in tuned_scores.items()}
    return {"mean_reward": float(np.mean([u["mean_reward"] for u in per_user.values()])),
            "base_mean_reward": float(np.mean(base_scores)),
            "win_rate_vs_base": float(np.mean([u["win_rate_vs_base"] for u in per_user.values()])),
            "per_user": per_user}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def evaluate_rewards(model: str | os.PathLike = "embedded", prompts: str | os.PathLike | Sequence[str] = (),
                     rewards: str | Sequence[RewardSpec] = (), adapter: str | os.PathLike | None = None,
                     users: str | os.PathLike | None = None, seed: int = 0, steps: int | None = None,
                     guidance_scale: float | None = None, batch_size: int = 8, device: str | None = None,
                     attention: str = "sdpa", user_scale: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """Mean reward and win rate against the base, per reward model; the dict ``diffpref eval --json`` prints."""
    # 1. Check every reward file before minutes of generation
    specs = parse_rewards(rewards) if isinstance(rewards, str) else list(rewards)
    if not specs:
        raise ValueError("no reward models: pass --rewards, e.g. hpsv2=PATH,clip=PATH")
    for spec in specs:
        check_reward_files(spec)
    prompt_list = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    if not prompt_list:
        raise ValueError("no prompts to evaluate")
    seeds = [seed + i for i in range(len(prompt_list))]
    if users is not None and adapter is None:
        adapter = "embedded-ppd"  # as `diffpref generate --users` does
    check_adapter(adapter, users)

    # 2. Generate base and tuned images, then free the diffusion model
    device = device or default_device()
    steps = steps or (EMBEDDED_STEPS if str(model) in EMBEDDED_NAMES else 50)
    pipe = load_pipeline(model, device=device, attention=attention)
    guidance = default_guidance(pipe) if guidance_scale is None else guidance_scale
    base, tuned = generate_eval_images(pipe, prompt_list, seeds, adapter, users, steps, guidance, batch_size,
                                       user_scale, progress)
    del pipe
    _free(device)

    # 3. Score with each reward model in turn
    users_list = None if list(tuned) == [None] else list(tuned)
    result: dict[str, Any] = {
        "model": str(model), "adapter": None if adapter is None else str(adapter), "users": users_list,
        "prompts": len(prompt_list),
        "images": len(base) + sum(len(images) for images in tuned.values() if images is not base),
        "seed": seed, "steps": steps, "guidance_scale": guidance,
        "reward_files": {spec.name: str(spec) for spec in specs},
    }
    for spec in specs:
        reward = load_reward(spec, device=device)
        base_scores = reward.score(base, prompt_list, batch_size, progress, desc=f"{spec.name} base")
        tuned_scores = {user: base_scores if images is base else
                        reward.score(images, prompt_list, batch_size, progress,
                                     desc=f"{spec.name} {'tuned' if user is None else user}")
                        for user, images in tuned.items()}
        result[spec.name] = summarize(base_scores, tuned_scores)
        del reward
        _free(device)
    return result
