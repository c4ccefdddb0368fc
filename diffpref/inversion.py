"""DDIM inversion of clean latents to exactly a per-sample timestep, for DDIM-InPO.

InPO trains on latents that the current model actually maps back to the data: each clean
latent x0 is carried up to its sampled timestep t by deterministic DDIM inversion, and the
training target is the noise that x_t implies, eps* = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

The public InPO code inverts along a fixed 10-step grid only up to the last grid point below
t, steps once more and then labels the result with t (off by up to 100 timesteps), and uses
the first sample's t for the whole batch. Here every sample is inverted along its own grid,
which ends exactly at its own t, in one batched denoiser call per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["InversionResult", "ddim_invert", "inversion_grid"]

# denoise(x_t, t) -> predicted noise eps, same shape as x_t; t is a LongTensor [B] (one timestep per sample).
Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass
class InversionResult:
    """What ``ddim_invert`` returns.

    ``x_t``: the inverted latents, exactly at each sample's t (dtype of x0).
    ``eps_star``: the noise x_t implies, (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): the target
    of the InPO errors (dtype of x0).
    ``forward_passes``: denoiser calls made (one batched call per step), for logging the extra
    cost over plain Diffusion-DPO.
    ``grid``: the per-sample timestep grid walked, LongTensor [B, num_steps + 1] (see ``inversion_grid``).
    """

    x_t: Tensor
    eps_star: Tensor
    forward_passes: int
    grid: Tensor | None = None


def inversion_grid(t: Tensor, num_steps: int) -> Tensor:
    """Per-sample grids of ``num_steps + 1`` timesteps from 0 to each sample's t: LongTensor [B, num_steps + 1].

    Row i is ``linspace(0, t_i, num_steps + 1).round()``, so its last entry is exactly t_i.
    Column 0 stands for the clean input x0 (see ``ddim_invert``). When t_i < num_steps the
    rounding repeats timesteps; a repeated point is a no-op step, so every sample still takes
    ``num_steps`` steps and the batch stays in lockstep (one denoiser call per step).
    """
    if t.ndim != 1:
        raise ValueError(f"t must be a LongTensor of shape [B], got shape {list(t.shape)}")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    fractions = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64, device=t.device)
    grid = (t.to(torch.float64)[:, None] * fractions[None, :]).round().long()
    # fractions[-1] is exactly 1.0, but pin the end anyway: ending at t is the whole point.
    grid[:, -1] = t.long()
    return grid


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] so a per-sample coefficient broadcasts over a latent of ``ndim`` dims."""
    return values.reshape(-1, *([1] * (ndim - 1)))


@torch.no_grad()
def ddim_invert(
    denoise: Denoiser,
    x0: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    num_steps: int = 10,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> InversionResult:
    """Invert clean latents x0 [B, ...] by DDIM to exactly timestep t[i] per sample, with eps* at the end.

    Implements Song et al. 2021 (DDIM), eq. 13 run forwards in time (deterministic inversion).
    Serves Lu et al., CVPR 2025 (DDIM-InPO): x_t and eps* are the inputs of ``losses.inpo_loss``.

    Each step s -> s' (s < s') of a sample's grid (``inversion_grid``) does
    eps = denoise(x_s, s); x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s);
    x_s' = sqrt(abar_s') x0_hat + sqrt(1 - abar_s') eps.
    Steps with s == s' (repeated grid points when t < num_steps) leave x unchanged.

    Start convention: the first state is x0 itself, shown to the denoiser at timestep 0 (the
    lowest timestep the network knows), but the update uses abar = 1 for it rather than
    ``alphas_cumprod[0]`` (< 1): x0 carries no noise, and treating it as already noised at
    abar_0 would shift x0_hat by sqrt(1 - abar_0) eps, an error that eps* at small t
    magnifies by 1 / sqrt(1 - abar_t). So the first step is x_s1 = sqrt(abar_s1) x0 +
    sqrt(1 - abar_s1) eps, and t = 0 is a real step to abar_0 (eps* = the model's eps at x0).

    ``eta`` > 0 adds a little stochasticity: the noise direction of each step becomes
    sqrt(1 - eta^2) eps + eta z with fresh z ~ N(0, I) (drawn from ``generator``), while
    x0_hat still uses the model's eps; this is DDIM's eq. 12 with sigma = eta * sqrt(1 - abar_s')
    and keeps the marginal noise scale. eta = 0 is plain deterministic DDIM.

    ``denoise(x, timesteps)`` must return the noise prediction (convert v-prediction first)
    and is called ``num_steps`` times with the whole batch and a LongTensor [B] of timesteps.
    Arithmetic runs in at least float32 whatever x0's dtype; the denoiser sees x0's dtype.
    Runs under ``torch.no_grad``: x_t and eps* are fixed inputs and targets of the loss.
    """
    if x0.ndim < 1 or t.shape != x0.shape[:1]:
        raise ValueError(
            f"t must have shape [B] = {list(x0.shape[:1])} to match x0 {list(x0.shape)}, got {list(t.shape)}"
        )
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}")
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must have shape [T], got {list(alphas_cumprod.shape)}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must lie in [0, 1] (0 = deterministic DDIM)")
    num_train_timesteps = alphas_cumprod.shape[0]
    # One host sync, worth it: an out-of-range index on GPU is an opaque device-side assert.
    if bool(((t < 0) | (t >= num_train_timesteps)).any()):
        raise ValueError(f"t must lie in [0, {num_train_timesteps - 1}], got {t.tolist()}")

    compute_dtype = torch.promote_types(x0.dtype, torch.float32)
    device = x0.device
    t = t.to(device=device, dtype=torch.long)
    abar = alphas_cumprod.to(device=device, dtype=compute_dtype)
    grid = inversion_grid(t, num_steps)  # (batch, num_steps + 1)
    x0_c = x0.to(compute_dtype)
    x = x0_c

    for k in range(num_steps):
        s, s_next = grid[:, k], grid[:, k + 1]
        eps = denoise(x.to(x0.dtype), s).to(compute_dtype)
        # Column 0 is the clean x0: abar = 1 there, so x0_hat is exactly x0 (see docstring).
        abar_s = torch.ones_like(s, dtype=compute_dtype) if k == 0 else abar[s]
        abar_next = abar[s_next]
        a_s, a_next = _per_sample(abar_s, x.ndim), _per_sample(abar_next, x.ndim)
        x0_hat = (x - (1.0 - a_s).sqrt() * eps) / a_s.sqrt()
        direction = eps
        if eta > 0.0:
            # Draw for the whole batch every step, so the stream (and the result) depends only
            # on the seed, not on which samples happen to take a real step.
            z = torch.randn(x.shape, generator=generator, device=device, dtype=compute_dtype)
            direction = (1.0 - eta**2) ** 0.5 * eps + eta * z
        x_next = a_next.sqrt() * x0_hat + (1.0 - a_next).sqrt() * direction
        # A repeated grid point is no step at all; the clean start (k == 0) always moves.
        moves = (s_next > s) if k > 0 else torch.ones_like(s, dtype=torch.bool)
        x = torch.where(_per_sample(moves, x.ndim), x_next, x)

    a_t = _per_sample(abar[t], x.ndim)
    eps_star = (x - a_t.sqrt() * x0_c) / (1.0 - a_t).sqrt()
    return InversionResult(
        x_t=x.to(x0.dtype),
        eps_star=eps_star.to(x0.dtype),
        forward_passes=num_steps,
        grid=grid,
    )
