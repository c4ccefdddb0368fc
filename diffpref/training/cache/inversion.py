"""InPO's inversions, computed once: the frozen reference's DDIM trajectory of every cached image.

DDIM-InPO trains at x_t = the DDIM inversion of x0 by the reference model. With a frozen reference,
deterministic DDIM (eta = 0) and the timesteps on a fixed grid (``inversion.fixed_grid``), x_t is a
function of the image, its prompt and the grid alone, so it is computed once per image (K reference
passes for a K-point grid, ``inversion.invert_along``) and the training step reads it instead of
running up to K inversion passes every step: an InPO step then costs what a DPO step costs.

Files, in ``<latent cache>/inversion-<key>/`` (the same chunks as the latent cache, row for row):

  inv-CCCCCC.safetensors   per row of chunk c: latents_0, latents_1 [n, K, C, h, w] fp16 (with
                           random_flip also latents_0_flipped, latents_1_flipped): x at every grid point;
                           ref_err_0, ref_err_1 [n, K] fp32 (+ _flipped): the reference's error at
                           each stored x_t under the image's own prompt (see below)
  meta.json                the key material and the grid (written last: marks the build finished)

The key hashes the latent cache's key (data, VAE, text encoders, so the prompt encoding), the
reference UNet (a sample of its weights, its config, the dtype it runs in), the grid, the noise
schedule and the prediction type: a change in any of them builds a new directory. Every process
of a torch.distributed run inverts its own contiguous share of the chunks, as the latent builder
encodes its share; process 0 writes meta.json after a barrier.

The reference's errors come almost free: the walk calls the reference at every grid point but the
last (the state it steps from), so one more call gives its output at all K stored x_t, and the
InPO step needs no reference pass for the samples that keep their prompt (a prompt-dropped sample
is scored under the empty prompt, so the step runs the reference on those few). The walk rounds
each state to fp16 as it is reached, so these outputs are the reference's at exactly the stored x_t.

Size: K x images x C x h x w x 2 bytes per pair; for SD1.5 at 512 px (4 x 64 x 64 latents) and
K = 10 that is 10 x 2 x 32 KiB = 640 KiB per pair (docs/training.md says when it pays).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from diffpref.inversion import implied_noise, invert_along
from diffpref.losses import per_sample_mse
from diffpref.training.cache import layout as _layout
from diffpref.training.cache.builder import _barrier, _save, _write_json, process_group
from diffpref.training.cache.layout import (
    STORE_DTYPE,
    _config_digest,
    _weights_digest,
    chunk_file,
)
from diffpref.training.cache.readers import _ChunkTable
from diffpref.training.cache.sources import rank_chunks
from diffpref.training.conditioning import pair_cond

# Bump when the meaning of the stored trajectories changes.
INVERSION_VERSION = 2  # 2: reference errors, states rounded to fp16 along the walk
KIND = "inv"


def reference_identity(unet: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """What identifies the reference model of an inversion: call it on the UNet before adapters are added."""
    return {"weights": _weights_digest(unet), "config": _config_digest(unet.config), "dtype": str(dtype)}


def inversion_key_material(cache, reference: dict[str, Any], points: torch.Tensor, schedule) -> dict[str, Any]:
    abar = schedule.alphas_cumprod.detach().double().cpu().contiguous()
    return {"version": INVERSION_VERSION, "latent_cache": cache.key, "reference": reference,
            "points": [int(p) for p in points], "prediction_type": schedule.prediction_type,
            "alphas_cumprod_sha256": hashlib.sha256(abar.numpy().tobytes()).hexdigest(),
            "random_flip": cache.random_flip}


class InversionCache:
    """A finished inversion cache: ``get(index, k, flips)`` -> inverted_0, inverted_1 [C, h, w] float32 at grid point k."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / _layout.META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not a finished inversion cache (no {_layout.META_FILE}); "
                                    "build it with build_inversion_cache()")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != INVERSION_VERSION:
            raise ValueError(f"{self.path} holds an inversion cache of version {self.meta.get('version')}; expected "
                             f"{INVERSION_VERSION}. Delete it; the trainer builds it again")
        self.points = torch.tensor(self.meta["points"], dtype=torch.long)
        self._rows = _ChunkTable(self.path, KIND, self.meta["counts"])

    def __len__(self) -> int:
        return self._rows.total

    def get(self, index: int, k: int, flips: list[bool] | None = None) -> dict[str, torch.Tensor]:
        flips = flips if flips is not None else [False, False]
        chunk_pos = _locate(self._rows, index)
        handle = self._rows._handle(chunk_pos[0])
        out, row = {}, chunk_pos[1]
        for column, flipped in zip(("0", "1"), flips):
            suffix = "_flipped" if flipped else ""
            out[f"inverted_{column}"] = handle.get_slice(f"latents_{column}{suffix}")[row:row + 1, k:k + 1][0, 0].float()
            out[f"ref_err_{column}"] = handle.get_slice(f"ref_err_{column}{suffix}")[row:row + 1, k:k + 1][0, 0]
        return out


def _locate(table: _ChunkTable, index: int) -> tuple[int, int]:
    import bisect

    if not 0 <= index < table.total:
        raise IndexError(f"index {index} is out of range for an inversion cache of {table.total} rows")
    j = bisect.bisect_right(table.starts, index) - 1
    return table.chunks[j], index - table.starts[j]


def build_inversion_cache(parts, reference: dict[str, Any], points: torch.Tensor, batch_size: int = 64,
                          progress: bool = True) -> InversionCache:
    """Invert every image of ``parts.cache`` along ``points`` with ``parts.reference``; reuse a finished build.

    ``parts``: the run's ``StepParts`` (its reference denoiser is the one the on-the-fly step would use,
    so the cached x_t is the same numbers). ``reference``: ``reference_identity`` of the UNet before
    adapters. Every process of an initialised torch.distributed group must call this.
    """
    from diffpref.training.cache.layout import cache_key

    cache = parts.cache
    material = inversion_key_material(cache, reference, points, parts.schedule)
    final = cache.path / f"inversion-{cache_key(material)}"
    if (final / _layout.META_FILE).exists():
        return InversionCache(final)
    rank, world = process_group()
    building = final.with_name(final.name + ".partial")
    building.mkdir(parents=True, exist_ok=True)
    counts = cache.meta["chunks"]["rows"]
    starts = [sum(counts[:c]) for c in range(len(counts))]
    todo = [c for c in rank_chunks(len(counts), rank, world)
            if counts[c] and not chunk_file(building, KIND, c).exists()]
    from diffpref.data.loading import progress_bar

    with progress_bar(len(todo), progress and rank == 0, desc="inpo inversions") as bar:
        for c in todo:
            rows = list(range(starts[c], starts[c] + counts[c]))
            tensors: dict[str, list[torch.Tensor]] = {}
            for i in range(0, len(rows), batch_size):
                for name, value in _invert_rows(parts, rows[i:i + batch_size], points).items():
                    tensors.setdefault(name, []).append(value)
            _save({k: torch.cat(v).to(torch.float32 if k.startswith("ref_err") else STORE_DTYPE).contiguous()
                   for k, v in tensors.items()},
                  chunk_file(building, KIND, c))
            bar.update(1)
    _barrier(world)  # every share is on disk
    if rank == 0:
        _write_json(building / _layout.META_FILE, {**material, "counts": counts,
                                                   "latent_shape": cache.meta["latent_shape"]})
        try:
            os.replace(building, final)
        except OSError:
            if not (final / _layout.META_FILE).exists():
                raise
    _barrier(world)
    return InversionCache(final)


@torch.no_grad()
def _invert_rows(parts, rows: list[int], points: torch.Tensor) -> dict[str, torch.Tensor]:
    """The trajectories of rows' images (both orientations with random_flip): name -> [n, K, C, h, w] on the CPU."""
    from diffpref.training.step import collate, to_device

    cache, schedule = parts.cache, parts.schedule
    out = {}
    for flipped in ([False, True] if cache.random_flip else [False]):
        items = [cache.get(i, [flipped, flipped]) for i in rows]
        drop = torch.zeros(len(items), dtype=torch.bool)  # the image's own prompt (see objectives._inverted)
        batch = to_device(collate(items, cache.empty_prompt_cond, drop), parts.accelerator.device, torch.float32)
        cond2 = pair_cond(batch)
        x0 = torch.cat([batch["latents_0"], batch["latents_1"]])
        outputs: list[torch.Tensor] = []  # raw model outputs (eps or v) at each state the walk steps from
        trajectory = invert_along(_recording(parts.reference, schedule, cond2, outputs), x0, points,
                                  schedule.alphas_cumprod, round_to=STORE_DTYPE)
        last = points[-1].expand(len(x0)).to(x0.device)
        outputs.append(parts.reference(trajectory[:, -1], last, cond2))  # the one extra call: at the top point
        errors = []
        for k, point in enumerate(points.tolist()):  # call k + 1 ran at the state of grid point k
            t = torch.full((len(x0),), point, dtype=torch.long, device=x0.device)
            eps_star = implied_noise(trajectory[:, k], x0, t, schedule.alphas_cumprod)
            errors.append(per_sample_mse(outputs[k + 1], schedule.target(x0, eps_star, t)))
        errors = torch.stack(errors, dim=1).float().cpu()
        trajectory = trajectory.cpu()
        suffix = "_flipped" if flipped else ""
        out[f"latents_0{suffix}"], out[f"latents_1{suffix}"] = trajectory.chunk(2)
        out[f"ref_err_0{suffix}"], out[f"ref_err_1{suffix}"] = errors.chunk(2)
    return out


def _recording(reference, schedule, cond2: dict, outputs: list):
    """The reference as ``invert_along``'s denoiser (eps), appending each raw output to ``outputs``."""
    def denoise(z, s):
        outputs.append(reference(z, s, cond2))
        return schedule.eps_from_output(outputs[-1], z, s)
    return denoise
