"""Build a latent cache: every process encodes its own share of the chunks, then one writes the index.

``build_preference_cache`` / ``build_rating_cache`` split the source into chunks of
``CHUNK_ROWS`` source rows (``sources``). In a torch.distributed run each process takes a
contiguous block of chunks; DataLoader workers read and decode them (images resized and
centre-cropped in the workers), the process runs the VAE and text encoder(s) in calls of
``batch_size`` images / prompts, and writes each chunk as it finishes. Process 0 then writes the
index (global prompt and user numbers in order of first appearance) and ``meta.json``, and
renames the build directory to the key. The only waits are one barrier after the encoding (a
process waits for the slowest share, and the shares are equal) and one after the index.

Why the result is the same, row for row, whatever the number of processes: a chunk's rows are
encoded in the same calls (its own rows, cut at ``batch_size``) whoever encodes it, and a
prompt's stored embedding is the one of the first chunk that holds it. ``batch_size`` does not
enter the key: it changes how the work is cut, not the numbers beyond float rounding.

Horizontal flips (``random_flip=True``): both orientations are encoded and stored. The VAE is not
mirror-equivariant (its learned kernels are not symmetric), so the latents of a mirrored image are
not the mirrored latents; flipping latents would train on inputs the VAE never produces. The
trainer picks an orientation per image as a function of (seed, step, position)
(``randomness.flip_choices``), as the official Diffusion-DPO code flips each image at random. For
SDXL the mirrored image's crop is stored too: crop_left becomes resized_width - r - crop_left.

A build works in ``<key>.partial``; a chunk counts as done when its ``chunk-*.json`` exists, so an
interrupted build resumes at the chunks it had not finished, and only the final rename makes a
cache that readers open.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from diffpref.data import TIE_POLICIES, DataError
from diffpref.models.loading import native_resolution
from diffpref.training.cache.layout import (
    EMPTY_PROMPT_FILE,
    INDEX_FILE,
    META_FILE,
    PAIRS,
    RATINGS,
    STORE_DTYPE,
    Layout,
    PairSource,
    cache_key,
    chunk_file,
    key_material,
)
from diffpref.training.cache.readers import PreferenceCache, RatingCache
from diffpref.training.cache.sources import (
    ChunkReader,
    describe,
    num_chunks,
    rank_chunks,
)
from diffpref.training.conditioning import encode_images, encode_prompts, is_sdxl

DEFAULT_BATCH_SIZE = 32


def build_preference_cache(pipe, data_path: PairSource, cache_root: str | os.PathLike, resolution: int | None = None,
                           tie_policy: str = "drop", batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                           empty_prompt: bool = True, random_flip: bool = False,
                           num_workers: int | None = None) -> PreferenceCache:
    """Encode the pairs of ``data_path`` (any source ``iter_preferences`` reads) once; reuse a finished cache.

    ``resolution`` defaults to the pipeline's native one; images are resized and centre-cropped to
    it. ``batch_size``: images per VAE call and prompts per text-encoder call. ``random_flip``:
    store the mirrored images' latents too. ``num_workers``: DataLoader workers that decode
    (default: up to 4, fewer on small machines). Every process of an initialised torch.distributed
    group must call this (each encodes its share). Raises ``DataError`` when no pair is usable.
    """
    resolution = _check_args(pipe, resolution, tie_policy, batch_size)
    material = key_material(pipe, data_path, PAIRS, resolution, empty_prompt, tie_policy=tie_policy,
                            random_flip=random_flip)
    reader = ChunkReader(data_path, [], PAIRS, resolution, tie_policy, from_pairs=True, flip=random_flip)
    return PreferenceCache(_build(pipe, reader, material, cache_root, batch_size, empty_prompt, num_workers, progress))


def build_rating_cache(pipe, data_path: PairSource, cache_root: str | os.PathLike, resolution: int | None = None,
                       from_pairs: bool = False, tie_policy: str = "drop", batch_size: int = DEFAULT_BATCH_SIZE,
                       progress: bool = True, empty_prompt: bool = True, random_flip: bool = False,
                       num_workers: int | None = None) -> RatingCache:
    """Encode single-image ratings (for KTO-style objectives) once; reuse a finished cache.

    The source is a JSONL ratings manifest, or with ``from_pairs=True`` any pair source, each
    decided pair giving a like (its preferred image) and a dislike (its rejected one), as
    ``pairs_to_ratings`` does; ``tie_policy`` only matters then. Other arguments as
    ``build_preference_cache``.
    """
    resolution = _check_args(pipe, resolution, tie_policy, batch_size)
    if not from_pairs and (not isinstance(data_path, (str, os.PathLike))
                           or Path(data_path).suffix.lower() != ".jsonl"):
        raise ValueError(f"{describe(data_path)}: single-image ratings are read from a .jsonl ratings "
                         "manifest; pass from_pairs=True to turn preference pairs into ratings")
    options = {"from_pairs": from_pairs, "random_flip": random_flip}
    if from_pairs:
        options["tie_policy"] = tie_policy
    material = key_material(pipe, data_path, RATINGS, resolution, empty_prompt, **options)
    reader = ChunkReader(data_path, [], RATINGS, resolution, tie_policy, from_pairs=from_pairs, flip=random_flip)
    return RatingCache(_build(pipe, reader, material, cache_root, batch_size, empty_prompt, num_workers, progress))


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


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _build(pipe, reader: ChunkReader, material: dict[str, Any], cache_root: str | os.PathLike, batch_size: int,
           empty_prompt: bool, num_workers: int | None, progress: bool) -> Path:
    """The finished cache directory for ``material``: reused when it exists, else built by all processes."""
    root = Path(cache_root).expanduser()
    final = root / cache_key(material)
    if (final / META_FILE).exists():
        return final
    rank, world = process_group()
    building = root / f"{final.name}.partial"
    building.mkdir(parents=True, exist_ok=True)
    chunks = num_chunks(reader.data_path)
    reader.chunks = [c for c in rank_chunks(chunks, rank, world) if not chunk_file(building, "chunk", c).exists()]
    started = time.perf_counter()
    encoded = _encode_share(pipe, reader, building, batch_size, num_workers, progress and rank == 0)
    _write_json(building / f"build-{world}-{rank}.json",
                {"rank": rank, "chunks": len(reader.chunks), "images": encoded,
                 "seconds": time.perf_counter() - started})
    _barrier(world)  # every share is on disk
    summary = _summary(building, chunks, reader.layout)
    if not summary["num_items"]:
        _barrier(world)
        if rank == 0:
            shutil.rmtree(building, ignore_errors=True)
        report = summary["report"]
        raise DataError(
            f"{describe(reader.data_path)}: no usable {reader.layout.kind} to cache (rows read: {report['rows']}, "
            f"skipped per reason: {report['skipped'] or 'none'}, ties: {report['ties']}). Check the file with "
            "`diffpref data inspect`; tie_policy='soft' keeps ties.", source=describe(reader.data_path))
    if rank == 0:
        _finish(pipe, building, final, summary, material, reader, empty_prompt, world, batch_size)
    _barrier(world)  # the index is written and the cache renamed
    if not (final / META_FILE).exists():
        raise RuntimeError(f"{final}: process 0 did not finish the cache; see its error")
    return final


def _encode_share(pipe, reader: ChunkReader, directory: Path, batch_size: int, num_workers: int | None,
                  progress: bool) -> int:
    """Encode this process's chunks into ``directory``; the number of images run through the VAE."""
    if not reader.chunks:
        return 0
    if num_workers is None:
        num_workers = min(4, max((os.cpu_count() or 1) - 1, 0))
    num_workers = min(num_workers, len(reader.chunks))
    # One decoded chunk waiting per worker: a chunk of large images is hundreds of MB.
    loader = DataLoader(reader, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                        prefetch_factor=1 if num_workers else None, persistent_workers=False)
    encoded = 0
    from diffpref.data.loading import progress_bar

    with progress_bar(len(reader.chunks), progress, desc="cache chunks") as bar:
        for item in loader:
            encoded += _write_chunk(pipe, item, reader.layout, reader.flip, directory, batch_size)
            bar.update(1)
    return encoded


def _write_chunk(pipe, item: dict[str, Any], layout: Layout, flip: bool, directory: Path, batch_size: int) -> int:
    """Encode one decoded chunk and write its files (the json last); the number of images encoded."""
    chunk, n = item["chunk"], len(item["prompts"])
    local_prompts = list(dict.fromkeys(item["prompts"]))
    local_users = list(dict.fromkeys(item["users"]))
    encoded = 0
    if n:
        # Column-major: every row's image 0, then image 1 (then the mirrored ones); the calls are cut
        # from this list only, so the same chunk is encoded the same way by any process.
        images = list(item["pixels"])
        if flip:
            images += [np.ascontiguousarray(column[:, :, ::-1]) for column in item["pixels"]]
        stacked = np.concatenate(images)
        latents = torch.cat([encode_images(pipe.vae, stacked[i:i + batch_size], stacked.shape[1]).cpu()
                             for i in range(0, len(stacked), batch_size)]).to(STORE_DTYPE)
        encoded = len(stacked)
        parts = latents.split(n)
        names = list(layout.latent_columns) + ([f"{c}_flipped" for c in layout.latent_columns] if flip else [])
        rows = {name: part.contiguous() for name, part in zip(names, parts)}
        for name in layout.value_columns:
            rows[name] = torch.tensor(item["values"][name], dtype=torch.float32)
        for name in ("original_size", "crop_top_left") + (("crop_top_left_flipped",) if flip else ()):
            rows[name] = torch.from_numpy(item[name]).contiguous()
        _save(rows, chunk_file(directory, "rows", chunk))
        conds = [encode_prompts(pipe, local_prompts[i:i + batch_size]) for i in range(0, len(local_prompts), batch_size)]
        _save({name: torch.cat([c[name] for c in conds]).detach().cpu().to(STORE_DTYPE).contiguous()
               for name in conds[0]}, chunk_file(directory, "prompts", chunk))
    prompt_of = {p: i for i, p in enumerate(local_prompts)}
    user_of = {u: i for i, u in enumerate(local_users)}
    _write_json(chunk_file(directory, "chunk", chunk), {
        "chunk": chunk, "rows": n, "prompts": local_prompts, "users": local_users,
        "row_prompt": [prompt_of[p] for p in item["prompts"]], "row_user": [user_of[u] for u in item["users"]],
        "latent_shape": list(latents.shape[1:]) if n else None, "report": item["report"],
    })
    return encoded


def _summary(directory: Path, chunks: int, layout: Layout) -> dict[str, Any]:
    """Global numbering from the chunk files: prompts and users in order of first appearance."""
    prompt_index: dict[str, int] = {}
    user_index: dict[str, int] = {}
    prompt_source: list[tuple[int, int]] = []
    row_prompt: list[int] = []
    row_user: list[int] = []
    counts, prompt_counts = [], []
    report: dict[str, Any] = {"rows": 0, "ties": 0, "skipped": {}}
    latent_shape = None
    for chunk in range(chunks):
        path = chunk_file(directory, "chunk", chunk)
        if not path.exists():
            raise RuntimeError(f"{path} is missing after every process finished its share: a process "
                               "failed or was given another world size; rerun (finished chunks are kept)")
        info = json.loads(path.read_text())
        counts.append(info["rows"])
        prompt_counts.append(len(info["prompts"]) if info["rows"] else 0)
        latent_shape = latent_shape or info["latent_shape"]
        for local, prompt in enumerate(info["prompts"]):
            if prompt not in prompt_index:
                prompt_index[prompt] = len(prompt_index)
                prompt_source.append((chunk, local))
        for user in info["users"]:
            user_index.setdefault(user, len(user_index))
        row_prompt += [prompt_index[info["prompts"][p]] for p in info["row_prompt"]]
        row_user += [user_index[info["users"][u]] for u in info["row_user"]]
        report["rows"] += info["report"]["rows"]
        report["ties"] += info["report"]["ties"]
        for reason, count in info["report"]["skipped"].items():
            report["skipped"][reason] = report["skipped"].get(reason, 0) + count
    return {"num_items": len(row_prompt), "prompts": list(prompt_index), "users": list(user_index),
            "prompt_source": prompt_source, "row_prompt": row_prompt, "row_user": row_user, "counts": counts,
            "prompt_counts": prompt_counts, "report": report, "latent_shape": latent_shape}


def _finish(pipe, building: Path, final: Path, summary: dict[str, Any], material: dict[str, Any],
            reader: ChunkReader, empty_prompt: bool, world: int, batch_size: int) -> None:
    """Write the index, the empty prompt and meta.json (last), then rename the build to the key."""
    source = torch.tensor(summary["prompt_source"], dtype=torch.long).reshape(-1, 2)
    save_file({"prompt_index": torch.tensor(summary["row_prompt"], dtype=torch.long),
               "user_index": torch.tensor(summary["row_user"], dtype=torch.long),
               "prompt_chunk": source[:, 0].contiguous(), "prompt_row": source[:, 1].contiguous()},
              str(building / INDEX_FILE))
    if empty_prompt:
        cond = encode_prompts(pipe, [""])
        save_file({name: tensor.detach().cpu().float().contiguous() for name, tensor in cond.items()},
                  str(building / EMPTY_PROMPT_FILE))
    ranks = [json.loads((building / f"build-{world}-{r}.json").read_text()) for r in range(world)]
    meta = {
        "version": material["version"], "kind": reader.layout.kind, "key": final.name, "key_material": material,
        "resolution": reader.resolution, "model_class": type(pipe).__name__, "sdxl": is_sdxl(pipe),
        "num_items": summary["num_items"], "latent_shape": summary["latent_shape"], "users": summary["users"],
        "prompts": summary["prompts"], "report": {"source": describe(reader.data_path), **summary["report"]},
        "chunks": {"rows": summary["counts"], "prompts": summary["prompt_counts"]}, "empty_prompt": empty_prompt,
        "random_flip": reader.flip,
        # How this build was cut (not part of the cached numbers): a resumed build counts only its last run.
        "build": {"processes": world, "cache_batch_size": batch_size,
                  "images_encoded_per_rank": [r["images"] for r in ranks],
                  "seconds_per_rank": [round(r["seconds"], 3) for r in ranks]},
    }
    _write_json(building / META_FILE, meta)
    try:
        os.replace(building, final)
    except OSError:
        if not (final / META_FILE).exists():  # not merely another build of the same key that finished first
            raise
        shutil.rmtree(building, ignore_errors=True)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write through a temporary name, so a file under its final name is always complete."""
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(temporary))
    os.replace(temporary, path)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate: keep the decoded chunk as numpy (its default would convert it)."""
    return item
