"""InPO's cached inversion: the trajectory along the fixed grid, its cache, and the step that reads it.

The claim of issue 21: with a frozen reference the DDIM inversion of an image is a function of the
image, its prompt and the grid, so reading it from a cache built once gives the same step (loss and
gradients, to fp16 storage tolerance) as inverting on the fly, at no inversion passes per step.
"""

import json

import numpy as np
import pytest
import torch
from test_trainer import manifest  # noqa: F401  (the fixture: 12 world-render pairs)

from diffpref.inversion import ddim_invert, fixed_grid, grid_prefix, invert_along
from diffpref.training.config import TrainConfig


def _toy_denoiser(x, t):
    """A smooth nonlinear eps(x, t) that differs per timestep, so a wrong path or timestep shows."""
    return torch.tanh(0.7 * x + 0.002 * t.float().view(-1, *([1] * (x.dim() - 1)))) + 0.1 * x.roll(1, dims=-1)


def test_fixed_grid_is_the_public_ten_step_grid():
    assert fixed_grid(10, 1000).tolist() == [100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    assert fixed_grid(4, 1000).tolist() == [250, 500, 749, 999]
    assert fixed_grid(4, 3).tolist() == [1, 2]  # repeated points of a short range collapse


def test_trajectory_equals_the_on_the_fly_inversion_to_every_grid_point():
    """invert_along's state k is what ddim_invert returns walking the grid's prefix up to point k; samples that
    stop earlier in one batch (padded grids) get the same numbers as a batch that walks all the way."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 6, 6, generator=gen, dtype=torch.float64)
    abar = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
    points = fixed_grid(6, 1000)
    trajectory = invert_along(_toy_denoiser, x0, points, abar)
    assert trajectory.shape == (5, len(points), 4, 6, 6)
    index = torch.tensor([0, 5, 2, 3, 5])
    inv = ddim_invert(_toy_denoiser, x0, points[index], abar, grid=grid_prefix(points, index))
    torch.testing.assert_close(inv.x_t, trajectory[torch.arange(5), index], rtol=0, atol=1e-12)
    # an independent two-line DDIM walk for one sample (Song et al. 2021, eq. 13 forwards)
    x, s_prev = x0[1:2], None
    for s in points.tolist():
        eps = _toy_denoiser(x, torch.tensor([0 if s_prev is None else s_prev]))
        a_prev = 1.0 if s_prev is None else abar[s_prev]
        x = abar[s].sqrt() * (x - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5 + (1 - abar[s]).sqrt() * eps
        s_prev = s
    torch.testing.assert_close(x[0], trajectory[1, -1], rtol=0, atol=1e-12)


def test_explicit_grid_must_end_at_t():
    x0 = torch.zeros(2, 1, 2, 2)
    abar = torch.linspace(0.99, 0.01, 100)
    with pytest.raises(ValueError, match="end at each sample's t"):
        ddim_invert(_toy_denoiser, x0, torch.tensor([50, 60]), abar, grid=torch.tensor([[0, 50], [0, 50]]))


def _parts(tmp_path, model_dir, data, **overrides):
    from diffpref.training.trainer import _accelerator, _load

    settings = {"method": "inpo", "model": str(model_dir), "data_path": str(data), "output_dir": str(tmp_path / "out"),
                "train_batch_size": 6, "lora_rank": 4, "report_to": "none", "cache_dir": str(tmp_path / "cache"),
                "seed": 0, "inversion_steps": 5, "threads": 1, "prompt_dropout": 0.5}
    cfg = TrainConfig(**{**settings, **overrides})
    return _load(cfg, _accelerator(cfg), None)[0]


def _loss_and_grads(parts, batch, mb):
    from diffpref.training.step import objective_output

    out = objective_output(parts, batch, mb.noise, mb.t)
    loss = out.loss.mean()
    grads = torch.autograd.grad(loss, parts.params)
    return out, loss.detach(), grads


def test_cached_inversion_step_equals_the_on_the_fly_step(tmp_path, tiny_sd15_dir, manifest):  # noqa: F811
    """Same t, same latents, same LoRA init: the step reading x_t from the cache and the step inverting with the
    reference agree in loss and every gradient to fp16 tolerance (the cache stores x_t in fp16), and the cached
    one runs no inversion pass and no reference pass for the samples that keep their prompt. Half the prompts are
    dropped: both invert with the image's own prompt."""
    from diffpref.training.objectives import (
        ObjectiveInputs,
        _inverted,
        _pair_errors,
        _reference_errors,
    )
    from diffpref.training.step import draw_micro_batch

    parts = _parts(tmp_path, tiny_sd15_dir, manifest)
    assert parts.inversion is not None and len(parts.inversion) == len(parts.cache) == 12
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the LoRA off its zero start, where policy == reference and the loss is log 2
        for param in parts.params:
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    for step in range(3):  # several draws: several grid points, dropped and kept prompts
        mb = draw_micro_batch(parts, step)
        assert set(mb.t.tolist()) <= set(parts.inversion_points.tolist())
        on_the_fly = {k: v for k, v in mb.batch.items() if not k.startswith(("inverted_", "ref_err_"))}
        cached_out, cached_loss, cached_grads = _loss_and_grads(parts, mb.batch, mb)
        fly_out, fly_loss, fly_grads = _loss_and_grads(parts, on_the_fly, mb)
        assert cached_out.extra_forward_passes == 0 and fly_out.extra_forward_passes == 5
        # x_t: the cached one is the on-the-fly one rounded to fp16
        fly_x_t = _inverted(ObjectiveInputs(on_the_fly, parts.policy, parts.reference, parts.schedule, mb.noise, mb.t,
                                            parts.cfg)).x_t
        cached_x_t = torch.cat([mb.batch["inverted_0"], mb.batch["inverted_1"]])
        # the cached walk rounds each state to fp16 as it goes: fp16-level relative error from the unrounded walk
        assert float((cached_x_t - fly_x_t).norm() / fly_x_t.norm()) < 2e-3
        # the cached reference errors are the reference pass's at the stored x_t (kept prompts; dropped: live)
        pairs = _inverted(ObjectiveInputs(mb.batch, parts.policy, parts.reference, parts.schedule, mb.noise, mb.t,
                                          parts.cfg))
        live = _pair_errors(parts.reference, pairs.x_t, pairs.t2, pairs.cond2, pairs.target)
        cached = _reference_errors(ObjectiveInputs(mb.batch, parts.policy, parts.reference, parts.schedule, mb.noise,
                                                   mb.t, parts.cfg), pairs)
        assert bool(mb.batch["prompt_dropped"].any()) or step < 2
        for a, b in zip(cached, live):
            torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(cached_loss, fly_loss, rtol=2e-3, atol=1e-5)
        a, b = torch.cat([g.flatten() for g in cached_grads]), torch.cat([g.flatten() for g in fly_grads])
        assert float((a - b).norm() / b.norm()) < 1e-2, "gradients differ beyond fp16 rounding of x_t"
        # The comparison can fail: x_t of another grid point changes the loss well beyond the tolerance.
        shifted = dict(mb.batch, inverted_0=mb.batch["inverted_1"], inverted_1=mb.batch["inverted_0"],
                       ref_err_0=mb.batch["ref_err_1"], ref_err_1=mb.batch["ref_err_0"])
        assert not torch.allclose(_loss_and_grads(parts, shifted, mb)[1], fly_loss, rtol=2e-3, atol=1e-5)


def test_inversion_cache_is_reused_and_keyed_by_the_grid(tmp_path, tiny_sd15_dir, manifest):  # noqa: F811
    first = _parts(tmp_path, tiny_sd15_dir, manifest)
    built = first.inversion.path
    meta = json.loads((built / "meta.json").read_text())
    assert meta["points"] == first.inversion_points.tolist() and meta["latent_cache"] == first.cache.key
    stamp = sorted(p.stat().st_mtime_ns for p in built.glob("inv-*.safetensors"))
    again = _parts(tmp_path, tiny_sd15_dir, manifest)
    assert again.inversion.path == built
    assert sorted(p.stat().st_mtime_ns for p in built.glob("inv-*.safetensors")) == stamp  # reused, not rebuilt
    other = _parts(tmp_path, tiny_sd15_dir, manifest, inversion_steps=3)
    assert other.inversion.path != built and other.inversion.points.tolist() == fixed_grid(3, 1000).tolist()
    # A policy inversion follows the trained weights: never cached, inverted every step.
    assert _parts(tmp_path, tiny_sd15_dir, manifest, inversion_model="policy").inversion is None
    # fp16 on disk: K latents per image
    stored = np.prod(meta["latent_shape"]) * len(meta["points"]) * 2 * 2
    size = sum(p.stat().st_size for p in built.glob("inv-*.safetensors"))
    stored += len(meta["points"]) * 2 * 4  # the reference's errors: K fp32 per image
    assert stored * 12 <= size < stored * 12 + 4096
