"""``diffpref world eval`` without an adapter: prompt adherence of a model on balanced world captions."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffpref.experiments.make_data import generate_in_batches, world_pipeline
from diffpref.world.metrics import adherence_of, balanced_captions


def evaluate_adherence(model: Any = "embedded", num_prompts: int = 240, seed: int = 0, steps: int = 25,
                       guidance_scale: float | None = None, batch_size: int = 60, progress: bool = True,
                       device: str | None = None) -> dict[str, Any]:
    """Generate ``num_prompts`` images for balanced full captions (seeds seed + i) and score adherence.

    ``model`` is "embedded", a diffusers folder, a hub id or an already-loaded pipeline.
    Returns ``{"color_acc", "shape_acc", "background_acc", "mean_acc", "n", "model"}``.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    pipe, model_name = world_pipeline(model, device)
    captions = balanced_captions(num_prompts)
    seeds = [seed + i for i in range(num_prompts)]
    batches = [images for _, images in generate_in_batches(pipe, captions, seeds, steps, guidance_scale, batch_size,
                                                           progress, desc="world-eval")]
    result: dict[str, Any] = adherence_of(np.concatenate(batches), captions)
    result["model"] = model_name
    return result
