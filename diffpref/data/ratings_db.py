"""The ratings database written by the rating app (``diffpref.app.store.RatingStore``): its schema and reader.

The on-disk format lives here, in the data layer, so trainers can read the database directly
(``read_ratings_db``, or ``load_preferences("app.db")``) without importing the app.

Tables (SQLite, WAL mode, version in ``PRAGMA user_version``):

  users(user_id, display_name, created_at, password_hash)
  images(image_id, owner_id -> users, prompt, png, model, seed, created_at)
  pairs(pair_id, user_id -> users, prompt, image_0 -> images, image_1 -> images, created_at)
  ratings(rating_id, pair_id UNIQUE -> pairs, user_id -> users, choice, label, created_at)
  likes(id, user_id -> users, image_id -> images, liked, created_at), one row per (user, image)

``choice`` is what the user clicked: "left" (image_0 preferred, label 1.0), "right" (image_1,
label 0.0), "tie" (label 0.5) or "skip" (no judgement, label NULL). Times are Unix seconds (UTC).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from diffpref.data.errors import DataError, ImageRejected
from diffpref.data.images import DEFAULT_MAX_PIXELS, decode_image
from diffpref.data.loading import (
    LoadResult,
    LoadStats,
    RowJudge,
    check_tie_policy,
    collect,
    progress_bar,
)
from diffpref.data.pickapic_writer import best_image_uid
from diffpref.data.records import PreferencePair, is_tie

SCHEMA_VERSION = 1

# What each button means as a Pick-a-Pic label_0 (the probability that image_0 is preferred).
CHOICE_LABELS: dict[str, float | None] = {"left": 1.0, "right": 0.0, "tie": 0.5, "skip": None}
CHOICES: tuple[str, ...] = tuple(CHOICE_LABELS)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS users (
    user_id       TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL,
    created_at    REAL NOT NULL,
    password_hash TEXT NULL
);
CREATE TABLE IF NOT EXISTS images (
    image_id   TEXT PRIMARY KEY,
    owner_id   TEXT NOT NULL REFERENCES users(user_id),
    prompt     TEXT NOT NULL,
    png        BLOB NOT NULL,
    model      TEXT NOT NULL,
    seed       INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_owner ON images(owner_id);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id    TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(user_id),
    prompt     TEXT NOT NULL,
    image_0    TEXT NOT NULL REFERENCES images(image_id),
    image_1    TEXT NOT NULL REFERENCES images(image_id),
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_user ON pairs(user_id);
CREATE TABLE IF NOT EXISTS ratings (
    rating_id  INTEGER PRIMARY KEY,
    pair_id    TEXT NOT NULL UNIQUE REFERENCES pairs(pair_id),
    user_id    TEXT NOT NULL REFERENCES users(user_id),
    choice     TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'skip')),
    label      REAL NULL CHECK (label IS NULL OR (label >= 0.0 AND label <= 1.0)),
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ratings_user ON ratings(user_id);
CREATE TABLE IF NOT EXISTS likes (
    id         INTEGER PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(user_id),
    image_id   TEXT NOT NULL REFERENCES images(image_id),
    liked      INTEGER NOT NULL CHECK (liked IN (0, 1)),
    created_at REAL NOT NULL,
    UNIQUE (user_id, image_id)
);
"""

# Every rating that is a preference (skips are no judgement and never leave the database),
# with both images, oldest first. Shared with the store's Pick-a-Pic export.
_PREFERENCE_SELECT = """
SELECT r.rating_id, r.pair_id, r.user_id, r.choice, r.label, r.created_at, p.prompt,
       p.image_0, i0.png, i0.model, p.image_1, i1.png, i1.model
FROM ratings r
JOIN pairs p ON p.pair_id = r.pair_id
JOIN images i0 ON i0.image_id = p.image_0
JOIN images i1 ON i1.image_id = p.image_1
WHERE r.choice != 'skip'
"""
PREFERENCE_ROWS_SQL = _PREFERENCE_SELECT + "ORDER BY r.rating_id\n"
# A run of them: from a position (OFFSET: SQLite steps over the rows before it, without reading
# their images) or from a rating id (rating_id is the rowid: a B-tree seek, nothing stepped over).
_ROWS_FROM_POSITION_SQL = PREFERENCE_ROWS_SQL + "LIMIT ? OFFSET ?\n"
_ROWS_FROM_ID_SQL = _PREFERENCE_SELECT + "AND r.rating_id >= ? ORDER BY r.rating_id LIMIT ?\n"
_PREFERENCE_IDS_SQL = "SELECT rating_id FROM ratings WHERE choice != 'skip' ORDER BY rating_id"
PREFERENCE_COUNT_SQL = "SELECT COUNT(*) FROM ratings WHERE choice != 'skip'"


def connect_readonly(path: str | os.PathLike) -> sqlite3.Connection:
    """A read-only connection to a ratings database, checked to be one.

    Read-only matters beyond safety: a read-write connection that is the last to close
    checkpoints the WAL into the main file, which would change the file (and every cache
    key derived from it) just by reading it.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"no such ratings database: {resolved}")
    try:
        conn = sqlite3.connect(f"{resolved.as_uri()}?mode=ro", uri=True, timeout=30.0)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise DataError(f"{resolved}: not a readable SQLite database ({exc})", source=str(resolved)) from exc
    missing = {"users", "images", "pairs", "ratings"} - tables
    if missing or version > SCHEMA_VERSION:
        conn.close()
        why = f"missing table(s) {', '.join(sorted(missing))}" if missing else f"schema version {version} is newer than {SCHEMA_VERSION}"
        raise DataError(
            f"{resolved}: not a diffpref ratings database ({why}); it is written by diffpref.app.store.RatingStore",
            source=str(resolved),
        )
    return conn


def preference_row_ids(path: str | os.PathLike, every: int) -> list[int]:
    """The rating ids at positions ``0, every, 2 * every, ...`` of the preference rows (oldest first),
    in one pass over the ratings table (ids only, no image is read).

    A reader given ``rows=range(i * every, ...)`` and ``seek=ids[i]`` starts at that rating by the
    primary key instead of stepping over the rows before it (the latent cache reads chunk by chunk)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    conn = connect_readonly(path)
    try:
        return [rating_id for position, (rating_id,) in enumerate(conn.execute(_PREFERENCE_IDS_SQL))
                if position % every == 0]
    finally:
        conn.close()


def iter_ratings_db(
    path: str | os.PathLike,
    tie_policy: str = "drop",
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    progress: bool | None = None,
    stats: LoadStats | None = None,
    rows: range | None = None,
    seek: int | None = None,
) -> Iterator[PreferencePair]:
    """Stream usable pairs from a ratings database; see ``read_ratings_db``. ``rows`` (0-based
    positions of the ratings, oldest first) reads only those; ``seek``, the rating id at position
    ``rows.start`` (``preference_row_ids``), finds it by the primary key.

    The path, the schema and the tie policy are checked at once; rows are read as the
    iterator is consumed, all from one snapshot of the database (writers go on meanwhile).
    """
    check_tie_policy(tie_policy)
    if seek is not None and rows is None:
        raise ValueError("seek is the rating id at position rows.start: pass rows too")
    conn = connect_readonly(path)
    if stats is None:
        stats = LoadStats(source=os.fspath(path))
    return _stream(conn, os.fspath(path), tie_policy, strict, max_pixels, limit, progress, stats, rows, seek)


def _stream(
    conn: sqlite3.Connection,
    source: str,
    tie_policy: str,
    strict: bool,
    max_pixels: int | None,
    limit: int | None,
    progress: bool | None,
    stats: LoadStats,
    rows: range | None = None,
    seek: int | None = None,
) -> Iterator[PreferencePair]:
    """The generator behind ``iter_ratings_db``; closes the connection however it ends."""
    judge = RowJudge(stats, strict, source=source, unit="rating")
    yielded = 0
    try:
        if limit is not None and limit <= 0:
            return
        if rows is None:
            total = conn.execute(PREFERENCE_COUNT_SQL).fetchone()[0]
            cursor = conn.execute(PREFERENCE_ROWS_SQL)
        else:  # only the rows asked for leave SQLite (reading from the start per range was quadratic)
            total = len(rows)
            if rows.step != 1:
                raise ValueError(f"rows must be a contiguous range, got {rows}")
            cursor = conn.execute(_ROWS_FROM_POSITION_SQL, (len(rows), rows.start)) if seek is None else \
                conn.execute(_ROWS_FROM_ID_SQL, (seek, len(rows)))
        with progress_bar(total, progress, desc="ratings-db") as bar:
            # One statement: SQLite keeps its read snapshot until the cursor is exhausted.
            for row in cursor:
                stats.rows += 1
                bar.update(1)
                pair = _row_to_pair(row, source, judge, tie_policy, max_pixels)
                if pair is None:
                    continue
                yield pair
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
    finally:
        conn.close()


def _row_to_pair(
    row: tuple, source: str, judge: RowJudge, tie_policy: str, max_pixels: int | None
) -> PreferencePair | None:
    """The pair of one rating, or None after recording why it was skipped."""
    rating_id, pair_id, user_id, choice, label, _created, prompt, uid_0, png_0, model_0, uid_1, png_1, model_1 = row
    if not isinstance(prompt, str) or not prompt.strip():
        judge.skip(rating_id, "empty_caption", f"prompt is {prompt!r}")
        return None
    if label is None:  # the store always writes it; a hand-edited row may not
        label = CHOICE_LABELS.get(choice)
    if label is None:
        judge.skip(rating_id, "label_nan", f"choice {choice!r} has no label")
        return None
    if is_tie(label):
        judge.stats.ties += 1
        if tie_policy == "drop":
            judge.skip(rating_id, "tie", "tie dropped by tie_policy='drop'")
            return None
    images = []
    for name, png in (("image_0", png_0), ("image_1", png_1)):
        try:
            images.append(decode_image(png, max_pixels=max_pixels))
        except ImageRejected as exc:
            judge.skip(rating_id, exc.reason, f"{name}: {exc.detail}")
            return None
    return PreferencePair(
        prompt=prompt.strip(),
        image_0=images[0],
        image_1=images[1],
        label=float(label),
        user_id=str(user_id),
        source_row=f"{source}:rating {rating_id}",
        extras={
            "ranking_id": rating_id,
            "pair_id": pair_id,
            "choice": choice,
            "model_0": model_0,
            "model_1": model_1,
            "image_0_uid": uid_0,
            "image_1_uid": uid_1,
            "best_image_uid": best_image_uid(float(label), uid_0, uid_1),
            "are_different": bytes(png_0) != bytes(png_1),
        },
    )


def read_ratings_db(
    path: str | os.PathLike,
    tie_policy: str = "drop",
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    progress: bool | None = None,
) -> LoadResult:
    """Read the preference pairs of a ratings database (``.sqlite``, ``.sqlite3``, ``.db``) into a LoadResult.

    One pair per rating, oldest first: "left" gives label 1.0 (image_0 preferred), "right"
    0.0, "tie" 0.5 (kept or dropped by ``tie_policy`` as in ``read_pickapic``); "skip"
    ratings and pairs not rated yet are no preference and are not read at all. ``user_id``
    is the app's user id. Skip reasons, ``strict``, ``max_pixels``, ``limit`` and
    ``progress`` are as in ``read_pickapic``; errors name the rating id.
    """
    stats = LoadStats(source=os.fspath(path))
    return collect(iter_ratings_db(path, tie_policy, strict, max_pixels, limit, progress, stats), stats)
