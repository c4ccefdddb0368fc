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

__all__ = ["InversionResult", "ddim_invert", "fixed_grid", "grid_prefix", "implied_noise", "inversion_grid", "invert_along"]

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


def fixed_grid(num_steps: int, high: int) -> Tensor:
    """The shared timestep grid of cached InPO: LongTensor [K] of the points ``round(linspace(0, high - 1,
    num_steps + 1))[1:]``.

    Every InPO training timestep is one of these points, so the reference's inversion of an image along
    the grid is one trajectory per image (``invert_along``) that can be computed once and cached. With
    ``num_steps`` = 10 and 1000 training timesteps the points are 100, 200, ..., 999: the public InPO
    code's 10-step inversion grid, but every t is labelled with the timestep it was inverted to.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if high < 2:
        raise ValueError(f"high={high} must be >= 2")
    points = torch.linspace(0.0, float(high - 1), num_steps + 1, dtype=torch.float64).round().long()[1:]
    return torch.unique(points[points > 0])  # sorted; a small high can repeat points


def grid_prefix(points: Tensor, index: Tensor) -> Tensor:
    """Per-sample grids [B, K + 1] that walk ``points`` [K] from x0 up to ``points[index[i]]`` and then stay.

    Row i is ``[0, p_0, ..., p_index[i], p_index[i], ...]``: the same path the cached trajectory took up
    to that point, padded with repeats (no-op steps in ``ddim_invert``) so the batch stays in lockstep.
    """
    k = torch.arange(len(points), device=index.device)
    upto = torch.minimum(k[None, :], index.to(torch.long)[:, None])  # [B, K]
    body = points.to(index.device)[upto]
    return torch.cat([torch.zeros_like(body[:, :1]), body], dim=1)


def _walk(denoise: Denoiser, x0: Tensor, grid: Tensor, alphas_cumprod: Tensor, eta: float,
          generator: torch.Generator | None, keep: bool, round_to: torch.dtype | None = None) -> tuple[Tensor, list[Tensor]]:
    """DDIM steps along per-sample ``grid`` [B, n + 1] (column 0 = the clean x0); the end state and, with
    ``keep``, every intermediate state (after each column 1..n), all in the compute dtype. ``round_to``:
    round every state to this dtype as it is reached (a walk whose states are exactly what gets stored)."""
    compute_dtype = torch.promote_types(x0.dtype, torch.float32)
    abar = alphas_cumprod.to(device=x0.device, dtype=compute_dtype)
    x, states = x0.to(compute_dtype), []
    for k in range(grid.shape[1] - 1):
        s, s_next = grid[:, k], grid[:, k + 1]
        eps = denoise(x.to(x0.dtype), s).to(compute_dtype)
        # Column 0 is the clean x0: abar = 1 there, so x0_hat is exactly x0 (see ddim_invert).
        abar_s = torch.ones_like(s, dtype=compute_dtype) if k == 0 else abar[s]
        a_s, a_next = _per_sample(abar_s, x.ndim), _per_sample(abar[s_next], x.ndim)
        x0_hat = (x - (1.0 - a_s).sqrt() * eps) / a_s.sqrt()
        direction = eps
        if eta > 0.0:
            # Draw for the whole batch every step, so the stream (and the result) depends only
            # on the seed, not on which samples happen to take a real step.
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=compute_dtype)
            direction = (1.0 - eta**2) ** 0.5 * eps + eta * z
        x_next = a_next.sqrt() * x0_hat + (1.0 - a_next).sqrt() * direction
        # A repeated grid point is no step at all; the clean start (k == 0) always moves.
        moves = (s_next > s) if k > 0 else torch.ones_like(s, dtype=torch.bool)
        x = torch.where(_per_sample(moves, x.ndim), x_next, x)
        if round_to is not None:
            x = x.to(round_to).to(compute_dtype)
        if keep:
            states.append(x)
    return x, states


def _check_inputs(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, eta: float) -> None:
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


def implied_noise(x_t: Tensor, x0: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """eps* = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), in at least float32: the noise x_t implies."""
    compute_dtype = torch.promote_types(x0.dtype, torch.float32)
    a_t = _per_sample(alphas_cumprod.to(device=x0.device, dtype=compute_dtype)[t.to(x0.device)], x0.ndim)
    return (x_t.to(compute_dtype) - a_t.sqrt() * x0.to(compute_dtype)) / (1.0 - a_t).sqrt()


@torch.no_grad()
def ddim_invert(
    denoise: Denoiser,
    x0: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    num_steps: int = 10,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    grid: Tensor | None = None,
) -> InversionResult:
    """Invert clean latents x0 [B, ...] by DDIM to exactly timestep t[i] per sample, with eps* at the end.

    Implements Song et al. 2021 (DDIM), eq. 13 run forwards in time (deterministic inversion).
    Serves Lu et al., CVPR 2025 (DDIM-InPO): x_t and eps* are the inputs of ``losses.inpo_loss``.

    Each step s -> s' (s < s') of a sample's grid (``inversion_grid``, or ``grid`` when given) does
    eps = denoise(x_s, s); x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s);
    x_s' = sqrt(abar_s') x0_hat + sqrt(1 - abar_s') eps.
    Steps with s == s' (repeated grid points when t < num_steps) leave x unchanged.

    ``grid``: an explicit per-sample grid [B, n + 1] (column 0 = 0, last column = t, non-decreasing),
    e.g. ``grid_prefix`` of a ``fixed_grid``: the on-the-fly twin of the cached trajectory.

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
    and is called once per grid step with the whole batch and a LongTensor [B] of timesteps.
    Arithmetic runs in at least float32 whatever x0's dtype; the denoiser sees x0's dtype.
    Runs under ``torch.no_grad``: x_t and eps* are fixed inputs and targets of the loss.
    """
    _check_inputs(x0, t, alphas_cumprod, eta)
    t = t.to(device=x0.device, dtype=torch.long)
    if grid is None:
        grid = inversion_grid(t, num_steps)  # (batch, num_steps + 1)
    else:
        grid = grid.to(device=x0.device, dtype=torch.long)
        if grid.ndim != 2 or grid.shape[0] != t.shape[0] or bool((grid[:, 0] != 0).any()) \
                or bool((grid[:, -1] != t).any()) or bool((grid.diff(dim=1) < 0).any()):
            raise ValueError("grid must be [B, n + 1], start at 0, end at each sample's t and never decrease")
    x, _ = _walk(denoise, x0, grid, alphas_cumprod, eta, generator, keep=False)
    return InversionResult(
        x_t=x.to(x0.dtype),
        eps_star=implied_noise(x, x0, t, alphas_cumprod).to(x0.dtype),
        forward_passes=grid.shape[1] - 1,
        grid=grid,
    )


@torch.no_grad()
def invert_along(denoise: Denoiser, x0: Tensor, points: Tensor, alphas_cumprod: Tensor,
                 round_to: torch.dtype | None = None) -> Tensor:
    """The deterministic DDIM trajectory of x0 [B, ...] along the shared grid ``points`` [K]: [B, K, ...].

    Entry [:, k] is x at ``points[k]``: what ``ddim_invert(..., grid=grid_prefix(points, k))`` returns,
    computed for every k in ``K`` denoiser calls (the cached InPO inversion, ``training.cache.inversion``).
    Same arithmetic as ``ddim_invert`` (Song et al. 2021, eq. 13 forwards in time), eta = 0. ``round_to``
    (e.g. float16, the cache's dtype): every state is rounded as it is reached, so each denoiser call after
    the first sees exactly a stored state (the cache records the reference's outputs there, see
    ``training.cache.inversion``); the result then differs from the unrounded walk by a few ulps of it.
    """
    if points.ndim != 1 or not len(points):
        raise ValueError(f"points must be a non-empty LongTensor [K], got shape {list(points.shape)}")
    points = points.to(device=x0.device, dtype=torch.long)
    _check_inputs(x0, points[-1].expand(x0.shape[0]), alphas_cumprod, 0.0)
    grid = torch.cat([torch.zeros_like(points[:1]), points])[None, :].expand(x0.shape[0], -1)
    _, states = _walk(denoise, x0, grid, alphas_cumprod, 0.0, None, keep=True, round_to=round_to)
    return torch.stack(states, dim=1).to(x0.dtype)
