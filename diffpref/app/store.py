"""The rating app's store: users, their generated images, the pairs shown to them and their ratings.

One SQLite file (schema in ``diffpref.data.ratings_db``) in WAL mode with ``synchronous=FULL``:
a rating is on disk when ``rate`` returns, readers never block the writer, and trainers can read
the same file while the app runs (``load_preferences("app.db")``).

Thread safety: every thread gets its own connection; every write is one ``BEGIN IMMEDIATE``
transaction, so concurrent writers queue on SQLite's lock (``busy_timeout``) instead of failing,
and read-check-write sequences such as "is this pair rated already?" cannot interleave.

Ownership is checked here, on the server, for every call that names a pair or an image: a user
can only see, pair, rate or like images generated for them (``PermissionError`` otherwise). The
app must pass the *authenticated* user id, never one taken from the request.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffpref.app.validation import (
    MAX_DISPLAY_NAME_CHARS,
    MAX_MODEL_CHARS,
    MAX_PASSWORD_HASH_CHARS,
    MAX_PROMPT_CHARS,
    check_choice,
    check_id,
    check_png,
    check_seed,
    check_text,
    check_user_id,
)
from diffpref.data.ratings_db import CHOICE_LABELS, SCHEMA_SQL, SCHEMA_VERSION

BUSY_TIMEOUT_S = 30.0


class NotFoundError(LookupError):
    """A user, image or pair id that is well-formed but not in the store."""


class RatingConflictError(ValueError):
    """A pair that is already rated was rated again with a different choice (ratings are final)."""


# ----------------------------------------------------------------------------- the store
class RatingStore:
    """Users, their images, the pairs shown to them and their ratings, in one SQLite file.

    Safe to share between threads (one connection per thread) and between processes (SQLite
    locking). Every write is durable when its method returns. Use as a context manager, or
    call ``close()``.
    """

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._migrate()

    # -- connections and transactions
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise RuntimeError(f"RatingStore({self.path}) is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: no implicit transactions, we BEGIN/COMMIT ourselves.
            # check_same_thread=False only so that close() may close it from another thread.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")  # persistent; cheap to repeat
            conn.execute("PRAGMA synchronous = FULL")  # per connection: fsync the WAL at every commit
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front: a deferred transaction that
        reads and then writes can fail with SQLITE_BUSY on the lock upgrade, which no timeout retries."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every statement inside sees the same snapshot."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {version} is newer than this diffpref's {SCHEMA_VERSION}; upgrade diffpref"
                )
            if version < SCHEMA_VERSION:
                # executescript() would COMMIT first; statement by statement stays in this transaction.
                for statement in SCHEMA_SQL.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> RatingStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- ownership helpers (inside a transaction)
    @staticmethod
    def _owned_image(conn: sqlite3.Connection, user_id: str, image_id: str) -> tuple:
        row = conn.execute("SELECT owner_id, prompt, png, model, seed, created_at FROM images WHERE image_id = ?",
                           (image_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no image {image_id}")
        if row[0] != user_id:
            raise PermissionError(f"image {image_id} does not belong to user {user_id!r}")
        return row

    @staticmethod
    def _owned_pair(conn: sqlite3.Connection, user_id: str, pair_id: str) -> tuple:
        row = conn.execute("SELECT user_id, prompt, image_0, image_1, created_at FROM pairs WHERE pair_id = ?",
                           (pair_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no pair {pair_id}")
        if row[0] != user_id:
            raise PermissionError(f"pair {pair_id} was not shown to user {user_id!r}")
        return row

    @staticmethod
    def _require_user(conn: sqlite3.Connection, user_id: str) -> None:
        if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
            raise NotFoundError(f"no user {user_id!r}; call ensure_user() first")

    # -- users
    def ensure_user(self, user_id: str, display_name: str | None = None) -> dict[str, Any]:
        """Create the user if missing (display name defaults to the id); a given display name is updated.

        Returns ``{"user_id", "display_name", "created_at"}``.
        """
        check_user_id(user_id)
        name = None if display_name is None else check_text(display_name, "display name", MAX_DISPLAY_NAME_CHARS)
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO users (user_id, display_name, created_at) VALUES (?, ?, ?)",
                         (user_id, name or user_id, time.time()))
            if name is not None:
                conn.execute("UPDATE users SET display_name = ? WHERE user_id = ?", (name, user_id))
            row = conn.execute("SELECT display_name, created_at FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return {"user_id": user_id, "display_name": row[0], "created_at": row[1]}

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        """``{"user_id", "display_name", "created_at", "password_hash"}``, or None for an unknown user."""
        check_user_id(user_id)
        with self._read() as conn:
            row = conn.execute("SELECT display_name, created_at, password_hash FROM users WHERE user_id = ?",
                               (user_id,)).fetchone()
        if row is None:
            return None
        return {"user_id": user_id, "display_name": row[0], "created_at": row[1], "password_hash": row[2]}

    def set_password_hash(self, user_id: str, password_hash: str | None) -> None:
        """Store a password hash made by the caller (e.g. hashlib.scrypt); None removes it. Never a password."""
        check_user_id(user_id)
        if password_hash is not None:
            password_hash = check_text(password_hash, "password hash", MAX_PASSWORD_HASH_CHARS)
        with self._write() as conn:
            self._require_user(conn, user_id)
            conn.execute("UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id))

    # -- images and pairs
    def add_image(self, owner_id: str, prompt: str, png_bytes: bytes, model: str, seed: int) -> str:
        """Store a PNG generated for ``owner_id`` (who must exist) and return its new image id."""
        check_user_id(owner_id)
        prompt = check_text(prompt, "prompt", MAX_PROMPT_CHARS, allow_newlines=True)
        png = check_png(png_bytes)
        model = check_text(model, "model", MAX_MODEL_CHARS)
        seed = check_seed(seed)
        image_id = uuid.uuid4().hex
        with self._write() as conn:
            self._require_user(conn, owner_id)
            conn.execute(
                "INSERT INTO images (image_id, owner_id, prompt, png, model, seed, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (image_id, owner_id, prompt, png, model, seed, time.time()),
            )
        return image_id

    def get_image(self, user_id: str, image_id: str) -> bytes:
        """The PNG bytes of an image; PermissionError unless ``user_id`` owns it, NotFoundError if unknown."""
        check_user_id(user_id)
        check_id(image_id, "image id")
        with self._read() as conn:
            return bytes(self._owned_image(conn, user_id, image_id)[2])

    def add_pair(self, user_id: str, prompt: str, image_id_0: str, image_id_1: str) -> str:
        """Record that the two images (both owned by ``user_id``, else PermissionError) are shown as a pair.

        ``prompt`` is the caption the pair is trained with. Returns the new pair id.
        """
        check_user_id(user_id)
        prompt = check_text(prompt, "prompt", MAX_PROMPT_CHARS, allow_newlines=True)
        check_id(image_id_0, "image id")
        check_id(image_id_1, "image id")
        if image_id_0 == image_id_1:
            raise ValueError(f"a pair needs two different images, got {image_id_0} twice")
        pair_id = uuid.uuid4().hex
        with self._write() as conn:
            self._owned_image(conn, user_id, image_id_0)
            self._owned_image(conn, user_id, image_id_1)
            conn.execute(
                "INSERT INTO pairs (pair_id, user_id, prompt, image_0, image_1, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (pair_id, user_id, prompt, image_id_0, image_id_1, time.time()),
            )
        return pair_id

    def get_pair(self, user_id: str, pair_id: str) -> dict[str, Any]:
        """``{"pair_id", "user_id", "prompt", "image_0", "image_1", "created_at", "choice"}`` of a pair shown to
        ``user_id`` (PermissionError otherwise); ``choice`` is None until it is rated."""
        check_user_id(user_id)
        check_id(pair_id, "pair id")
        with self._read() as conn:
            row = self._owned_pair(conn, user_id, pair_id)
            rated = conn.execute("SELECT choice FROM ratings WHERE pair_id = ?", (pair_id,)).fetchone()
        return {"pair_id": pair_id, "user_id": user_id, "prompt": row[1], "image_0": row[2], "image_1": row[3],
                "created_at": row[4], "choice": rated[0] if rated else None}

    # -- feedback
    def rate(self, user_id: str, pair_id: str, choice: str) -> dict[str, Any]:
        """Record ``user_id``'s choice for a pair shown to them: "left", "right", "tie" or "skip".

        Exactly once per pair: rating it again with the same choice (a retried request, a
        double click) returns the stored rating with ``created`` False and writes nothing;
        a *different* choice raises RatingConflictError, since ratings are final (a changed
        mind would silently rewrite data a model may already be trained on). Raises
        PermissionError if the pair was shown to another user, NotFoundError if unknown.

        Returns ``{"rating_id", "pair_id", "user_id", "choice", "label", "created_at", "created"}``
        where ``label`` is 1.0 (left), 0.0 (right), 0.5 (tie) or None (skip).
        """
        check_user_id(user_id)
        check_id(pair_id, "pair id")
        check_choice(choice)
        with self._write() as conn:
            self._owned_pair(conn, user_id, pair_id)
            existing = conn.execute(
                "SELECT rating_id, choice, label, created_at FROM ratings WHERE pair_id = ?", (pair_id,)
            ).fetchone()
            if existing is not None:
                if existing[1] != choice:
                    raise RatingConflictError(
                        f"pair {pair_id} is already rated {existing[1]!r}; ratings are final, so {choice!r} was not stored"
                    )
                rating_id, _, label, created_at = existing
                created = False
            else:
                label, created_at = CHOICE_LABELS[choice], time.time()
                cursor = conn.execute(
                    "INSERT INTO ratings (pair_id, user_id, choice, label, created_at) VALUES (?, ?, ?, ?, ?)",
                    (pair_id, user_id, choice, label, created_at),
                )
                rating_id, created = cursor.lastrowid, True
        return {"rating_id": rating_id, "pair_id": pair_id, "user_id": user_id, "choice": choice, "label": label,
                "created_at": created_at, "created": created}

    def like(self, user_id: str, image_id: str, liked: bool) -> dict[str, Any]:
        """Record a like (True) or dislike (False) of one of ``user_id``'s images; the latest call wins.

        Returns ``{"user_id", "image_id", "liked", "created_at"}``.
        """
        check_user_id(user_id)
        check_id(image_id, "image id")
        if not isinstance(liked, bool):
            raise ValueError(f"liked must be True or False, got {liked!r}")
        now = time.time()
        with self._write() as conn:
            self._owned_image(conn, user_id, image_id)
            conn.execute(
                "INSERT INTO likes (user_id, image_id, liked, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_id, image_id) DO UPDATE SET liked = excluded.liked, created_at = excluded.created_at",
                (user_id, image_id, int(liked), now),
            )
        return {"user_id": user_id, "image_id": image_id, "liked": liked, "created_at": now}

    # -- queries
    def ratings_for(self, user_id: str) -> list[dict[str, Any]]:
        """The user's ratings, oldest first: rate()'s dict (without ``created``) plus prompt, image_0, image_1."""
        check_user_id(user_id)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT r.rating_id, r.pair_id, r.choice, r.label, r.created_at, p.prompt, p.image_0, p.image_1 "
                "FROM ratings r JOIN pairs p ON p.pair_id = r.pair_id WHERE r.user_id = ? ORDER BY r.rating_id",
                (user_id,),
            ).fetchall()
        keys = ("rating_id", "pair_id", "choice", "label", "created_at", "prompt", "image_0", "image_1")
        return [{"user_id": user_id, **dict(zip(keys, row))} for row in rows]

    def _pairs(self, user_id: str, pending_only: bool) -> list[dict[str, Any]]:
        check_user_id(user_id)
        where = " AND r.rating_id IS NULL" if pending_only else ""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT p.pair_id, p.prompt, p.image_0, p.image_1, p.created_at, r.choice "
                "FROM pairs p LEFT JOIN ratings r ON r.pair_id = p.pair_id "
                f"WHERE p.user_id = ?{where} ORDER BY p.rowid",
                (user_id,),
            ).fetchall()
        keys = ("pair_id", "prompt", "image_0", "image_1", "created_at", "choice")
        return [{"user_id": user_id, **dict(zip(keys, row))} for row in rows]

    def pairs_for(self, user_id: str) -> list[dict[str, Any]]:
        """Every pair shown to the user, oldest first, as ``get_pair`` returns them (``choice`` None if unrated)."""
        return self._pairs(user_id, pending_only=False)

    def pending_pairs(self, user_id: str) -> list[dict[str, Any]]:
        """The pairs shown to the user but not rated yet, oldest first (as ``pairs_for``)."""
        return self._pairs(user_id, pending_only=True)

    def count_ratings(self, user_id: str | None = None) -> int:
        """How many ratings (skips included) the store holds, for one user or for everyone."""
        with self._read() as conn:
            if user_id is None:
                return conn.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
            check_user_id(user_id)
            return conn.execute("SELECT COUNT(*) FROM ratings WHERE user_id = ?", (user_id,)).fetchone()[0]

    def rated_examples(self, user_id: str, limit: int | None = None) -> list[tuple[str, bytes, bytes]]:
        """``(prompt, preferred_png, rejected_png)`` of the user's decided ratings (left/right; ties and skips
        say nothing about taste), oldest first; with ``limit`` only the most recent ones. For building the
        user's embedding."""
        check_user_id(user_id)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        with self._read() as conn:
            rows = conn.execute(
                "SELECT p.prompt, r.choice, i0.png, i1.png FROM ratings r "
                "JOIN pairs p ON p.pair_id = r.pair_id "
                "JOIN images i0 ON i0.image_id = p.image_0 JOIN images i1 ON i1.image_id = p.image_1 "
                "WHERE r.user_id = ? AND r.choice IN ('left', 'right') ORDER BY r.rating_id DESC LIMIT ?",
                (user_id, -1 if limit is None else limit),
            ).fetchall()
        rows.reverse()
        return [(prompt, bytes(png_0), bytes(png_1)) if choice == "left" else (prompt, bytes(png_1), bytes(png_0))
                for prompt, choice, png_0, png_1 in rows]

    def likes_for(self, user_id: str) -> list[dict[str, Any]]:
        """The user's likes and dislikes, oldest first: ``{"image_id", "liked", "created_at"}``."""
        check_user_id(user_id)
        with self._read() as conn:
            rows = conn.execute("SELECT image_id, liked, created_at FROM likes WHERE user_id = ? ORDER BY id",
                                (user_id,)).fetchall()
        return [{"user_id": user_id, "image_id": i, "liked": bool(liked), "created_at": t} for i, liked, t in rows]

    # -- export (diffpref.app.export)
    def export_pickapic(self, out_path: str | os.PathLike) -> dict[str, Any]:
        """Every decided or tie rating as a Pick-a-Pic v2 parquet file; see ``export.export_pickapic``."""
        from diffpref.app.export import export_pickapic

        return export_pickapic(self, out_path)

    def export_likes(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Every like/dislike as ``ratings.jsonl`` plus images; see ``export.export_likes``."""
        from diffpref.app.export import export_likes

        return export_likes(self, out_dir)
