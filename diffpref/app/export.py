"""Exports of the rating store: decided and tie ratings as Pick-a-Pic v2 parquet, likes as a JSONL manifest.

``RatingStore.export_pickapic`` / ``export_likes`` (and ``diffpref data export``) call these. Each
reads one snapshot of the database (``store._read()``: one read transaction), so its counts and
rows agree even while the app writes.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from diffpref.data.pickapic_writer import PickapicWriter, best_image_uid, pickapic_schema
from diffpref.data.ratings_db import CHOICE_LABELS, PREFERENCE_ROWS_SQL

if TYPE_CHECKING:
    from diffpref.app.store import RatingStore

# Rows per parquet row group on export: two full-size images per row, so keep groups small.
EXPORT_ROWS_PER_GROUP = 64

# The app's string user id next to Pick-a-Pic's integer one, and the pair each row came from.
EXPORT_EXTRA_SCHEMA = pa.schema([("app_user_id", pa.string()), ("pair_id", pa.string())])
EXPORT_SCHEMA = pickapic_schema(EXPORT_EXTRA_SCHEMA)


def _timestamp(seconds: float) -> datetime:
    """Unix seconds as the naive UTC datetime Pick-a-Pic's ``created_at`` holds."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).replace(tzinfo=None)


def export_pickapic(store: RatingStore, out_path: str | os.PathLike) -> dict[str, Any]:
    """Write every decided or tie rating as one row of a Pick-a-Pic v2 parquet file (skips are left out).

    Columns and types are those of ``diffpref.data.pickapic_writer.PICKAPIC_V2_SCHEMA`` (as the
    synthetic world writes them), plus ``app_user_id`` (the app's string id; ``user_id`` is the
    user's integer index in creation order, stable across exports) and ``pair_id``. ``jpg_0`` /
    ``jpg_1`` hold the stored PNG bytes unchanged. The file is written from one snapshot of the
    database and only appears under ``out_path`` once complete.

    Returns ``{"path", "pairs", "decided", "ties", "skips_excluded", "users"}``.
    """
    out_path = Path(out_path)
    with store._read() as conn:  # one snapshot: counts and rows agree even while the app writes
        user_index = {uid: i for i, (uid,) in enumerate(conn.execute("SELECT user_id FROM users ORDER BY rowid"))}
        prompt_counts = dict(conn.execute(
            "SELECT p.prompt, COUNT(*) FROM ratings r JOIN pairs p ON p.pair_id = r.pair_id "
            "WHERE r.choice != 'skip' GROUP BY p.prompt"
        ).fetchall())
        skips = conn.execute("SELECT COUNT(*) FROM ratings WHERE choice = 'skip'").fetchone()[0]
        ties, users = 0, set()
        with PickapicWriter(out_path, EXPORT_SCHEMA, rows_per_group=EXPORT_ROWS_PER_GROUP) as writer:
            for row in conn.execute(PREFERENCE_ROWS_SQL):
                (rating_id, pair_id, user_id, choice, label, created_at, prompt,
                 uid_0, png_0, model_0, uid_1, png_1, model_1) = row
                label = float(CHOICE_LABELS[choice] if label is None else label)
                ties += label == 0.5
                users.add(user_id)
                writer.write({
                    "are_different": bytes(png_0) != bytes(png_1),
                    "best_image_uid": best_image_uid(label, uid_0, uid_1),
                    "caption": prompt,
                    "created_at": _timestamp(created_at),
                    "has_label": True,
                    "image_0_uid": uid_0,
                    "image_0_url": "",
                    "image_1_uid": uid_1,
                    "image_1_url": "",
                    "jpg_0": bytes(png_0),
                    "jpg_1": bytes(png_1),
                    "label_0": label,
                    "label_1": 1.0 - label,
                    "model_0": model_0,
                    "model_1": model_1,
                    "ranking_id": rating_id,
                    "user_id": user_index[user_id],
                    "num_example_per_prompt": prompt_counts[prompt],
                    "app_user_id": user_id,
                    "pair_id": pair_id,
                })
            pairs = writer.rows
    return {"path": str(out_path), "pairs": pairs, "decided": pairs - ties, "ties": ties,
            "skips_excluded": skips, "users": len(users)}

def export_likes(store: RatingStore, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write every like/dislike as ``out_dir/ratings.jsonl`` plus the images under ``out_dir/images/``.

    The manifest is what ``diffpref.data.read_jsonl_ratings`` reads: one line per rating with
    "prompt" (the image's prompt), "image" (relative path), "liked", "user_id" (the app's id)
    and, as extras, "image_id", "model", "seed", "created_at". The manifest is replaced only
    once complete. Returns ``{"path", "images_dir", "ratings", "liked", "disliked", "users"}``.
    """
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    manifest, tmp = out / "ratings.jsonl", out / "ratings.jsonl.tmp"
    liked_count, users, count = 0, set(), 0
    with store._read() as conn, open(tmp, "w", encoding="utf-8") as handle:
        rows = conn.execute(
            "SELECT l.user_id, l.image_id, l.liked, l.created_at, i.prompt, i.png, i.model, i.seed "
            "FROM likes l JOIN images i ON i.image_id = l.image_id ORDER BY l.id"
        )
        for user_id, image_id, liked, created_at, prompt, png, model, seed in rows:
            relative = f"images/{image_id}.png"
            (out / relative).write_bytes(bytes(png))
            handle.write(json.dumps({"prompt": prompt, "image": relative, "liked": bool(liked),
                                     "user_id": user_id, "image_id": image_id, "model": model, "seed": seed,
                                     "created_at": created_at}) + "\n")
            count += 1
            liked_count += bool(liked)
            users.add(user_id)
    tmp.replace(manifest)
    return {"path": str(manifest), "images_dir": str(images_dir), "ratings": count, "liked": liked_count,
            "disliked": count - liked_count, "users": len(users)}
