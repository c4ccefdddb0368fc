"""Readers for JSONL manifests of preference pairs or single-image ratings with images on disk.

Pair line:   {"prompt": "...", "image_0": "a.png", "image_1": "b.png", "label": 1.0, "user_id": "alice"}
Rating line: {"prompt": "...", "image": "a.png", "liked": true, "user_id": "alice"}

Relative image paths are resolved against the manifest's directory, so a manifest
and its images can be moved together. Unknown keys end up in ``extras``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from diffpref.data.errors import DataError, ImageRejected
from diffpref.data.images import DEFAULT_MAX_PIXELS, decode_image
from diffpref.data.loading import (
    LoadResult,
    LoadStats,
    RatingsResult,
    RowJudge,
    check_tie_policy,
    collect,
    parse_label,
    progress_bar,
)
from diffpref.data.records import ImageRating, PreferencePair, is_tie

PAIR_KEYS = frozenset({"prompt", "caption", "image_0", "image_1", "label", "user_id"})
RATING_KEYS = frozenset({"prompt", "caption", "image", "liked", "user_id"})


def _manifest_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, checked to be an existing file."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"no such manifest: {resolved}")
    return resolved


def line_offsets(path: str | os.PathLike, every: int) -> list[int]:
    """Byte offsets of lines ``0, every, 2 * every, ...`` (0-based, blank lines included), in one pass.

    A reader given ``rows=range(i * every, ...)`` and ``seek=offsets[i]`` starts there instead of
    reading the file from its start (the latent cache reads a manifest chunk by chunk)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    offsets, position = [], 0
    with open(_manifest_path(path), "rb") as handle:
        for number, raw in enumerate(handle):
            if number % every == 0:
                offsets.append(position)
            position += len(raw)
    return offsets


def _lines(path: Path, judge: RowJudge, progress: bool | None, rows: range | None = None,
           seek: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line; malformed lines are judged and skipped.
    ``rows`` (0-based line positions, blank lines included) keeps only those lines; the others are
    neither parsed nor counted. ``seek``: the byte offset of line ``rows.start`` (``line_offsets``), so
    the lines before it are not read at all.

    Lines end at each newline byte, as ``line_offsets`` and the cache's row count cut them (the file is
    read as bytes and each line decoded as UTF-8)."""
    if seek is not None and rows is None:
        raise ValueError("seek is the byte offset of line rows.start: pass rows too")
    total = None
    if progress is not False:
        # Counting lines is cheap next to decoding their images, and lets the bar show an ETA.
        with open(path, "rb") as raw:
            total = sum(1 for _ in raw)
    first = 0
    with open(path, "rb") as handle, progress_bar(total, progress, desc=path.name) as bar:
        if seek is not None:
            handle.seek(seek)
            first = rows.start
            bar.update(first)
        # Past the range the rest of the file is not read, not even the next line.
        lines = handle if rows is None else itertools.islice(handle, max(rows.stop - first, 0))
        for number, raw in enumerate(lines, start=first + 1):
            bar.update(1)
            if rows is not None and number - 1 not in rows:
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                judge.skip(number, "malformed_line", f"not UTF-8 text: {exc}")
                continue
            if not text.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                judge.skip(number, "malformed_line", f"invalid JSON: {exc}")
                continue
            if not isinstance(record, dict):
                judge.skip(number, "malformed_line", f"expected a JSON object, got {type(record).__name__}")
                continue
            judge.stats.rows += 1
            yield number, record


def _prompt(record: dict[str, Any], number: int, judge: RowJudge) -> str | None:
    """The line's prompt ("prompt", or "caption" as in Pick-a-Pic), or None after judging it empty."""
    prompt = record.get("prompt", record.get("caption"))
    if not isinstance(prompt, str) or not prompt.strip():
        judge.skip(number, "empty_caption", f"prompt is {prompt!r}")
        return None
    return prompt.strip()


def _image(
    record: dict[str, Any], key: str, base: Path, number: int, judge: RowJudge, max_pixels: int | None
) -> Image.Image | None:
    """The decoded image the line names under ``key``, or None after judging why it is unusable."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        judge.skip(number, "missing_image", f"{key} is {value!r}")
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    try:
        return decode_image(path, max_pixels=max_pixels)
    except ImageRejected as exc:
        judge.skip(number, exc.reason, f"{key}: {exc.detail}")
        return None


def _wrong_kind(path: Path, number: int, found: str, reader: str) -> DataError:
    """A line of the other manifest kind: a file-level mistake, so it raises even when not strict."""
    return DataError(
        f"{path}: line {number} is a {found} line; read this file with {reader}() instead",
        source=str(path),
        row=number,
    )


def iter_jsonl_manifest(
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
    """Stream usable pairs from a JSONL pair manifest; see ``read_jsonl_manifest``.

    Arguments are checked at once; the lines are read as the iterator is consumed. ``rows``
    (0-based line positions) reads only those lines; ``seek`` (from ``line_offsets``) starts there.
    """
    check_tie_policy(tie_policy)
    path = _manifest_path(path)
    if stats is None:
        stats = LoadStats(source=str(path))
    judge = RowJudge(stats, strict, source=str(path), unit="line")
    return _stream_pairs(path, tie_policy, judge, max_pixels, limit, progress, rows, seek)


def _stream_pairs(
    path: Path, tie_policy: str, judge: RowJudge, max_pixels: int | None, limit: int | None, progress: bool | None,
    rows: range | None = None, seek: int | None = None,
) -> Iterator[PreferencePair]:
    """The generator behind ``iter_jsonl_manifest``."""
    stats = judge.stats
    base = path.parent
    yielded = 0
    if limit is not None and limit <= 0:
        return
    for number, record in _lines(path, judge, progress, rows, seek):
        if "image" in record and "image_0" not in record and "image_1" not in record:
            raise _wrong_kind(path, number, "single-image rating", "read_jsonl_ratings")
        prompt = _prompt(record, number, judge)
        if prompt is None:
            continue
        label, reason, detail = parse_label(record.get("label"))
        if label is None:
            judge.skip(number, reason, detail)
            continue
        if is_tie(label):
            stats.ties += 1
            if tie_policy == "drop":
                judge.skip(number, "tie", "tie dropped by tie_policy='drop'")
                continue
        # Both images or neither, so a bad image never shifts image_0/image_1.
        image_0 = _image(record, "image_0", base, number, judge, max_pixels)
        if image_0 is None:
            continue
        image_1 = _image(record, "image_1", base, number, judge, max_pixels)
        if image_1 is None:
            continue
        user_id = record.get("user_id")
        yield PreferencePair(
            prompt=prompt,
            image_0=image_0,
            image_1=image_1,
            label=label,
            user_id="" if user_id is None else str(user_id),
            source_row=f"{path}:{number}",
            extras={k: v for k, v in record.items() if k not in PAIR_KEYS},
        )
        yielded += 1
        if limit is not None and yielded >= limit:
            return


def read_jsonl_manifest(
    path: str | os.PathLike,
    tie_policy: str = "drop",
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    progress: bool | None = None,
) -> LoadResult:
    """Read a JSONL manifest of preference pairs into a LoadResult.

    Each line holds "prompt", "image_0", "image_1" (paths relative to the manifest's
    directory, or absolute), "label" (1.0 = image_0 preferred, 0.0 = image_1,
    0.5 = tie, soft labels allowed) and optionally "user_id". Tie policy, strict
    mode and skip reasons are as in ``read_pickapic``; strict errors give 1-based
    line numbers.
    """
    stats = LoadStats(source=str(path))
    return collect(iter_jsonl_manifest(path, tie_policy, strict, max_pixels, limit, progress, stats), stats)


def _liked(value: Any) -> tuple[bool | None, str | None, str]:
    """(liked, None, "") for a usable "liked" value, else (None, reason, detail)."""
    if value is None:
        return None, "label_nan", "liked is missing"
    if isinstance(value, bool):
        return value, None, ""
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value), None, ""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true", None, ""
    return None, "label_out_of_range", f"liked must be true or false, got {value!r}"


def iter_jsonl_ratings(
    path: str | os.PathLike,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    progress: bool | None = None,
    stats: LoadStats | None = None,
    rows: range | None = None,
    seek: int | None = None,
) -> Iterator[ImageRating]:
    """Stream usable ratings from a JSONL ratings manifest; see ``read_jsonl_ratings``. ``rows``
    (0-based line positions) reads only those lines; ``seek`` (from ``line_offsets``) starts there."""
    path = _manifest_path(path)
    if stats is None:
        stats = LoadStats(source=str(path))
    return _stream_ratings(path, RowJudge(stats, strict, source=str(path), unit="line"), max_pixels, limit, progress,
                           rows, seek)


def _stream_ratings(
    path: Path, judge: RowJudge, max_pixels: int | None, limit: int | None, progress: bool | None,
    rows: range | None = None, seek: int | None = None,
) -> Iterator[ImageRating]:
    """The generator behind ``iter_jsonl_ratings``."""
    yielded = 0
    if limit is not None and limit <= 0:
        return
    for number, record in _lines(path, judge, progress, rows, seek):
        if "image" not in record and ("image_0" in record or "image_1" in record):
            raise _wrong_kind(path, number, "preference pair", "read_jsonl_manifest")
        prompt = _prompt(record, number, judge)
        if prompt is None:
            continue
        liked, reason, detail = _liked(record.get("liked"))
        if liked is None:
            judge.skip(number, reason, detail)
            continue
        image = _image(record, "image", path.parent, number, judge, max_pixels)
        if image is None:
            continue
        user_id = record.get("user_id")
        yield ImageRating(
            prompt=prompt,
            image=image,
            liked=liked,
            user_id="" if user_id is None else str(user_id),
            source_row=f"{path}:{number}",
            extras={k: v for k, v in record.items() if k not in RATING_KEYS},
        )
        yielded += 1
        if limit is not None and yielded >= limit:
            return


def read_jsonl_ratings(
    path: str | os.PathLike,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    progress: bool | None = None,
) -> RatingsResult:
    """Read a JSONL manifest of single-image ratings ("prompt", "image", "liked", "user_id").

    Skip reasons are those of the pair readers; a missing "liked" counts as
    ``label_nan`` and a value other than true/false as ``label_out_of_range``.
    """
    stats = LoadStats(source=str(path))
    ratings = list(iter_jsonl_ratings(path, strict, max_pixels, limit, progress, stats))
    return RatingsResult(ratings=ratings, skipped=stats.skipped, source=stats.source)
