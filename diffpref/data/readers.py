"""Entry points that read preference data from any supported source.

Supported sources:
  * Pick-a-Pic v2 parquet: a ``.parquet`` file, a directory of them, a glob or a list
    (``read_pickapic`` / ``iter_pickapic``);
  * JSONL manifests with images on disk (``read_jsonl_manifest`` for pairs,
    ``read_jsonl_ratings`` for single-image likes/dislikes);
  * the rating app's SQLite database (``read_ratings_db`` / ``iter_ratings_db``).

``load_preferences`` / ``iter_preferences`` pick the reader from the path.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from diffpref.data.loading import LoadResult, LoadStats, RatingsResult, TIE_POLICIES
from diffpref.data.manifest import iter_jsonl_manifest, iter_jsonl_ratings, read_jsonl_manifest, read_jsonl_ratings
from diffpref.data.pickapic import iter_pickapic, read_pickapic
from diffpref.data.ratings_db import iter_ratings_db, read_ratings_db
from diffpref.data.records import PreferencePair

__all__ = [
    "LoadResult",
    "LoadStats",
    "RatingsResult",
    "TIE_POLICIES",
    "iter_jsonl_manifest",
    "iter_jsonl_ratings",
    "iter_pickapic",
    "iter_preferences",
    "iter_ratings_db",
    "load_preferences",
    "read_jsonl_manifest",
    "read_jsonl_ratings",
    "read_pickapic",
    "read_ratings_db",
]

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl",)
RATINGS_DB_SUFFIXES = (".sqlite", ".sqlite3", ".db")

SUPPORTED_FORMATS = (
    "a .parquet file, a directory or glob of .parquet files (Pick-a-Pic v2 schema), "
    "a .jsonl manifest of preference pairs, or a ratings database (.sqlite, .sqlite3, .db)"
)


def _kind(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """Which reader handles ``path``: "parquet", "jsonl" or "ratings_db"; raises for anything else."""
    if not isinstance(path, (str, os.PathLike)):
        return "parquet"  # a list of parquet files (or directories / globs of them)
    text = os.fspath(path)
    if glob.has_magic(text):
        return "parquet"
    resolved = Path(text).expanduser()
    if resolved.is_dir():
        return "parquet"
    suffix = resolved.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in RATINGS_DB_SUFFIXES:
        return "ratings_db"
    if not resolved.exists():
        raise FileNotFoundError(f"no such file or directory: {resolved}")
    shown = suffix or "(no extension)"
    raise ValueError(f"{resolved}: unknown preference data format {shown!r}; expected {SUPPORTED_FORMATS}")


def load_preferences(path: str | os.PathLike | Sequence[str | os.PathLike], **kwargs: Any) -> LoadResult:
    """Read preference pairs from ``path``, choosing the reader from its form and extension.

    Keyword arguments (tie_policy, strict, max_pixels, limit, progress) go to the
    reader; see ``read_pickapic``.
    """
    kind = _kind(path)
    if kind == "jsonl":
        return read_jsonl_manifest(path, **kwargs)
    if kind == "ratings_db":
        return read_ratings_db(path, **kwargs)
    return read_pickapic(path, **kwargs)


def iter_preferences(
    path: str | os.PathLike | Sequence[str | os.PathLike], stats: LoadStats | None = None, **kwargs: Any
) -> Iterator[PreferencePair]:
    """Stream preference pairs from ``path`` (as ``load_preferences``) without keeping them all in memory."""
    kind = _kind(path)
    if kind == "jsonl":
        return iter_jsonl_manifest(path, stats=stats, **kwargs)
    if kind == "ratings_db":
        return iter_ratings_db(path, stats=stats, **kwargs)
    return iter_pickapic(path, stats=stats, **kwargs)
