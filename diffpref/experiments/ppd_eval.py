"""Few-shot personalization on the world: K of a user's choices in, personalized images judged by their oracle.

For each user given as weights: K example pairs are drawn the way real data arises (two base
generations of one caption, labelled by the user's oracle), embedded by the PPD encoder, and the
personalized model generates the evaluation captions with the same seeds as the base model. The
user's oracle reward decides every comparison (ties count half). ``ranking_accuracy`` asks the
tuned model itself: on held-out pairs of the user, does its implicit reward (DPO: how much more
the personalized denoiser prefers one image than the base does) order the pair as the oracle does?
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffpref.experiments.make_data import generate_in_batches
from diffpref.experiments.preference_eval import eval_prompts, generate_world_images
from diffpref.personalize.backbones import UserExample
from diffpref.world.captions import sample_prompt
from diffpref.world.ceiling import ceiling_win_rate, few_shot_ceiling_win_rate
from diffpref.world.detector import detect_batch, feature_matrix
from diffpref.world.metrics import adherence_of, win_rate
from diffpref.world.users import WorldUser, load_users, oracle_reward


def draw_pairs(pipe, user: WorldUser, n: int, seed: int, steps: int, guidance_scale: float | None,
               batch_size: int = 100, user_salt: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """n decided (caption, image_0, image_1, label) pairs of base generations labelled by the user's oracle."""
    rng = np.random.default_rng([seed, user_salt, 0x5A1E])
    out: list = []
    for _ in range(20):
        if len(out) >= n:
            break
        need = 2 * (n - len(out)) + 4  # ties are dropped, so draw a few extra
        captions = [sample_prompt(rng) for _ in range(need)]
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=2 * need)]
        prompts = [c for c in captions for _ in (0, 1)]
        images = np.concatenate([im for _, im in generate_in_batches(pipe, prompts, seeds, steps, guidance_scale,
                                                                    batch_size, progress=False)])
        rewards = oracle_reward(user, feature_matrix(detect_batch(images)))
        for i, caption in enumerate(captions):
            r0, r1 = rewards[2 * i], rewards[2 * i + 1]
            if r0 != r1 and len(out) < n:
                out.append((caption, images[2 * i], images[2 * i + 1], 1.0 if r0 > r1 else 0.0))
    if len(out) < n:
        raise RuntimeError(f"could only draw {len(out)} of {n} decided pairs for user {user.user_id}: the model's "
                           "images almost always tie under this user's oracle (is it a world model?)")
    return out


def preference_differences(pairs) -> np.ndarray:
    """Detected features of each pair's preferred image minus its rejected one, ``[N, F]``."""
    features = feature_matrix(detect_batch(np.stack([im for _, a, b, _ in pairs for im in (a, b)])))
    first_won = np.array([label == 1.0 for *_, label in pairs])[:, None]
    diff = features[0::2] - features[1::2]
    return np.where(first_won, diff, -diff)


def as_examples(pairs) -> list[UserExample]:
    return [UserExample(c, a if label == 1.0 else b, b if label == 1.0 else a) for c, a, b, label in pairs]


@torch.no_grad()
def denoising_errors(unet, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, text: torch.Tensor,
                     tokens: torch.Tensor | None, num_user_tokens: int) -> torch.Tensor:
    """Per-sample ``||eps - eps_theta(x_t, t, text [+ user])||^2`` (mean over latent elements), the term
    of the Diffusion-DPO implicit reward (Wallace et al. 2023, eq. 14); ``tokens=None`` is the base
    model (user scale 0). ``tokens`` is ``[B or 1, K, d]``; the UNet's user scale is left as set here."""
    from diffpref.personalize.attention import concat_user_tokens, set_user_scale

    set_user_scale(unet, 0.0 if tokens is None else 1.0)
    cond = concat_user_tokens(text, None if tokens is None else tokens.to(text.dtype), num_user_tokens)
    return (unet(x_t, t, encoder_hidden_states=cond).sample - noise).pow(2).mean(dim=(1, 2, 3))


@torch.no_grad()
def ranking_accuracy(pipe, tokens: torch.Tensor, pairs, draws: int = 4, seed: int = 0) -> float:
    """Fraction of held-out pairs whose DPO implicit reward under the personalized model matches the oracle."""
    from diffpref.models.loading import native_resolution
    from diffpref.training.conditioning import encode_images

    unet, scheduler = pipe.unet, pipe.scheduler
    prompts = [c for c, *_ in pairs]
    latents = encode_images(pipe.vae, np.concatenate([np.stack([a, b]) for _, a, b, _ in pairs]), native_resolution(pipe))
    text, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    text = text.repeat_interleave(2, dim=0)
    gen = torch.Generator().manual_seed(seed)
    margin = torch.zeros(len(pairs))
    alphas = scheduler.alphas_cumprod
    for _ in range(draws):
        t = torch.randint(50, 950, (len(pairs),), generator=gen).repeat_interleave(2)
        noise = torch.randn(len(pairs), *latents.shape[1:], generator=gen).repeat_interleave(2, dim=0)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        err_model = denoising_errors(unet, x_t, t, noise, text, tokens.unsqueeze(0), pipe.num_user_tokens)
        err_ref = denoising_errors(unet, x_t, t, noise, text, None, pipe.num_user_tokens)
        diff = (err_model - err_ref).view(-1, 2)
        margin += diff[:, 0] - diff[:, 1]  # < 0: the model moved towards image 0 more than towards image 1
    labels = torch.tensor([label for *_, label in pairs])
    predicted = (margin < 0).float()
    return float((predicted == labels).float().mean())


def evaluate_ppd(model: Any = "embedded", adapter: str | os.PathLike = "embedded-ppd",
                 users: str | os.PathLike | Sequence[WorldUser] = (), shots: int = 4, num_prompts: int = 200,
                 seed: int = 0, steps: int = 20, guidance_scale: float | None = None, batch_size: int = 100,
                 ranking_pairs: int = 24, user_scale: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """``diffpref world eval --adapter embedded-ppd --users FILE --shots K --json``."""
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline

    users = load_users(users) if isinstance(users, (str, os.PathLike)) else list(users)
    if not users:
        raise ValueError("no users to evaluate: pass --users FILE (a JSON list of world users)")
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    base_pipe = load_pipeline(model) if isinstance(model, (str, os.PathLike)) else model
    pipe = PersonalizedPipeline.from_base(base_pipe, adapter)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = eval_prompts(num_prompts, seed)
    base = generate_world_images(pipe, prompts, seeds, steps, guidance_scale, batch_size, progress, "base")
    base_features = feature_matrix(detect_batch(base))
    per_user, adherences = {}, []
    for u, user in enumerate(users):
        pairs = draw_pairs(pipe, user, shots + ranking_pairs, seed, steps, guidance_scale, batch_size, user_salt=u)
        context, held_out = pairs[:shots], pairs[shots:]
        winner_minus_loser = preference_differences(pairs)
        tokens = pipe.embed_user(as_examples(context))
        tuned = generate_personalized(pipe, prompts, seeds, tokens, user_scale, steps, guidance_scale, batch_size)
        r_tuned = oracle_reward(user, feature_matrix(detect_batch(tuned)))
        r_base = oracle_reward(user, base_features)
        adherence = adherence_of(tuned, prompts)["mean_acc"]
        adherences.append(adherence)
        per_user[user.user_id] = {
            "win_rate": win_rate(r_tuned, r_base), "mean_reward": float(np.mean(r_tuned)),
            "base_mean_reward": float(np.mean(r_base)), "adherence": adherence,
            "ranking_accuracy": ranking_accuracy(pipe, tokens, held_out, seed=seed + u) if held_out else None,
            "ceiling_win_rate": ceiling_win_rate(user, prompts, base_features),
            "few_shot_ceiling_win_rate": few_shot_ceiling_win_rate(user, prompts, base_features, winner_minus_loser,
                                                                   shots, seed=seed + u),
        }
        if progress:
            # stderr, beside the progress bars: stdout carries only the result (``--json`` pipes it)
            print(f"  {user.user_id}: win rate {per_user[user.user_id]['win_rate']:.3f}", file=sys.stderr, flush=True)
    return {
        "win_rate_vs_base": float(np.mean([v["win_rate"] for v in per_user.values()])),
        "adherence": float(np.mean(adherences)),
        "base_adherence": adherence_of(base, prompts)["mean_acc"],
        # None, not NaN, when no pairs were held out (ranking_pairs=0): NaN is not valid JSON
        "ranking_accuracy": _mean_or_none([v["ranking_accuracy"] for v in per_user.values()]),
        # the most any adapter that keeps to the prompts could win here (diffpref.world.ceiling)
        "ceiling_win_rate": float(np.mean([v["ceiling_win_rate"] for v in per_user.values()])),
        # ... and with only K of the user's choices to know them by (diffpref.world.ceiling)
        "few_shot_ceiling_win_rate": float(np.mean([v["few_shot_ceiling_win_rate"] for v in per_user.values()])),
        "shots": shots, "n": num_prompts, "per_user": per_user,
    }


def generate_personalized(pipe, prompts, seeds, tokens, user_scale, steps, guidance_scale, batch_size) -> np.ndarray:
    """uint8 world images of one user (tokens [K, d]), ``batch_size`` per pipeline call."""
    return generate_world_images(pipe, prompts, seeds, steps, guidance_scale, batch_size, False, "personalized",
                                 user_embedding=tokens, user_scale=user_scale)


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
