"""What every reward model shares: uint8 images and their prompts in, one float per image out, in batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of [N, D] and [N, D] (image i with prompt i), in float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """uint8 (N, H, W, 3) -> RGB PIL images, the input every CLIP preprocess expects."""
    return [Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB") for image in images]


class RewardModel:
    """A reward model: ``score(images, prompts)`` -> float64 (N,). Subclasses implement ``score_batch``."""

    name: str = "reward"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def score_batch(self, images: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 16, progress: bool = False,
              desc: str | None = None) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scores = []
        with tqdm(total=len(images), desc=desc or self.name, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(images), batch_size):
                stop = min(start + batch_size, len(images))
                scores.append(self.score_batch(images[start:stop], list(prompts[start:stop])).float().cpu().numpy())
                bar.update(stop - start)
        return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)
