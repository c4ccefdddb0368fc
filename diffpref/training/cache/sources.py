"""Cut a data source into chunks of source rows and decode them, in DataLoader workers.

A chunk is a run of consecutive source rows (parquet rows over all files in order, JSONL
lines, ratings of a database oldest first; ``layout.CHUNK_ROWS``). Each chunk is read with the ordinary readers
(``rows=``), so skips, ties and labels are exactly what a plain read gives. Reading is linear in the
source: parquet finds a chunk's row groups from the footer, and for JSONL / a ratings database
``chunk_seeks`` finds where every chunk starts in one pass (byte offsets / rating ids), so no chunk
is read by scanning from the start of the file. Chunks are decoded into
what the encoders take: uint8 pixels already resized and centre-cropped, plus each image's
original size and crop (SDXL's time ids) and, for flips, the crop of the mirrored image.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from diffpref.data import (
    LoadStats,
    iter_jsonl_ratings,
    iter_preferences,
    pairs_to_ratings,
)
from diffpref.data.pickapic import resolve_parquet_paths
from diffpref.training.cache import layout as _layout
from diffpref.training.cache.layout import PAIRS, Layout, PairSource
from diffpref.training.conditioning import flipped_crop, prepare_image


def describe(data_path: PairSource) -> str:
    if isinstance(data_path, (str, os.PathLike)):
        return os.fspath(data_path)
    return ", ".join(os.fspath(p) for p in data_path)


def source_rows(data_path: PairSource) -> int:
    """How many source rows there are (read from metadata or by counting lines: no image is decoded)."""
    from diffpref.data.readers import RATINGS_DB_SUFFIXES

    if isinstance(data_path, (str, os.PathLike)):
        path = Path(data_path).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with open(path, "rb") as handle:
                return sum(1 for _ in handle)
        if suffix in RATINGS_DB_SUFFIXES:
            from diffpref.data.ratings_db import PREFERENCE_COUNT_SQL, connect_readonly

            conn = connect_readonly(path)
            try:
                return int(conn.execute(PREFERENCE_COUNT_SQL).fetchone()[0])
            finally:
                conn.close()
    import pyarrow.parquet as pq

    total = 0
    for path in resolve_parquet_paths(data_path):
        with pq.ParquetFile(path) as parquet:
            total += parquet.metadata.num_rows
    return total


def num_chunks(data_path: PairSource) -> int:
    return max(-(-source_rows(data_path) // _layout.CHUNK_ROWS), 1)


def rank_chunks(chunks: int, rank: int, world_size: int) -> range:
    """Process ``rank``'s share: a contiguous block, so each reads only its part of the files."""
    return range(rank * chunks // world_size, (rank + 1) * chunks // world_size)


def chunk_seeks(data_path: PairSource) -> list[int]:
    """Where each chunk starts, found in one pass over the source: the byte offset of its first line (JSONL)
    or the rating id of its first rating (ratings database); [] for parquet (its footer has the row groups)."""
    from diffpref.data.manifest import line_offsets
    from diffpref.data.ratings_db import preference_row_ids
    from diffpref.data.readers import RATINGS_DB_SUFFIXES

    if isinstance(data_path, (str, os.PathLike)):
        suffix = Path(data_path).suffix.lower()
        if suffix == ".jsonl":
            return line_offsets(data_path, _layout.CHUNK_ROWS)
        if suffix in RATINGS_DB_SUFFIXES:
            return preference_row_ids(data_path, _layout.CHUNK_ROWS)
    return []


def chunk_source_rows(chunk: int) -> range:
    return range(chunk * _layout.CHUNK_ROWS, (chunk + 1) * _layout.CHUNK_ROWS)


def _seek_of(seeks: list[int], chunk: int) -> dict[str, int]:
    """The reader argument that starts chunk ``chunk`` where it is (none for parquet or past the end)."""
    return {"seek": seeks[chunk]} if chunk < len(seeks) else {}


def iter_chunk_pairs(data_path: PairSource, chunk: int, seeks: list[int], tie_policy: str,
                     stats: LoadStats | None = None) -> Iterable:
    """The usable pairs of chunk ``chunk`` (``seeks`` from ``chunk_seeks``), as a plain read gives them."""
    return iter_preferences(data_path, stats=stats, tie_policy=tie_policy, progress=False,
                            rows=chunk_source_rows(chunk), **_seek_of(seeks, chunk))


class ChunkReader(Dataset):
    """Item ``i``: chunk ``chunks[i]`` decoded (see ``decode``); picklable, so DataLoader workers decode.
    Setting ``chunks`` finds where they start in the source (``chunk_seeks``) once, before workers fork."""

    def __init__(self, data_path: PairSource, chunks: list[int], layout: Layout, resolution: int,
                 tie_policy: str, from_pairs: bool, flip: bool) -> None:
        self.data_path, self.layout = data_path, layout
        self.resolution, self.tie_policy, self.from_pairs, self.flip = resolution, tie_policy, from_pairs, flip
        self.seeks: list[int] = []
        self.chunks = chunks

    @property
    def chunks(self) -> list[int]:
        return self._chunks

    @chunks.setter
    def chunks(self, chunks: list[int]) -> None:
        self._chunks = list(chunks)
        if self._chunks and not self.seeks:
            self.seeks = chunk_seeks(self.data_path)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = self.chunks[index]
        stats = LoadStats(source=describe(self.data_path))
        return {"chunk": chunk, **self.decode(self._records(chunk, stats)), "report": _report(stats)}

    def _records(self, chunk: int, stats: LoadStats) -> Iterable[tuple[list, str, str, dict[str, float]]]:
        """(images, prompt, user, values) of every usable row of chunk ``chunk``, in source order."""
        if self.layout is PAIRS:
            pairs = iter_chunk_pairs(self.data_path, chunk, self.seeks, self.tie_policy, stats)
            return (([p.image_0, p.image_1], p.prompt, p.user_id, {"label": p.label}) for p in pairs)
        if self.from_pairs:
            pairs = iter_chunk_pairs(self.data_path, chunk, self.seeks, self.tie_policy, stats)
            ratings: Iterable = (r for pair in pairs for r in pairs_to_ratings([pair]))
        else:
            ratings = iter_jsonl_ratings(self.data_path, stats=stats, progress=False, rows=chunk_source_rows(chunk),
                                         **_seek_of(self.seeks, chunk))
        return (([r.image], r.prompt, r.user_id, {"liked": float(r.liked)}) for r in ratings)

    def decode(self, records: Iterable[tuple[list, str, str, dict[str, float]]]) -> dict[str, Any]:
        """Pixels [n, r, r, 3] per latent column (and mirrored, with flips), original sizes and crops
        [n, images, 2] (mirrored crops too), prompts, users and value columns of the records."""
        columns = len(self.layout.latent_columns)
        pixels: list[list[np.ndarray]] = [[] for _ in range(columns)]
        sizes, crops, flipped_crops, prompts, users = [], [], [], [], []
        values: dict[str, list[float]] = {name: [] for name in self.layout.value_columns}
        for images, prompt, user, row_values in records:
            row_sizes, row_crops, row_flipped = [], [], []
            for column, image in enumerate(images):
                array, size, crop, width = prepare_image(image, self.resolution)
                pixels[column].append(array)
                row_sizes.append(size)
                row_crops.append(crop)
                row_flipped.append(flipped_crop(crop, width, self.resolution))
            sizes.append(row_sizes)
            crops.append(row_crops)
            flipped_crops.append(row_flipped)
            prompts.append(prompt)
            users.append(user)
            for name, column_values in values.items():
                column_values.append(row_values[name])
        shape = (0, self.resolution, self.resolution, 3)
        return {
            "pixels": [np.stack(column) if column else np.zeros(shape, np.uint8) for column in pixels],
            "original_size": np.asarray(sizes, np.int64).reshape(-1, columns, 2),
            "crop_top_left": np.asarray(crops, np.int64).reshape(-1, columns, 2),
            "crop_top_left_flipped": np.asarray(flipped_crops, np.int64).reshape(-1, columns, 2),
            "prompts": prompts, "users": users, "values": values,
        }


def _report(stats: LoadStats) -> dict[str, Any]:
    return {"rows": stats.rows, "ties": stats.ties, "skipped": dict(stats.skipped)}
