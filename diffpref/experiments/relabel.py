"""More preference data without new images: existing world pairs rated again by other users.

Generating images is the slow part of ``make-data`` (~13 images/s on 2 cores); the oracle is
not. A pool of already generated pairs (any ``make-data`` output) can be rated by any number of
simulated users, each choosing through their own Bradley-Terry model on the detector's reading.
Beyond the amount of data, this gives what a user-conditioned objective needs most: the *same*
pair preferred one way by one user and the other way by another, so only the user can explain
the label (counterfactual pairs, which a pool of per-user images rarely holds).

Reproducibility: which pool pairs user ``u`` rates, and their label draws, depend on
``(seed, u)`` and the pool alone, as in ``make_data``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from diffpref.data.errors import ImageRejected
from diffpref.data.images import decode_image
from diffpref.data.pickapic_writer import PickapicWriter, best_image_uid
from diffpref.experiments.make_data import (
    CREATED_AT_BASE,
    PAIRS_SCHEMA,
    check_labelling,
    pair_rng,
)
from diffpref.world.detector import detect_batch, feature_matrix
from diffpref.world.users import (
    WorldUser,
    bradley_terry_choice,
    oracle_reward,
    save_users,
)

# The pool's columns that are copied unchanged into every rating of a pair.
_POOL_COLUMNS = ("are_different", "caption", "image_0_uid", "image_0_url", "image_1_uid", "image_1_url",
                 "jpg_0", "jpg_1", "model_0", "model_1", "seed_0", "seed_1")
DETECT_BATCH = 512


def _read_pool(sources: list[Path]) -> tuple[dict[str, list], list[tuple[Path, int]]]:
    """The pool's columns over all ``sources`` (concatenated), and each row's (file, row in file)."""
    pool: dict[str, list] = {name: [] for name in _POOL_COLUMNS}
    origin: list[tuple[Path, int]] = []
    for source in sources:
        part = _read_one_pool(source)
        for name in _POOL_COLUMNS:
            pool[name].extend(part[name])
        origin.extend((source, row) for row in range(len(part["caption"])))
    return pool, origin


def read_columns(source: Path, columns: tuple[str, ...], missing_hint: str) -> dict[str, list]:
    """``columns`` of a world parquet file as lists; a clear error names a missing file, column or empty file."""
    if not source.is_file():
        raise FileNotFoundError(f"no such pair file: {source} (make one with `diffpref world make-data`)")
    table = pq.read_table(source, columns=[c for c in columns if c in pq.read_schema(source).names])
    missing = sorted(set(columns) - set(table.schema.names))
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; {missing_hint}")
    if table.num_rows == 0:
        raise ValueError(f"{source}: the file has no pairs")
    return {name: table.column(name).to_pylist() for name in columns}


def _read_one_pool(source: Path) -> dict[str, list]:
    return read_columns(source, _POOL_COLUMNS, "relabel reads `diffpref world make-data` output (its seed_0/seed_1 "
                                               "columns name the generations)")


def _decode(blob: bytes, source: Path, row: int) -> np.ndarray:
    try:
        return np.asarray(decode_image(blob))
    except ImageRejected as err:
        raise ValueError(f"{source}: row {row}: image does not decode ({err}); regenerate the pool") from err


def detect_pool(pool: dict[str, list], origin: list[tuple[Path, int]], progress: bool = True) -> tuple[list, list]:
    """The detector's reading of both images of every pool pair."""
    dets: tuple[list, list] = ([], [])
    n = len(pool["caption"])
    for start in tqdm(range(0, n, DETECT_BATCH), desc="detect pool", disable=not progress, dynamic_ncols=True):
        rows = range(start, min(start + DETECT_BATCH, n))
        for side in (0, 1):
            images = np.stack([_decode(pool[f"jpg_{side}"][r], *origin[r]) for r in rows])
            dets[side].extend(detect_batch(images))
    return dets


def relabel_pairs(source: str | os.PathLike | list[str | os.PathLike], out_dir: str | os.PathLike, users: list[WorldUser],
                  pairs_per_user: int, seed: int, temperature: float = 0.1, decided_only: bool = False,
                  progress: bool = True) -> dict:
    """Write ``out_dir/pairs.parquet``: each user rates ``pairs_per_user`` distinct pairs of the pool.

    ``source`` is a ``make-data`` parquet file or a list of them (one pool); images and captions are
    reused, labels ignored.
    ``decided_only``: a user only rates pairs whose two images their oracle scores differently. A user
    who cares about one colour is indifferent to most pairs, and Bradley-Terry makes each of those a
    coin flip: ~70 % of such a user's labels would be noise (an indifferent person would vote tie or skip).
    Rows are user-major, with the schema of ``make_data`` (so all readers and trainers take it).
    Returns ``{"out_dir", "pairs", "users", "pool", "ties", "parquet", "users_file"}``.
    """
    sources = [Path(s) for s in (source if isinstance(source, (list, tuple)) else [source])]
    check_labelling(users, temperature, "relabel_pairs")
    pool, origin = _read_pool(sources)
    size = len(pool["caption"])
    if not 1 <= pairs_per_user <= size:
        raise ValueError(f"pairs_per_user must be in [1, {size}] (the pool's pairs), got {pairs_per_user}")
    det_0, det_1 = detect_pool(pool, origin, progress)
    features_0, features_1 = feature_matrix(det_0), feature_matrix(det_1)
    # Which pairs each user rates: a permutation per user, so users overlap on many pairs.
    chosen = []
    for u, user in enumerate(users):
        order = np.random.default_rng([seed, u, 2]).permutation(size)
        if decided_only:
            w = user.weight_vector()
            order = order[(features_0[order] @ w) != (features_1[order] @ w)]
            if len(order) < pairs_per_user:
                raise ValueError(f"user {user.user_id!r} prefers one image in only {len(order)} of the pool's {size} "
                                 f"pairs, fewer than pairs_per_user={pairs_per_user}: lower it or use a larger pool")
        chosen.append(order[:pairs_per_user])
    prompt_counts = Counter(pool["caption"][i] for rows in chosen for i in rows)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet_path, users_path = out / "pairs.parquet", out / "users.json"
    ties = row = 0
    with PickapicWriter(parquet_path, PAIRS_SCHEMA) as writer:
        for u, user in enumerate(tqdm(users, desc="relabel", disable=not progress, dynamic_ncols=True)):
            for p, i in enumerate(chosen[u].tolist()):
                label = float(bradley_terry_choice(user, det_0[i], det_1[i], temperature=temperature,
                                                   rng=pair_rng(seed, u, p, 1)))
                ties += label == 0.5
                record = {name: pool[name][i] for name in _POOL_COLUMNS}
                record.update({
                    "best_image_uid": best_image_uid(label, pool["image_0_uid"][i], pool["image_1_uid"][i]),
                    "created_at": CREATED_AT_BASE + np.timedelta64(row, "s").item(),
                    "has_label": True, "label_0": label, "label_1": 1.0 - label, "ranking_id": row,
                    "user_id": u, "num_example_per_prompt": prompt_counts[pool["caption"][i]],
                    "world_user_id": user.user_id,
                    "reward_0": float(oracle_reward(user, det_0[i])), "reward_1": float(oracle_reward(user, det_1[i])),
                })
                writer.write(record)
                row += 1
    save_users(users, users_path)
    return {"out_dir": str(out), "pairs": row, "users": len(users), "pool": size, "ties": int(ties),
            "parquet": str(parquet_path), "users_file": str(users_path)}
