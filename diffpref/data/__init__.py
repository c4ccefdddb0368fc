"""Preference data: records, image validation, readers (Pick-a-Pic parquet, JSONL, ratings DB), a summary."""

from diffpref.data.errors import SKIP_REASONS, DataError, ImageRejected
from diffpref.data.images import DEFAULT_MAX_PIXELS, decode_image, to_rgb
from diffpref.data.inspect import inspect_preferences
from diffpref.data.loading import TIE_POLICIES, LoadResult, LoadStats, RatingsResult
from diffpref.data.readers import (
    iter_jsonl_manifest,
    iter_jsonl_ratings,
    iter_pickapic,
    iter_preferences,
    iter_ratings_db,
    load_preferences,
    read_jsonl_manifest,
    read_jsonl_ratings,
    read_pickapic,
    read_ratings_db,
)
from diffpref.data.records import ImageRating, PreferencePair, pairs_to_ratings

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SKIP_REASONS",
    "TIE_POLICIES",
    "DataError",
    "ImageRating",
    "ImageRejected",
    "LoadResult",
    "LoadStats",
    "PreferencePair",
    "RatingsResult",
    "decode_image",
    "inspect_preferences",
    "iter_jsonl_manifest",
    "iter_jsonl_ratings",
    "iter_pickapic",
    "iter_preferences",
    "iter_ratings_db",
    "load_preferences",
    "pairs_to_ratings",
    "read_jsonl_manifest",
    "read_jsonl_ratings",
    "read_pickapic",
    "read_ratings_db",
    "to_rgb",
]
