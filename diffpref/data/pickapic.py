"""Reader for the Pick-a-Pic v2 parquet schema, streamed in batches."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from diffpref.data.errors import DataError, ImageRejected
from diffpref.data.images import DEFAULT_MAX_PIXELS, decode_image
from diffpref.data.loading import (
    LoadResult,
    LoadStats,
    RowJudge,
    check_tie_policy,
    collect,
    parse_label,
    progress_bar,
)
from diffpref.data.records import PreferencePair, is_tie

REQUIRED_COLUMNS: tuple[str, ...] = ("caption", "jpg_0", "jpg_1", "label_0")
# Read when present; a file without them is still usable.
OPTIONAL_COLUMNS: tuple[str, ...] = ("label_1", "user_id", "has_label")
# Light metadata carried into PreferencePair.extras when present. Everything else
# (URLs, timestamps, ...) is never read from disk at all.
EXTRA_COLUMNS: tuple[str, ...] = (
    "ranking_id",
    "model_0",
    "model_1",
    "image_0_uid",
    "image_1_uid",
    "best_image_uid",
    "are_different",
)

# Pick-a-Pic rows carry two encoded images (~0.1-1 MB each): small batches keep
# memory flat however large the file is.
BATCH_ROWS = 64

ParquetSource = str | os.PathLike | Sequence[str | os.PathLike]


def resolve_parquet_paths(path_or_paths: ParquetSource) -> list[Path]:
    """The parquet files named by a file, a directory (searched recursively), a glob or a list of those."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        sources = [path_or_paths]
    else:
        sources = list(path_or_paths)
    files: list[Path] = []
    for source in sources:
        text = os.fspath(source)
        if glob.has_magic(text):
            matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            if not matched:
                raise FileNotFoundError(f"no files match {text!r}")
            files.extend(matched)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(path.rglob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"no .parquet files under directory {path}")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return files


def _describe(path_or_paths: ParquetSource) -> str:
    """A short name for the source as the caller gave it."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        return os.fspath(path_or_paths)
    return ", ".join(os.fspath(p) for p in path_or_paths)


def _open(path: Path) -> pq.ParquetFile:
    """Open ``path`` and check it has the Pick-a-Pic columns this reader needs."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})", source=str(path)) from exc
    names = parquet.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        parquet.close()
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)}. A Pick-a-Pic v2 parquet file needs "
            f"columns {', '.join(REQUIRED_COLUMNS)} (caption text, two encoded images, label_0 in [0, 1] "
            f"where 1 means jpg_0 is preferred and 0.5 a tie); optional: {', '.join(OPTIONAL_COLUMNS)}. "
            f"Found columns: {', '.join(names)}.",
            source=str(path),
        )
    return parquet


def _image_bytes(cell: Any) -> Any:
    """The encoded bytes of an image cell; also accepts Hugging Face's {"bytes", "path"} struct.

    Only the struct's bytes are used: its path is relative to a machine we know nothing about.
    """
    if isinstance(cell, dict):
        return cell.get("bytes")
    return cell


def iter_pickapic(
    path_or_paths: ParquetSource,
    tie_policy: str = "drop",
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    progress: bool | None = None,
    stats: LoadStats | None = None,
    rows: range | None = None,
) -> Iterator[PreferencePair]:
    """Stream usable pairs from Pick-a-Pic v2 parquet file(s), one batch of rows at a time.

    Arguments are as for ``read_pickapic``; pass a ``LoadStats`` as ``stats`` to read
    the skip report once the iterator is exhausted. ``rows`` (positions over all files in
    order) reads only those rows: the others are neither decoded nor counted, and row groups
    outside it are not read (the latent cache splits a source this way over processes). The tie policy, the paths and
    every file's columns are checked right away, not at the first ``next()``, so a
    bad argument or a wrong file fails before hours of decoding.
    """
    check_tie_policy(tie_policy)
    paths = resolve_parquet_paths(path_or_paths)
    total = 0
    for path in paths:
        with _open(path) as parquet:  # reads only the footer
            total += parquet.metadata.num_rows
    if stats is None:
        stats = LoadStats(source=_describe(path_or_paths))
    return _stream(paths, total, tie_policy, strict, max_pixels, limit, progress, stats, rows)


def _stream(
    paths: list[Path],
    total: int,
    tie_policy: str,
    strict: bool,
    max_pixels: int | None,
    limit: int | None,
    progress: bool | None,
    stats: LoadStats,
    rows: range | None = None,
) -> Iterator[PreferencePair]:
    """The generator behind ``iter_pickapic``: rows of every file in order, row indices per file."""
    if limit is not None and limit <= 0:
        return
    yielded = 0
    offset = 0  # position of the file's first row among all files
    with progress_bar(len(rows) if rows is not None else total, progress, desc="pick-a-pic") as bar:
        for path in paths:
            with _open(path) as parquet:
                judge = RowJudge(stats, strict, source=str(path))
                wanted = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + EXTRA_COLUMNS
                # Only the columns we use are read: URLs, timestamps etc. never leave the disk.
                columns = [c for c in wanted if c in parquet.schema_arrow.names]
                base = offset
                offset += parquet.metadata.num_rows
                groups, row = _row_groups(parquet, base, rows)
                if not groups:
                    continue
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=groups):
                    data = {name: batch.column(name).to_pylist() for name in columns}
                    for i in range(batch.num_rows):
                        if rows is not None and base + row not in rows:
                            row += 1
                            continue
                        cells = {name: values[i] for name, values in data.items()}
                        pair = _row_to_pair(cells, row, judge, tie_policy, max_pixels)
                        row += 1
                        stats.rows += 1
                        bar.update(1)
                        if pair is None:
                            continue
                        yield pair
                        yielded += 1
                        if limit is not None and yielded >= limit:
                            return


def _row_groups(parquet: pq.ParquetFile, offset: int, rows: range | None) -> tuple[list[int], int]:
    """The row groups of a file (whose first row is at ``offset``) that hold any of ``rows``, and the
    file's index of their first row."""
    groups, first, start = [], None, 0
    for group in range(parquet.metadata.num_row_groups):
        count = parquet.metadata.row_group(group).num_rows
        if rows is None or (offset + start < rows.stop and offset + start + count > rows.start):
            groups.append(group)
            first = start if first is None else first
        start += count
    return groups, first or 0


def _row_to_pair(
    cells: dict[str, Any], row: int, judge: RowJudge, tie_policy: str, max_pixels: int | None
) -> PreferencePair | None:
    """The pair in one parquet row, or None after recording why the whole row was skipped."""
    # Cheap checks first, so rows we drop anyway never cost an image decode.
    if cells.get("has_label") is False:
        judge.skip(row, "no_label", "has_label is false")
        return None
    caption = cells["caption"]
    if not isinstance(caption, str) or not caption.strip():
        judge.skip(row, "empty_caption", f"caption is {caption!r}")
        return None
    label, reason, detail = parse_label(cells["label_0"], cells.get("label_1"))
    if label is None:
        judge.skip(row, reason, detail)
        return None
    if is_tie(label):
        judge.stats.ties += 1
        if tie_policy == "drop":
            judge.skip(row, "tie", "tie dropped by tie_policy='drop'")
            return None
    images = []
    # Both images or neither: a pair is skipped as a whole so image_0/image_1 never shift.
    for column in ("jpg_0", "jpg_1"):
        try:
            images.append(decode_image(_image_bytes(cells[column]), max_pixels=max_pixels))
        except ImageRejected as exc:
            judge.skip(row, exc.reason, f"{column}: {exc.detail}")
            return None
    user_id = cells.get("user_id")
    return PreferencePair(
        prompt=caption.strip(),
        image_0=images[0],
        image_1=images[1],
        label=label,
        user_id="" if user_id is None else str(user_id),
        source_row=f"{judge.source}:{row}",
        extras={name: cells[name] for name in EXTRA_COLUMNS if name in cells},
    )


def read_pickapic(
    path_or_paths: ParquetSource,
    tie_policy: str = "drop",
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    progress: bool | None = None,
) -> LoadResult:
    """Read Pick-a-Pic v2 parquet file(s) (a file, a directory, a glob or a list) into a LoadResult.

    ``tie_policy`` is "drop" (default; ties are counted under skipped["tie"]) or
    "soft" (ties kept with label 0.5). Bad rows are skipped whole and counted per
    reason, or raise DataError naming the file and row when ``strict`` is true.
    ``limit`` caps the number of pairs returned; ``progress`` forces the progress
    bar on or off (default: on for large files on a terminal).
    """
    stats = LoadStats(source=_describe(path_or_paths))
    pairs = iter_pickapic(path_or_paths, tie_policy, strict, max_pixels, limit, progress, stats)
    return collect(pairs, stats)
