"""Data order and per-sample noise as pure functions of (seed, micro-step, position).

Nothing here carries hidden RNG state, which buys two properties for free: resuming from a
checkpoint continues the exact same stream (no RNG state to restore), and N processes that each
take a slice of the global batch see exactly the samples, noise and timesteps one process would.
"""

from __future__ import annotations

import torch

_MASK = (1 << 63) - 1


def mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style finaliser, so nearby inputs decorrelate)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


def batches_per_epoch(num_items: int, global_batch: int) -> int:
    if num_items < global_batch:
        raise ValueError(f"the data has {num_items} usable items but one global batch needs {global_batch}; "
                         "lower train_batch_size (or the number of processes) or add data")
    return num_items // global_batch  # the incomplete tail of an epoch is dropped


def global_batch_indices(micro_step: int, num_items: int, global_batch: int, seed: int) -> torch.Tensor:
    """Dataset indices of global micro-batch ``micro_step``: a fresh permutation every epoch."""
    per_epoch = batches_per_epoch(num_items, global_batch)
    epoch, k = divmod(micro_step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(mix(seed, epoch, 0xDA7A)))
    return perm[k * global_batch:(k + 1) * global_batch]


def local_slice(global_batch: int, rank: int, world_size: int) -> slice:
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not split over {world_size} processes")
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


def sample_generators(micro_step: int, positions: range | list[int], seed: int) -> list[torch.Generator]:
    """One generator per sample, keyed by its position in the global batch."""
    return [torch.Generator().manual_seed(mix(seed, micro_step, p, 0x5EED)) for p in positions]


def per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def per_sample_timesteps(generators: list[torch.Generator], num_train_timesteps: int, low: int = 0) -> torch.Tensor:
    """One timestep per sample, uniform in ``[low, num_train_timesteps)``."""
    return torch.cat([torch.randint(low, num_train_timesteps, (1,), generator=g) for g in generators])


def per_sample_uniform(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def flip_choices(micro_step: int, positions: range | list[int], images: int, seed: int) -> torch.Tensor:
    """[len(positions), images] bool: which images of each sample are mirrored (probability 1/2 each,
    independently, as the official Diffusion-DPO code's RandomHorizontalFlip on each image)."""
    return torch.tensor([[mix(seed, micro_step, p, k, 0xF11B) & 1 == 1 for k in range(images)] for p in positions],
                        dtype=torch.bool).reshape(len(positions), images)
