"""The on-disk layout of a latent cache, its version, and the key that names it.

A cache lives in ``cache_root/<key>``; the key is a hash of everything the cached numbers
depend on: the data files (path, size, mtime and a hash of their first and last 64 KiB; for a
JSONL manifest also the size and mtime of every image it names), the tie policy, the
resolution, whether both orientations are cached (``random_flip``), and the model (a hash of a
deterministic sample of the VAE's and text encoders' weights, their configs, the tokenizers).
Change any of them, or ``CACHE_VERSION``, and the cache is rebuilt under a new key; a cache of
another version is refused by the readers, never misread.

Files of a finished cache (the source is cut into chunks of ``CHUNK_ROWS`` source rows; chunk
``c`` holds the usable rows among source rows ``[c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS)``):

  rows-CCCCCC.safetensors     per usable row of chunk c: latent columns [n, C, h, w] fp16 (pairs:
                              latents_0, latents_1; ratings: latents; with random_flip also
                              <column>_flipped, the latents of the mirrored image), value columns
                              [n] (label / liked), original_size [n, images, 2] and crop_top_left
                              [n, images, 2] (h, w / top, left in pixels, SDXL's micro-conditioning)
  prompts-CCCCCC.safetensors  the chunk's own unique prompts: prompt_embeds [p, L, D] fp16
                              (+ pooled_prompt_embeds [p, D2] for SDXL)
  chunk-CCCCCC.json           the chunk's prompts, users, per-row prompt and user, skip report
                              (written last: its presence marks the chunk complete)
  index.safetensors           per row of the whole cache: prompt_index, user_index (global, in order
                              of first appearance); per prompt: prompt_chunk, prompt_row (where its
                              embedding is stored: the first chunk that holds it)
  empty_prompt.safetensors    the conditioning of "" (trainers drop some prompts to keep guidance working)
  meta.json                   users, prompts, counts, the skip report, the key material, who built what

Written by ``builder``, read by ``readers``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffpref.data.pickapic import resolve_parquet_paths

# Bump when the layout or the meaning of cached numbers changes: old caches then miss the key
# (the key material holds the version) and the readers refuse them. 2: chunked, per-sample sizes
# and crops, optional flipped latents.
CACHE_VERSION = 2
# Source rows per chunk: the unit of work a process takes, and the set whose usable rows are
# encoded together (so the numbers never depend on how many processes share the build). 64 keeps a
# decoded chunk of 1024 px pairs near 400 MB (a few are in flight per process) and 850k Pick-a-Pic
# pairs at ~13k chunks.
CHUNK_ROWS = 64
# Latents and embeddings are stored in fp16 (half the disk, no loss that matters next to the
# diffusion noise) and read back as float32.
STORE_DTYPE = torch.float16
META_FILE = "meta.json"
INDEX_FILE = "index.safetensors"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
# How much of each file / tensor the key reads: enough to catch a change, cheap even for SDXL.
HEAD_TAIL_BYTES = 64 * 1024
HASH_ELEMENTS = 4096
PairSource = str | os.PathLike | Sequence[str | os.PathLike]


def chunk_file(directory: Path, kind: str, chunk: int) -> Path:
    """``rows``, ``prompts`` (safetensors) or ``chunk`` (json) file of chunk ``chunk``."""
    suffix = "json" if kind == "chunk" else "safetensors"
    return directory / f"{kind}-{chunk:06d}.{suffix}"


@dataclass(frozen=True)
class Layout:
    """What kind of cache is built: its name in errors and meta, and its latent and label columns."""

    kind: str
    latent_columns: tuple[str, ...]
    value_columns: tuple[str, ...]


PAIRS = Layout("pairs", ("latents_0", "latents_1"), ("label",))
RATINGS = Layout("ratings", ("latents",), ("liked",))


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
    # Which keys took their default: a list made from a set, in an order that changes from one process
    # to the next (string hashing), which would give every process its own key; the values are all here.
    values.pop("_use_default_values", None)
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


def key_material(pipe, data_path: PairSource, layout: Layout, resolution: int, empty_prompt: bool,
                 **options: Any) -> dict[str, Any]:
    """Everything the cached numbers depend on (``cache_batch_size`` and the process count are not:
    they change how the work is cut, not the result)."""
    return {"version": CACHE_VERSION, "kind": layout.kind, "data": data_identity(data_path),
            "resolution": resolution, "empty_prompt": empty_prompt, "chunk_rows": CHUNK_ROWS,
            "model": model_identity(pipe), **options}
