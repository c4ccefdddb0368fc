"""A finished latent cache as a torch Dataset: ``PreferenceCache`` (pairs) and ``RatingCache`` (single images).

Rows are read lazily from the chunk files through memory-mapped safetensors handles; the small
index (global prompt and user numbers) is loaded at once. See ``layout`` for the files.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from diffpref.training.cache import layout as _layout
from diffpref.training.cache.layout import (
    EMPTY_PROMPT_FILE,
    INDEX_FILE,
    META_FILE,
    PAIRS,
    RATINGS,
    STORE_DTYPE,
    Layout,
    chunk_file,
)
from diffpref.training.conditioning import time_ids

# Open chunk files per process; safetensors memory-maps them, so a handle costs little.
OPEN_SHARDS = 16


class _ChunkTable:
    """Row ``i`` of a table stored in consecutive chunk files (``rows`` or ``prompts``); empty chunks have no file."""

    def __init__(self, directory: Path, kind: str, counts: list[int]) -> None:
        self.chunks = [c for c, n in enumerate(counts) if n]
        self.paths = {c: chunk_file(directory, kind, c) for c in self.chunks}
        kept = [counts[c] for c in self.chunks]
        self.starts = [sum(kept[:k]) for k in range(len(kept))]
        self.total = sum(kept)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without open handles; each opens its own.
        return {**self.__dict__, "_handles": OrderedDict()}

    def _handle(self, chunk: int):
        if self._pid != os.getpid():  # forked into a worker: do not share the parent's handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if chunk in self._handles:
            self._handles.move_to_end(chunk)
        else:
            self._handles[chunk] = safe_open(str(self.paths[chunk]), framework="pt")
            if len(self._handles) > OPEN_SHARDS:
                self._handles.popitem(last=False)
        return self._handles[chunk]

    def row(self, index: int, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Row ``index`` over all chunks (only ``names`` when given)."""
        k = bisect.bisect_right(self.starts, index) - 1
        return self.local_row(self.chunks[k], index - self.starts[k], names)

    def local_row(self, chunk: int, offset: int, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        handle = self._handle(chunk)
        return {name: _loaded(handle.get_slice(name)[offset:offset + 1][0]) for name in (names or handle.keys())}


def _loaded(tensor: torch.Tensor) -> torch.Tensor:
    """Stored half precision back to float32; indices and labels as they are."""
    return tensor.float() if tensor.dtype == STORE_DTYPE else tensor


class _LatentCache(Dataset):
    """A finished cache directory as a Dataset of dicts of tensors (float32 latents, prompt conditioning)."""

    layout: Layout

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not a finished cache (no {META_FILE}); build it with "
                                    f"build_{'preference' if self.layout is PAIRS else 'rating'}_cache()")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        version = _layout.CACHE_VERSION
        if self.meta.get("version") != version or self.meta.get("kind") != self.layout.kind:
            raise ValueError(f"{self.path} holds a {self.meta.get('kind')!r} cache of version "
                             f"{self.meta.get('version')}; expected {self.layout.kind!r} version {version}. "
                             "Build it again (the builder writes it under a new key; the old one can be deleted)")
        self._rows = _ChunkTable(self.path, "rows", self.meta["chunks"]["rows"])
        self._prompts = _ChunkTable(self.path, "prompts", self.meta["chunks"]["prompts"])
        self._index = load_file(str(self.path / INDEX_FILE))
        self._empty: dict[str, torch.Tensor] | None = None
        self._value_names = tuple(self.layout.value_columns) + ("original_size", "crop_top_left")

    def __len__(self) -> int:
        return self._rows.total

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.get(index)

    def get(self, index: int, flips: list[bool] | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Item ``index``; ``flips`` (one per image: pairs 2, ratings 1) picks the mirrored image's latents
        (and, for SDXL, its crop) where true. A cache built without random_flip has no mirrored images."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a cache of {len(self)} items")
        columns = self.layout.latent_columns
        flips = [bool(f) for f in flips] if flips is not None else [False] * len(columns)
        if any(flips) and not self.random_flip:
            raise ValueError(f"{self.path} was built without random_flip: it holds no mirrored images")
        names = tuple(f"{c}_flipped" if f else c for c, f in zip(columns, flips))
        extra = ("crop_top_left_flipped",) if any(flips) else ()
        row = self._rows.row(index, names + self._value_names + extra)
        item = {column: row.pop(name) for column, name in zip(columns, names)}
        item.update({name: row[name] for name in self.layout.value_columns})
        item["prompt_index"] = self._index["prompt_index"][index]
        item["user_index"] = self._index["user_index"][index]
        if self.is_sdxl:
            crops = row["crop_top_left"].clone()
            for k, flipped in enumerate(flips):
                if flipped:
                    crops[k] = row["crop_top_left_flipped"][k]
            ids = time_ids(row["original_size"], crops, self.resolution)
            if len(columns) == 1:
                item["time_ids"] = ids[0]
            else:
                item.update({f"time_ids_{k}": ids[k] for k in range(len(columns))})
        item.update(self.prompt_cond(int(item["prompt_index"])))
        return item

    def prompt_cond(self, prompt_index: int) -> dict[str, torch.Tensor]:
        """The cached conditioning of ``prompts[prompt_index]``: prompt_embeds [L, D] (+ pooled [D2] for SDXL)."""
        chunk = int(self._index["prompt_chunk"][prompt_index])
        return self._prompts.local_row(chunk, int(self._index["prompt_row"][prompt_index]))

    @property
    def empty_prompt_cond(self) -> dict[str, torch.Tensor]:
        """The conditioning of "" as ``encode_prompts(pipe, [""])`` gives it (a batch of one, float32)."""
        if self._empty is None:
            if not self.meta.get("empty_prompt"):
                raise ValueError(f"{self.path} was built with empty_prompt=False; rebuild with empty_prompt=True")
            self._empty = load_file(str(self.path / EMPTY_PROMPT_FILE))
        return self._empty

    @property
    def random_flip(self) -> bool:
        """Whether the mirrored images are cached too (``get(index, flips)``)."""
        return bool(self.meta.get("random_flip"))

    @property
    def users(self) -> list[str]:
        """User ids (as strings) in ``user_index`` order."""
        return self.meta["users"]

    @property
    def prompts(self) -> list[str]:
        """Unique prompts in ``prompt_index`` order."""
        return self.meta["prompts"]

    @property
    def resolution(self) -> int:
        return self.meta["resolution"]

    @property
    def skipped(self) -> dict[str, int]:
        """Rows the reader left out, per reason (keys from ``diffpref.data.SKIP_REASONS``)."""
        return self.meta["report"]["skipped"]

    @property
    def is_sdxl(self) -> bool:
        return self.meta["sdxl"]

    @property
    def key(self) -> str:
        return self.meta["key"]


class PreferenceCache(_LatentCache):
    """Cached pairs. Items: latents_0, latents_1 [C, h, w], label (P(image_0 preferred)), user_index,
    prompt_index, prompt_embeds [L, D] and, for SDXL, pooled_prompt_embeds [D2] and each image's time
    ids time_ids_0, time_ids_1 [6] (its original size, crop and the target size)."""

    layout = PAIRS


class RatingCache(_LatentCache):
    """Cached single-image ratings. Items: latents [C, h, w], liked (1.0 / 0.0), user_index, prompt_index,
    prompt_embeds [L, D] and, for SDXL, pooled_prompt_embeds [D2] and time_ids [6]."""

    layout = RATINGS
