"""Pools of base-image pairs with cached features: the data the few-shot reward model trains and is judged on.

A pool is ``n`` pairs of two base generations of one world caption (seeds recorded), stored with
the frozen backbone's image embeddings and the exact detected features, so that any number of
simulated users can label it without generating again (``labels_for``). Images are kept too
(uint8), so a different backbone can embed the same pool later.

    pool = build_pool(pipe, n=2000, seed=11, name_prob=0.2)   # or load_or_build_pool(path, ...)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffpref.world.captions import sample_prompt
from diffpref.world.detector import detect_batch, feature_matrix
from diffpref.world.users import WorldUser, oracle_reward


@dataclass
class PairPool:
    captions: list[str]       # n
    seeds: np.ndarray         # (n, 2) generation seeds of image 0 and image 1
    images: np.ndarray        # (n, 2, 64, 64, 3) uint8
    embeddings: np.ndarray    # (n, 2, E) normalised backbone image embeddings
    features: np.ndarray      # (n, 2, F) exact detected features (FEATURE_KEYS order)

    def __len__(self) -> int:
        return len(self.captions)

    def labels_for(self, user: WorldUser) -> np.ndarray:
        """The user's true preference per pair: 1.0 image 0 better, 0.0 image 1, 0.5 an oracle tie."""
        r = oracle_reward(user, self.features.reshape(-1, self.features.shape[-1])).reshape(-1, 2)
        return np.where(r[:, 0] > r[:, 1], 1.0, np.where(r[:, 0] < r[:, 1], 0.0, 0.5))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, captions=np.array(self.captions), seeds=self.seeds, images=self.images,
                            embeddings=self.embeddings, features=self.features)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PairPool:
        with np.load(path) as z:
            return cls([str(c) for c in z["captions"]], z["seeds"], z["images"], z["embeddings"], z["features"])


def plan_pool(n: int, seed: int, name_prob: float) -> tuple[list[str], np.ndarray]:
    """Captions and seed pairs of a pool: a function of (n, seed, name_prob) only."""
    rng = np.random.default_rng([seed, 0x9001])
    captions = [sample_prompt(rng, p_name=name_prob) for _ in range(n)]
    seeds = rng.integers(0, 2**31 - 1, size=(n, 2))
    return captions, seeds


def build_pool(pipe, n: int, seed: int, name_prob: float = 0.5, steps: int = 20, guidance_scale: float | None = None,
               batch_size: int = 100, backbone=None, progress: bool = True) -> PairPool:
    """Generate ``n`` base pairs, embed them with ``backbone`` (default: the world CLIP) and detect them."""
    from diffpref.experiments.preference_eval import generate_world_images
    from diffpref.personalize.backbones import OpenClipBackbone

    captions, seeds = plan_pool(n, seed, name_prob)
    prompts = [c for c in captions for _ in (0, 1)]
    images = generate_world_images(pipe, prompts, [int(s) for s in seeds.ravel()], steps, guidance_scale, batch_size,
                                   progress, "pool")
    backbone = backbone or OpenClipBackbone.from_pretrained(None)
    embeddings = backbone.embed_images(images).numpy()
    features = feature_matrix(detect_batch(images))
    return PairPool(captions, seeds, images.reshape(n, 2, *images.shape[1:]), embeddings.reshape(n, 2, -1),
                    features.reshape(n, 2, -1))


def load_or_build_pool(path: str | os.PathLike, pipe_or_model, n: int, seed: int, name_prob: float = 0.5,
                       steps: int = 20, **kwargs) -> PairPool:
    """The cached pool at ``path`` if it exists (and matches ``n``), else build and save it."""
    path = Path(path)
    if path.exists():
        pool = PairPool.load(path)
        if len(pool) != n:
            raise ValueError(f"{path} holds {len(pool)} pairs, not the {n} asked for; delete it to rebuild")
        return pool
    from diffpref.experiments.make_data import world_pipeline

    pipe, _ = world_pipeline(pipe_or_model)
    pipe.set_progress_bar_config(disable=True)
    pool = build_pool(pipe, n, seed, name_prob, steps, **kwargs)
    pool.save(path)
    return pool
