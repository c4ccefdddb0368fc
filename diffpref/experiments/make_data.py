"""Preference data from the world: base-model image pairs labelled by simulated users.

For every user and pair: an under-specified world caption (``sample_prompt``), two generations
of the base model with two seeds, the detector's reading of both, and the user's Bradley-Terry
choice. The result is written as Pick-a-Pic v2 parquet, so the same readers and trainers serve
real and simulated data.

Reproducibility: everything random about pair ``p`` of user ``u`` (caption, seeds, the label
draw) is derived from ``(seed, u, p)`` alone, never from a shared stream, so a dataset does not
depend on the batch size, and growing ``pairs_per_user`` or appending users only appends rows.
"""

from __future__ import annotations

import io
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from diffpref.data.pickapic_writer import PickapicWriter, best_image_uid, pickapic_schema
from diffpref.world.captions import sample_prompt
from diffpref.world.detector import Detection, detect_batch
from diffpref.world.render import IMAGE_SIZE
from diffpref.world.users import WorldUser, bradley_terry_choice, oracle_reward, save_users

# The world's own extras after the Pick-a-Pic v2 columns; the Pick-a-Pic readers ignore them.
WORLD_EXTRA_SCHEMA = pa.schema([
    ("world_user_id", pa.string()),
    ("seed_0", pa.int64()),
    ("seed_1", pa.int64()),
    ("reward_0", pa.float64()),
    ("reward_1", pa.float64()),
])
PAIRS_SCHEMA = pickapic_schema(WORLD_EXTRA_SCHEMA)

# Seeds: pair p of user u gets seed + 2 * (u * SEED_STRIDE + p) + {0, 1}. The stride caps pairs per
# user but makes seeds unique within a dataset and independent of pairs_per_user.
SEED_STRIDE = 1 << 24
# Fixed timestamps: wall-clock time would make two runs with the same seed differ.
CREATED_AT_BASE = datetime(2024, 1, 1)
_UID_NAMESPACE = uuid.UUID("6f1d2b0e-8c8e-4f55-9d0a-5b7a3c2e9f10")


@dataclass(frozen=True)
class PairJob:
    """Everything about one pair that is fixed before any image exists."""

    row: int
    user_index: int
    pair_index: int
    caption: str
    seed_0: int
    seed_1: int


def pair_seeds(seed: int, user_index: int, pair_index: int) -> tuple[int, int]:
    """The two generation seeds of one pair (distinct from every other pair's in the dataset)."""
    if not 0 <= pair_index < SEED_STRIDE:
        raise ValueError(f"pair_index {pair_index} is outside [0, {SEED_STRIDE})")
    base = seed + 2 * (user_index * SEED_STRIDE + pair_index)
    return base, base + 1


def pair_rng(seed: int, user_index: int, pair_index: int, stream: int) -> np.random.Generator:
    """An independent generator per (pair, purpose): stream 0 draws the caption, 1 the label."""
    return np.random.default_rng([seed, user_index, pair_index, stream])


def plan_pairs(num_users: int, pairs_per_user: int, seed: int, name_prob: float = 0.5) -> list[PairJob]:
    """Captions and seeds of every pair, user-major (the row order of the parquet file).

    ``name_prob``: how often a caption names each attribute. The two images of a pair share the
    caption, so a named attribute never differs within a pair; lower values leave more attributes
    free to differ, and so more pairs that say something about a taste for them.
    """
    if not 0.0 <= name_prob <= 1.0:
        raise ValueError(f"name_prob must be in [0, 1], got {name_prob}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if pairs_per_user < 1:
        raise ValueError(f"pairs_per_user must be >= 1, got {pairs_per_user}")
    jobs = []
    for u in range(num_users):
        for p in range(pairs_per_user):
            caption = sample_prompt(pair_rng(seed, u, p, 0), p_name=name_prob)
            jobs.append(PairJob(len(jobs), u, p, caption, *pair_seeds(seed, u, p)))
    return jobs


# ----------------------------------------------------------------------------- generation
def world_pipeline(model: Any, device: str | None = None) -> tuple[Any, str]:
    """(pipeline, name): a model name/path is loaded, an already-loaded pipeline is used as is."""
    if isinstance(model, (str, os.PathLike)):
        from diffpref.models.loading import load_pipeline

        return load_pipeline(model, device=device), os.fspath(model)
    if hasattr(model, "set_progress_bar_config"):
        model.set_progress_bar_config(disable=True)  # one bar over all batches, not one per pipeline call
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return model, str(name or type(model).__name__)


def to_world_size(images: np.ndarray) -> np.ndarray:
    """uint8 images at the world's 64x64, which the detector requires (for a pipeline that ignores height/width)."""
    if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)) for im in images])


def generate_in_batches(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                        guidance_scale: float | None, batch_size: int, progress: bool = True,
                        desc: str = "generate", **image_kwargs) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start index, world-sized images) per pipeline call of at most ``batch_size`` images.

    ``image_kwargs`` go to ``diffpref.generate.generate_images`` (e.g. ``user_embedding``).
    """
    from diffpref.generate import iter_generated

    for start, images in iter_generated(pipe, prompts, seeds, steps, guidance_scale, batch_size, progress, desc,
                                        height=IMAGE_SIZE, width=IMAGE_SIZE, **image_kwargs):
        yield start, to_world_size(images)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless encoding: a JPEG round trip would shift colours the detector (and users) see."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_uid(model_name: str, caption: str, seed: int) -> str:
    """A stable uid per generation: the same model, caption and seed always give the same image."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{model_name}\x1f{caption}\x1f{seed}"))


# ----------------------------------------------------------------------------- rows
def pair_row(job: PairJob, user: WorldUser, images: tuple[np.ndarray, np.ndarray],
             detections: tuple[Detection, Detection], label_0: float, model_name: str,
             prompt_counts: Counter) -> dict[str, Any]:
    """One Pick-a-Pic v2 row (plus world extras) for a labelled pair."""
    uids = (image_uid(model_name, job.caption, job.seed_0), image_uid(model_name, job.caption, job.seed_1))
    return {
        "are_different": not np.array_equal(images[0], images[1]),
        "best_image_uid": best_image_uid(label_0, *uids),
        "caption": job.caption,
        "created_at": CREATED_AT_BASE + timedelta(seconds=job.row),
        "has_label": True,
        "image_0_uid": uids[0],
        "image_0_url": "",
        "image_1_uid": uids[1],
        "image_1_url": "",
        "jpg_0": png_bytes(images[0]),
        "jpg_1": png_bytes(images[1]),
        "label_0": float(label_0),
        "label_1": 1.0 - float(label_0),
        "model_0": model_name,
        "model_1": model_name,
        "ranking_id": job.row,
        # Pick-a-Pic user ids are integers: the user's index; its string id is kept alongside.
        "user_id": job.user_index,
        "num_example_per_prompt": prompt_counts[job.caption],
        "world_user_id": user.user_id,
        "seed_0": job.seed_0,
        "seed_1": job.seed_1,
        "reward_0": float(oracle_reward(user, detections[0])),
        "reward_1": float(oracle_reward(user, detections[1])),
    }


# ----------------------------------------------------------------------------- entry point
def check_labelling(users: list[WorldUser], temperature: float, caller: str) -> None:
    """The checks every labelling entry point makes before any work: users present and unique, T >= 0."""
    if not users:
        raise ValueError(f"{caller} needs at least one user")
    ids = [u.user_id for u in users]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate user ids {sorted({i for i in ids if ids.count(i) > 1})}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def make_preference_data(out_dir: str | os.PathLike, users: list[WorldUser], pairs_per_user: int, seed: int,
                         model: Any = "embedded", temperature: float = 0.1, batch_size: int = 64,
                         steps: int = 25, guidance_scale: float | None = None, progress: bool = True,
                         device: str | None = None, name_prob: float = 0.5) -> dict:
    """Generate, label and write ``out_dir/pairs.parquet`` (Pick-a-Pic v2 schema) and ``out_dir/users.json``.

    ``model`` is "embedded", a diffusers folder, a hub id or an already-loaded pipeline.
    Generations of all users share pipeline calls of ``batch_size`` images. Labels are
    ``bradley_terry_choice(user, det_0, det_1, temperature)``: 1.0 image 0 preferred, 0.0
    image 1, 0.5 a tie (only possible at temperature 0, on equal rewards).
    Returns ``{"out_dir", "pairs", "users", "ties", "parquet", "users_file"}``.
    """
    check_labelling(users, temperature, "make_preference_data")
    jobs = plan_pairs(len(users), pairs_per_user, seed, name_prob)
    pipe, model_name = world_pipeline(model, device)
    prompt_counts = Counter(job.caption for job in jobs)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet_path, users_path = out / "pairs.parquet", out / "users.json"
    # Image 2k of the flat list is image 0 of pair k, image 2k+1 its image 1.
    prompts = [job.caption for job in jobs for _ in range(2)]
    seeds = [s for job in jobs for s in (job.seed_0, job.seed_1)]
    batch_size += batch_size % 2  # whole pairs per pipeline call
    ties = 0
    # The writer renames its .tmp file only when done: a crash never leaves a plausible half dataset.
    with PickapicWriter(parquet_path, PAIRS_SCHEMA) as writer:
        for start, images in generate_in_batches(pipe, prompts, seeds, steps, guidance_scale, batch_size,
                                                 progress, desc="make-data"):
            detections = detect_batch(images)
            for k in range(0, len(images), 2):
                job = jobs[(start + k) // 2]
                user = users[job.user_index]
                pair_dets = (detections[k], detections[k + 1])
                label = float(bradley_terry_choice(user, *pair_dets, temperature=temperature,
                                                   rng=pair_rng(seed, job.user_index, job.pair_index, 1)))
                ties += label == 0.5
                writer.write(pair_row(job, user, (images[k], images[k + 1]), pair_dets, label, model_name,
                                      prompt_counts))
    save_users(users, users_path)
    return {"out_dir": str(out), "pairs": len(jobs), "users": len(users), "ties": int(ties),
            "parquet": str(parquet_path), "users_file": str(users_path)}
