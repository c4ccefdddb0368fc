"""Encode preference data once: VAE latents and prompt embeddings on disk, read back as a torch Dataset.

A trainer that ran the VAE and the text encoder(s) every step would spend most of its time
(and, for SDXL, most of its memory) re-computing the same numbers. ``build_preference_cache``
streams the pairs of a data file, encodes every image and every unique prompt once, and
writes safetensors shards to ``cache_root/<key>``:

  rows-00000.safetensors     latents_0, latents_1 [n, C, h, w] fp16, label [n], prompt_index [n], user_index [n]
                             (a rating cache has latents [n, C, h, w] and liked [n] instead)
  prompts-00000.safetensors  prompt_embeds [p, L, D] fp16 (+ pooled_prompt_embeds [p, D2] for SDXL)
  empty_prompt.safetensors   the conditioning of "" (trainers drop some prompts to keep guidance working)
  meta.json                  users, prompts, counts, the reader's skip report, the key material

The key is a hash of everything the cached numbers depend on: the data files (path, size,
mtime and a hash of their first and last 64 KiB; for a JSONL manifest also the size and mtime
of every image it names), the tie policy, the resolution, and the model (a hash of a
deterministic sample of the VAE's and text encoders' weights, their configs, the tokenizers).
Change any of them and the cache is rebuilt under a new key; with the same inputs the finished
cache is reused without encoding anything.

A build writes into ``<key>.tmp-<pid>`` and renames it to ``<key>`` only when complete, so an
interrupted build is never mistaken for a finished cache. In multi-process training, build on
the main process first, then open the cache everywhere (concurrent builds are safe but wasteful).

Why one file of ~500 lines: the key, the writer and the two readers (pairs, ratings) all depend on
the on-disk layout above and on ``CACHE_VERSION``, and a change to one is a change to all; kept
together, a layout change is one diff in one place. The next rework of the cache (issue 18) is the
time to split it along those lines.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from diffpref.data import (
    TIE_POLICIES,
    DataError,
    LoadStats,
    iter_jsonl_ratings,
    iter_preferences,
    pairs_to_ratings,
)
from diffpref.data.pickapic import resolve_parquet_paths
from diffpref.models.loading import native_resolution
from diffpref.training.conditioning import encode_images, encode_prompts, is_sdxl

# Bump when the layout or the meaning of cached numbers changes: old caches then miss the key.
CACHE_VERSION = 1
ROWS_PER_SHARD = 1024
# Latents and embeddings are stored in fp16 (half the disk, no loss that matters next to the
# diffusion noise) and read back as float32.
STORE_DTYPE = torch.float16
META_FILE = "meta.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
# How much of each file / tensor the key reads: enough to catch a change, cheap even for SDXL.
HEAD_TAIL_BYTES = 64 * 1024
HASH_ELEMENTS = 4096
# Open shard files per process; safetensors memory-maps them, so a handle costs little.
OPEN_SHARDS = 16
PairSource = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------------------- the key
def _sha256(data: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in data:
        digest.update(chunk)
    return digest.hexdigest()


def _file_identity(path: Path) -> dict[str, Any]:
    """Path, size, mtime and a hash of the first and last 64 KiB: catches edits without reading gigabytes."""
    stat = path.stat()
    with open(path, "rb") as handle:
        head = handle.read(HEAD_TAIL_BYTES)
        handle.seek(max(stat.st_size - HEAD_TAIL_BYTES, 0))
        tail = handle.read(HEAD_TAIL_BYTES)
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "head_tail_sha256": _sha256([head, tail])}


def _manifest_images(manifest: Path) -> list[Path]:
    """The image files a JSONL manifest names (pairs or ratings); lines the readers would skip are ignored here too."""
    images = []
    with open(manifest, encoding="utf-8") as handle:
        for text in handle:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            for key in ("image_0", "image_1", "image"):
                value = record.get(key)
                if isinstance(value, str) and value.strip():
                    path = Path(value).expanduser()
                    images.append(path if path.is_absolute() else manifest.parent / path)
    return images


def data_identity(data_path: PairSource) -> list[dict[str, Any]]:
    """What identifies the data: every file read, for JSONL manifests the images they point at, for a
    ratings database its write-ahead log too."""
    if isinstance(data_path, (str, os.PathLike)) and Path(data_path).suffix.lower() == ".jsonl":
        manifest = Path(data_path).expanduser()
        identity = _file_identity(manifest)
        # Images live beside the manifest and can change without it: size + mtime of each (no reads).
        lines = []
        for image in _manifest_images(manifest):
            stat = image.stat() if image.exists() else None
            lines.append(f"{image.resolve()}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}")
        identity["images"] = len(lines)
        identity["images_sha256"] = _sha256(line.encode() + b"\n" for line in lines)
        return [identity]
    from diffpref.data.readers import RATINGS_DB_SUFFIXES

    if isinstance(data_path, (str, os.PathLike)) and Path(data_path).suffix.lower() in RATINGS_DB_SUFFIXES:
        database = Path(data_path).expanduser()
        identity = _file_identity(database)
        # In WAL mode new ratings land in "<db>-wal" and reach the main file only at a checkpoint.
        # A missing and an empty WAL hold the same data (readers may leave an empty one behind).
        wal = database.with_name(database.name + "-wal")
        identity["wal"] = _file_identity(wal) if wal.is_file() and wal.stat().st_size else None
        return [identity]
    return [_file_identity(path) for path in resolve_parquet_paths(data_path)]


def _weights_digest(module: torch.nn.Module) -> str:
    """A hash of every tensor's name, shape, dtype, first elements and a strided sample over all of it.

    The strided sample catches a fine-tune (which moves every element) that left the first
    elements of a tensor equal; reading a few thousand elements per tensor keeps it cheap.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(flat.numel() // HASH_ELEMENTS, 1)
        sample = torch.cat([flat[:HASH_ELEMENTS], flat[::step][:HASH_ELEMENTS]]).contiguous().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _config_digest(config: Any) -> str:
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    values.pop("_name_or_path", None)  # where a model was loaded from is not what it is
    return _sha256([json.dumps(values, sort_keys=True, default=str).encode()])


def model_identity(pipe) -> dict[str, Any]:
    """What identifies the encoders: weights and configs of the VAE and text encoder(s), the tokenizers."""
    identity: dict[str, Any] = {"class": type(pipe).__name__}
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            identity[name] = {"weights": _weights_digest(module), "config": _config_digest(module.config)}
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            identity[name] = {"vocab_size": len(tokenizer), "model_max_length": tokenizer.model_max_length}
    return identity


def cache_key(material: dict[str, Any]) -> str:
    """The directory name of a cache: a hash of its key material."""
    return _sha256([json.dumps(material, sort_keys=True, default=str).encode()])[:32]


# ----------------------------------------------------------------------------- shards
class _ShardWriter:
    """Appends row batches (dicts of tensors) and writes ``<prefix>-NNNNN.safetensors`` every ``rows`` rows."""

    def __init__(self, directory: Path, prefix: str, rows: int | None = None) -> None:
        self.directory, self.prefix, self.rows = directory, prefix, rows or ROWS_PER_SHARD
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.buffered = 0
        self.counts: list[int] = []

    def append(self, batch: dict[str, torch.Tensor]) -> None:
        self.buffer.append({name: tensor.detach().cpu() for name, tensor in batch.items()})
        self.buffered += len(next(iter(batch.values())))
        while self.buffered >= self.rows:
            self._write(self.rows)

    def close(self) -> list[int]:
        """Write what is left; the row count of every shard written."""
        if self.buffered:
            self._write(self.buffered)
        return self.counts

    def _write(self, rows: int) -> None:
        columns = {name: torch.cat([b[name] for b in self.buffer]) for name in self.buffer[0]}
        shard = {name: tensor[:rows].contiguous() for name, tensor in columns.items()}
        save_file(shard, str(self.directory / f"{self.prefix}-{len(self.counts):05d}.safetensors"))
        self.counts.append(rows)
        rest = {name: tensor[rows:] for name, tensor in columns.items()}
        self.buffered -= rows
        self.buffer = [rest] if self.buffered else []


class _ShardReader:
    """Row ``i`` of a sharded table, read lazily through memory-mapped safetensors handles."""

    def __init__(self, directory: Path, prefix: str, counts: list[int]) -> None:
        self.paths = [directory / f"{prefix}-{n:05d}.safetensors" for n in range(len(counts))]
        self.starts = [sum(counts[:n]) for n in range(len(counts))]
        self.total = sum(counts)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without open handles; each opens its own.
        return {**self.__dict__, "_handles": OrderedDict()}

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # forked into a worker: do not share the parent's handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            self._handles[shard] = safe_open(str(self.paths[shard]), framework="pt")
            if len(self._handles) > OPEN_SHARDS:
                self._handles.popitem(last=False)
        return self._handles[shard]

    def row(self, index: int) -> dict[str, torch.Tensor]:
        shard = bisect.bisect_right(self.starts, index) - 1
        offset = index - self.starts[shard]
        handle = self._handle(shard)
        return {name: _loaded(handle.get_slice(name)[offset:offset + 1][0]) for name in handle.keys()}


def _loaded(tensor: torch.Tensor) -> torch.Tensor:
    """Stored half precision back to float32; indices and labels as they are."""
    return tensor.float() if tensor.dtype == STORE_DTYPE else tensor


# ----------------------------------------------------------------------------- building
@dataclass
class _Record:
    """One cache row before encoding: its images (one per latent column), prompt, user and labels."""

    images: list[Image.Image]
    prompt: str
    user_id: str
    values: dict[str, float]


@dataclass(frozen=True)
class _Layout:
    """What kind of cache is built: its name in errors and meta, and its latent and label columns."""

    kind: str
    latent_columns: tuple[str, ...]
    value_columns: tuple[str, ...]


PAIRS = _Layout("pairs", ("latents_0", "latents_1"), ("label",))
RATINGS = _Layout("ratings", ("latents",), ("liked",))


def _build(pipe, records: Iterator[_Record], stats: LoadStats, layout: _Layout, material: dict[str, Any],
           cache_root: str | os.PathLike, resolution: int, batch_size: int, empty_prompt: bool) -> Path:
    """The finished cache directory for ``material``: reused when it exists, else built atomically."""
    root = Path(cache_root).expanduser()
    final = root / cache_key(material)
    if (final / META_FILE).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    building = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)  # a leftover of this same process
    building.mkdir()
    try:
        _write(pipe, records, stats, layout, material, building, resolution, batch_size, empty_prompt)
        if (final / META_FILE).exists():  # another process finished the same cache first
            shutil.rmtree(building)
        else:
            os.replace(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return final


def _write(pipe, records: Iterator[_Record], stats: LoadStats, layout: _Layout, material: dict[str, Any],
           directory: Path, resolution: int, batch_size: int, empty_prompt: bool) -> None:
    """Encode every record into ``directory``; meta.json is written last, as the mark of a complete cache."""
    rows, prompt_shards = _ShardWriter(directory, "rows"), _ShardWriter(directory, "prompts")
    prompt_index: dict[str, int] = {}
    user_index: dict[str, int] = {}
    new_prompts: list[str] = []
    batch: list[tuple[_Record, int, int]] = []
    latent_shape: list[int] = []

    def encode_new_prompts() -> None:
        cond = encode_prompts(pipe, new_prompts)
        prompt_shards.append({name: tensor.to(STORE_DTYPE) for name, tensor in cond.items()})
        new_prompts.clear()

    def encode_batch() -> None:
        # One VAE call for all images of the batch, column-major: latents_0 of every pair, then latents_1.
        columns = len(layout.latent_columns)
        images = [record.images[c] for c in range(columns) for record, _, _ in batch]
        latents = encode_images(pipe.vae, images, resolution).to(STORE_DTYPE).chunk(columns)
        row = dict(zip(layout.latent_columns, latents))
        latent_shape[:] = latents[0].shape[1:]
        for name in layout.value_columns:
            row[name] = torch.tensor([record.values[name] for record, _, _ in batch], dtype=torch.float32)
        row["prompt_index"] = torch.tensor([p for _, p, _ in batch], dtype=torch.long)
        row["user_index"] = torch.tensor([u for _, _, u in batch], dtype=torch.long)
        rows.append(row)
        batch.clear()

    for record in records:
        if record.prompt not in prompt_index:
            prompt_index[record.prompt] = len(prompt_index)
            new_prompts.append(record.prompt)
            if len(new_prompts) >= batch_size:
                encode_new_prompts()
        user = user_index.setdefault(record.user_id, len(user_index))
        batch.append((record, prompt_index[record.prompt], user))
        if len(batch) >= batch_size:
            encode_batch()
    if batch:
        encode_batch()
    if new_prompts:
        encode_new_prompts()
    report = {"source": stats.source, "rows": stats.rows, "ties": stats.ties, "skipped": dict(stats.skipped)}
    row_counts = rows.close()
    if not row_counts:
        raise DataError(
            f"{stats.source}: no usable {layout.kind} to cache (rows read: {stats.rows}, skipped per reason: "
            f"{dict(stats.skipped) or 'none'}, ties: {stats.ties}). Check the file with `diffpref data inspect`; "
            "tie_policy='soft' keeps ties.", source=stats.source)
    if empty_prompt:
        cond = encode_prompts(pipe, [""])
        save_file({name: tensor.detach().cpu().float().contiguous() for name, tensor in cond.items()},
                  str(directory / EMPTY_PROMPT_FILE))
    meta = {
        "version": CACHE_VERSION, "kind": layout.kind, "key": directory.name.split(".tmp-")[0],
        "key_material": material, "resolution": resolution, "model_class": type(pipe).__name__,
        "sdxl": is_sdxl(pipe), "num_items": sum(row_counts), "latent_shape": latent_shape,
        "users": list(user_index), "prompts": list(prompt_index), "report": report,
        "shards": {"rows": row_counts, "prompts": prompt_shards.close()}, "empty_prompt": empty_prompt,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))


def _check_args(pipe, resolution: int | None, tie_policy: str, batch_size: int) -> int:
    """The resolution to use, after checking the arguments a build depends on."""
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie_policy {tie_policy!r}; valid policies are {', '.join(TIE_POLICIES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolution = native_resolution(pipe) if resolution is None else int(resolution)
    factor = int(pipe.vae_scale_factor)
    if resolution < factor or resolution % factor:
        raise ValueError(f"resolution {resolution} is not a positive multiple of the VAE's factor {factor}")
    return resolution


def _material(pipe, data_path: PairSource, layout: _Layout, resolution: int, empty_prompt: bool,
              **options: Any) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "kind": layout.kind, "data": data_identity(data_path),
            "resolution": resolution, "empty_prompt": empty_prompt, "model": model_identity(pipe), **options}


def build_preference_cache(pipe, data_path: PairSource, cache_root: str | os.PathLike, resolution: int | None = None,
                           tie_policy: str = "drop", batch_size: int = 16, progress: bool = True,
                           empty_prompt: bool = True) -> PreferenceCache:
    """Encode the pairs of ``data_path`` (any source ``iter_preferences`` reads) once; reuse a finished cache.

    ``resolution`` defaults to the pipeline's native one; images are resized and centre-cropped to
    it. ``batch_size`` is the number of pairs encoded per VAE call (two images each) and of new
    prompts per text-encoder call. Raises ``DataError`` when no pair is usable.
    """
    resolution = _check_args(pipe, resolution, tie_policy, batch_size)
    material = _material(pipe, data_path, PAIRS, resolution, empty_prompt, tie_policy=tie_policy)
    stats = LoadStats(source=_describe(data_path))
    pairs = iter_preferences(data_path, stats=stats, tie_policy=tie_policy, progress=progress)
    records = (_Record([p.image_0, p.image_1], p.prompt, p.user_id, {"label": p.label}) for p in pairs)
    return PreferenceCache(_build(pipe, records, stats, PAIRS, material, cache_root, resolution, batch_size,
                                  empty_prompt))


def build_rating_cache(pipe, data_path: PairSource, cache_root: str | os.PathLike, resolution: int | None = None,
                       from_pairs: bool = False, tie_policy: str = "drop", batch_size: int = 16,
                       progress: bool = True, empty_prompt: bool = True) -> RatingCache:
    """Encode single-image ratings (for KTO-style objectives) once; reuse a finished cache.

    The source is a JSONL ratings manifest, or with ``from_pairs=True`` any pair source, each
    decided pair giving a like (its preferred image) and a dislike (its rejected one), as
    ``pairs_to_ratings`` does; ``tie_policy`` only matters then (ties give no ratings either way).
    """
    resolution = _check_args(pipe, resolution, tie_policy, batch_size)
    stats = LoadStats(source=_describe(data_path))
    if from_pairs:
        material = _material(pipe, data_path, RATINGS, resolution, empty_prompt, from_pairs=True,
                             tie_policy=tie_policy)
        pairs = iter_preferences(data_path, stats=stats, tie_policy=tie_policy, progress=progress)
        ratings: Iterable = (rating for pair in pairs for rating in pairs_to_ratings([pair]))
    else:
        if not isinstance(data_path, (str, os.PathLike)) or Path(data_path).suffix.lower() != ".jsonl":
            raise ValueError(f"{_describe(data_path)}: single-image ratings are read from a .jsonl ratings "
                             "manifest; pass from_pairs=True to turn preference pairs into ratings")
        material = _material(pipe, data_path, RATINGS, resolution, empty_prompt, from_pairs=False)
        ratings = iter_jsonl_ratings(data_path, stats=stats, progress=progress)
    records = (_Record([r.image], r.prompt, r.user_id, {"liked": float(r.liked)}) for r in ratings)
    return RatingCache(_build(pipe, records, stats, RATINGS, material, cache_root, resolution, batch_size,
                              empty_prompt))


def _describe(data_path: PairSource) -> str:
    if isinstance(data_path, (str, os.PathLike)):
        return os.fspath(data_path)
    return ", ".join(os.fspath(p) for p in data_path)


# ----------------------------------------------------------------------------- datasets
class _LatentCache(Dataset):
    """A finished cache directory as a Dataset of dicts of tensors (float32 latents, prompt conditioning)."""

    layout: _Layout

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not a finished cache (no {META_FILE}); build it with "
                                    f"build_{'preference' if self.layout is PAIRS else 'rating'}_cache()")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("version") != CACHE_VERSION or self.meta.get("kind") != self.layout.kind:
            raise ValueError(f"{self.path} holds a {self.meta.get('kind')!r} cache of version "
                             f"{self.meta.get('version')}; expected {self.layout.kind!r} version {CACHE_VERSION}")
        self._rows = _ShardReader(self.path, "rows", self.meta["shards"]["rows"])
        self._prompts = _ShardReader(self.path, "prompts", self.meta["shards"]["prompts"])
        self._empty: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self._rows.total

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a cache of {len(self)} items")
        item = self._rows.row(index)
        item.update(self.prompt_cond(int(item["prompt_index"])))
        return item

    def prompt_cond(self, prompt_index: int) -> dict[str, torch.Tensor]:
        """The cached conditioning of ``prompts[prompt_index]``: prompt_embeds [L, D] (+ pooled [D2] for SDXL)."""
        return self._prompts.row(prompt_index)

    @property
    def empty_prompt_cond(self) -> dict[str, torch.Tensor]:
        """The conditioning of "" as ``encode_prompts(pipe, [""])`` gives it (a batch of one, float32)."""
        if self._empty is None:
            if not self.meta.get("empty_prompt"):
                raise ValueError(f"{self.path} was built with empty_prompt=False; rebuild with empty_prompt=True")
            self._empty = load_file(str(self.path / EMPTY_PROMPT_FILE))
        return self._empty

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
    prompt_index, prompt_embeds [L, D] and, for SDXL, pooled_prompt_embeds [D2]."""

    layout = PAIRS


class RatingCache(_LatentCache):
    """Cached single-image ratings. Items: latents [C, h, w], liked (1.0 / 0.0), user_index, prompt_index,
    prompt_embeds [L, D] and, for SDXL, pooled_prompt_embeds [D2]."""

    layout = RATINGS
