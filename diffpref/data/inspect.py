"""A one-glance summary of a preference data source (behind ``diffpref data inspect``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from diffpref.data.images import DEFAULT_MAX_PIXELS
from diffpref.data.loading import LoadStats
from diffpref.data.readers import iter_preferences


def inspect_preferences(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    tie_policy: str = "drop",
    strict: bool = False,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool | None = None,
) -> dict[str, Any]:
    """``{"pairs": N, "users": U, "ties": T, "skipped": {reason: count}}`` for ``path``.

    ``pairs`` counts usable pairs under ``tie_policy``; ``users`` the distinct user
    ids among them; ``ties`` every tie row seen, kept or not. Every image is decoded
    to validate it and then dropped, so memory stays flat however large the file.
    """
    stats = LoadStats(source=os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path))
    pairs = 0
    users: set[str] = set()
    stream = iter_preferences(
        path, stats=stats, tie_policy=tie_policy, strict=strict, max_pixels=max_pixels, progress=progress
    )
    for pair in stream:
        pairs += 1
        users.add(pair.user_id)
    return {
        "pairs": pairs,
        "users": len(users),
        "ties": stats.ties,
        "skipped": dict(sorted(stats.skipped.items())),
    }
