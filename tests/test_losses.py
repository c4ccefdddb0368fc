"""Preference losses and DDIM inversion, each checked against an independent computation.

Expected values come from plain ``math`` on python floats (or from a known forward process
for the inversion), never from the torch expression under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffpref.inversion import InversionResult, ddim_invert, inversion_grid
from diffpref.losses import (
    diffusion_dpo_loss,
    dpo_metrics,
    inpo_loss,
    kto_loss,
    kto_reference_point,
    mapo_loss,
    per_sample_mse,
    sft_loss,
    soft_label_dpo_loss,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _neg_log_sigmoid(x: float) -> float:
    """-log(1 / (1 + exp(-x))) on floats, stable for large |x|."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- Diffusion-DPO


# (model_w, model_l, ref_w, ref_l, beta)
DPO_CASES = [
    (0.10, 0.12, 0.11, 0.11, 100.0),
    (0.30, 0.20, 0.25, 0.25, 50.0),
    (0.05, 0.07, 0.06, 0.09, 5000.0),
    (0.50, 0.50, 0.40, 0.45, 10.0),
]


@pytest.mark.parametrize("case", DPO_CASES)
def test_dpo_matches_hand_computation(case):
    mw, ml, rw, rl, beta = case
    bracket = (mw - ml) - (rw - rl)
    expected = _neg_log_sigmoid(-beta / 2 * bracket)
    loss = diffusion_dpo_loss(_t(mw), _t(ml), _t(rw), _t(rl), beta)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_dpo_is_per_sample_and_equals_inpo():
    cols = list(zip(*DPO_CASES))
    mw, ml, rw, rl = (_t(*c) for c in cols[:4])
    beta = 20.0
    loss = diffusion_dpo_loss(mw, ml, rw, rl, beta)
    assert loss.shape == (len(DPO_CASES),)
    for i, (a, b, c, d, _) in enumerate(DPO_CASES):
        assert loss[i].item() == pytest.approx(_neg_log_sigmoid(-beta / 2 * ((a - b) - (c - d))), rel=1e-9)
    torch.testing.assert_close(inpo_loss(mw, ml, rw, rl, beta), loss, rtol=0, atol=0)


def test_dpo_equal_errors_give_log2_and_symmetry():
    e = _t(0.2, 0.7)
    assert diffusion_dpo_loss(e, e, e, e, 5000.0).tolist() == pytest.approx([math.log(2)] * 2)
    # The same bracket from any errors gives log 2 when model and reference agree.
    loss = diffusion_dpo_loss(_t(0.3), _t(0.1), _t(0.3), _t(0.1), 5000.0)
    assert loss.item() == pytest.approx(math.log(2))
    # Swapping winner and loser negates the sigmoid's argument x.
    mw, ml, rw, rl = 0.1, 0.15, 0.12, 0.12
    beta = 40.0
    x = -beta / 2 * ((mw - ml) - (rw - rl))
    forward = diffusion_dpo_loss(_t(mw), _t(ml), _t(rw), _t(rl), beta).item()
    swapped = diffusion_dpo_loss(_t(ml), _t(mw), _t(rl), _t(rw), beta).item()
    assert forward == pytest.approx(_neg_log_sigmoid(x))
    assert swapped == pytest.approx(_neg_log_sigmoid(-x))
    assert forward < math.log(2) < swapped  # the model moved towards the winner


def test_dpo_huge_beta_finite_with_right_gradient_sign():
    beta = 1e12
    # Sample 0: the model prefers the loser (bracket > 0), sample 1: the winner (bracket < 0).
    mw = torch.tensor([0.5, 0.1], dtype=torch.float32, requires_grad=True)
    ml = torch.tensor([0.1, 0.5], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([0.3, 0.3], dtype=torch.float32)
    loss = diffusion_dpo_loss(mw, ml, ref, ref, beta)
    assert torch.isfinite(loss).all()
    # Far in the linear regime: loss = beta/2 * bracket = 0.5e12 * 0.4.
    assert loss[0].item() == pytest.approx(0.5e12 * 0.4, rel=1e-5)
    assert loss[1].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(mw.grad).all() and torch.isfinite(ml.grad).all()
    assert mw.grad[0].item() == pytest.approx(beta / 2) and ml.grad[0].item() == pytest.approx(-beta / 2)
    assert mw.grad[1].item() >= 0.0 and ml.grad[1].item() <= 0.0


def test_dpo_shape_errors():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match=r"\[3\].*\[4\]|\[4\].*\[3\]"):
        diffusion_dpo_loss(a, a, a, torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match=r"shape \[3, 1\]"):
        diffusion_dpo_loss(a, a, torch.zeros(3, 1), a, 1.0)
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(a, a, a, a, 0.0)
    with pytest.raises(ValueError, match="label"):
        soft_label_dpo_loss(a, a, a, a, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="label"):
        soft_label_dpo_loss(a, a, a, a, 1.5, 1.0)


# ---------------------------------------------------------------- soft labels


def test_soft_label_limits_and_tie_symmetry():
    e0, e1, r0, r1 = _t(0.1, 0.4), _t(0.2, 0.3), _t(0.15, 0.35), _t(0.12, 0.31)
    beta = 30.0
    hard_0 = diffusion_dpo_loss(e0, e1, r0, r1, beta)
    hard_1 = diffusion_dpo_loss(e1, e0, r1, r0, beta)
    assert torch.equal(soft_label_dpo_loss(e0, e1, r0, r1, 1.0, beta), hard_0)
    assert torch.equal(soft_label_dpo_loss(e0, e1, r0, r1, torch.ones(2, dtype=torch.float64), beta), hard_0)
    assert torch.equal(soft_label_dpo_loss(e0, e1, r0, r1, 0.0, beta), hard_1)
    # A tie is symmetric: swapping the images does not change the loss.
    tie = soft_label_dpo_loss(e0, e1, r0, r1, 0.5, beta)
    torch.testing.assert_close(tie, soft_label_dpo_loss(e1, e0, r1, r0, 0.5, beta))
    # Per-sample labels, against floats.
    labels = [0.25, 0.9]
    soft = soft_label_dpo_loss(e0, e1, r0, r1, torch.tensor(labels, dtype=torch.float64), beta)
    for i, p in enumerate(labels):
        x = -beta / 2 * ((e0[i].item() - e1[i].item()) - (r0[i].item() - r1[i].item()))
        assert soft[i].item() == pytest.approx(p * _neg_log_sigmoid(x) + (1 - p) * _neg_log_sigmoid(-x), rel=1e-9)


# ---------------------------------------------------------------- metrics


def test_dpo_metrics_against_floats():
    mw, ml, rw, rl = [0.1, 0.3, 0.2], [0.2, 0.1, 0.2], [0.15, 0.2, 0.1], [0.15, 0.2, 0.2]
    beta = 8.0
    brackets = [(a - b) - (c - d) for a, b, c, d in zip(mw, ml, rw, rl)]
    metrics = dpo_metrics(_t(*mw), _t(*ml), _t(*rw), _t(*rl), beta)
    assert set(metrics) == {"implicit_acc", "reward_margin", "model_margin", "ref_margin"}
    assert float(metrics["implicit_acc"]) == pytest.approx(sum(b < 0 for b in brackets) / 3)
    assert float(metrics["reward_margin"]) == pytest.approx(sum(-beta / 2 * b for b in brackets) / 3)
    assert float(metrics["model_margin"]) == pytest.approx(sum(a - b for a, b in zip(mw, ml)) / 3)
    assert float(metrics["ref_margin"]) == pytest.approx(sum(c - d for c, d in zip(rw, rl)) / 3)
    assert all(not torch.as_tensor(v).requires_grad for v in metrics.values())


# ---------------------------------------------------------------- KTO


def test_kto_signs_weights_and_values():
    model, ref = [0.1, 0.3, 0.2, 0.2], [0.2, 0.2, 0.1, 0.3]
    liked = [True, True, False, False]
    beta, kl, wd, wu = 10.0, 0.02, 1.5, 0.7
    loss = kto_loss(_t(*model), _t(*ref), torch.tensor(liked), beta, kl, desirable_weight=wd, undesirable_weight=wu)
    for i in range(4):
        g = ref[i] - model[i] - kl
        sign, weight = (1.0, wd) if liked[i] else (-1.0, wu)
        assert loss[i].item() == pytest.approx(weight * (1 - _sigmoid(sign * beta * g)), rel=1e-9)
    # Liked and fitted better than the reference: below its weight / 2; disliked and fitted better: above.
    assert loss[0].item() < wd / 2 and loss[3].item() > wu / 2


def test_kto_lower_error_helps_liked_and_hurts_disliked():
    ref = _t(0.2, 0.2)
    model = torch.tensor([0.2, 0.2], dtype=torch.float64, requires_grad=True)
    kto_loss(model, ref, torch.tensor([True, False]), 5.0, 0.0).sum().backward()
    assert model.grad[0].item() > 0  # liked: raising its error raises the loss
    assert model.grad[1].item() < 0  # disliked: raising its error lowers the loss


def test_kto_reference_point_clamped_and_detached():
    model = torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    ref = _t(0.2, 0.25, 0.3)
    kl = kto_reference_point(model, ref)
    assert kl.item() == pytest.approx(((0.2 - 0.1) + (0.25 - 0.3) + (0.3 - 0.2)) / 3)
    assert not kl.requires_grad
    # The model worse than the reference on average: the estimate clamps at 0.
    assert kto_reference_point(_t(0.5, 0.5), _t(0.1, 0.2)).item() == 0.0
    # A negative kl_ref passed directly is clamped too: same loss as kl_ref = 0.
    liked = torch.tensor([True, False, True])
    torch.testing.assert_close(kto_loss(model, ref, liked, 3.0, -1.0), kto_loss(model, ref, liked, 3.0, 0.0))
    # Gradients never flow through kl_ref, even when it is a graph-attached tensor.
    kl_attached = (ref - model).mean()
    kto_loss(model, ref, liked, 3.0, kl_attached).sum().backward()
    grad_with_attached = model.grad.clone()
    model.grad = None
    kto_loss(model, ref, liked, 3.0, kl_attached.item()).sum().backward()
    torch.testing.assert_close(grad_with_attached, model.grad)


# ---------------------------------------------------------------- MaPO


def _mapo_float(err_w: float, err_l: float, beta: float, temperature: float) -> float:
    def log_odds(e: float) -> float:
        p = math.exp(-e)
        return math.log(p / (1 - p))

    margin = temperature * (log_odds(err_w) - log_odds(err_l))
    return err_w + beta * _neg_log_sigmoid(margin)


def test_mapo_hand_computation():
    # By hand: f(0.1) = log(0.9048374 / 0.0951626) = 2.2521685, f(0.12) = log(0.8869204 / 0.1130796) = 2.0596636,
    # margin 0.1925049, -log sigmoid(margin) = 0.6015199, loss = 0.1 + 0.5 * 0.6015199 = 0.4007599.
    assert _mapo_float(0.1, 0.12, 0.5, 1.0) == pytest.approx(0.4007599, abs=1e-6)
    cases = [(0.1, 0.12, 0.5, 1.0), (0.2, 0.15, 0.1, 10.0), (0.05, 0.0501, 0.1, 1000.0), (2.0, 3.0, 1.0, 1.0)]
    for ew, el, beta, temp in cases:
        loss = mapo_loss(_t(ew), _t(el), beta, temperature=temp)
        assert loss.item() == pytest.approx(_mapo_float(ew, el, beta, temp), rel=1e-9)
    # Default temperature is 1000.
    default = mapo_loss(_t(0.05), _t(0.0501), 0.1)
    assert default.item() == pytest.approx(_mapo_float(0.05, 0.0501, 0.1, 1000.0), rel=1e-9)


def test_mapo_prefers_lower_winner_error():
    err_w = torch.tensor([0.10], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([0.12], dtype=torch.float64, requires_grad=True)
    loss = mapo_loss(err_w, err_l, 0.5, temperature=10.0)
    loss.sum().backward()
    assert err_w.grad.item() > 1.0  # SFT term (1) plus a positive margin gradient
    assert err_l.grad.item() < 0.0  # a worse loser lowers the loss
    lower = mapo_loss(_t(0.09), _t(0.12), 0.5, temperature=10.0)
    assert lower.item() < loss.item()
    # Swapping the roles with the SFT term held fixed: only the margin term differs, and it
    # must be the smaller when the winner has the lower error.
    right = mapo_loss(_t(0.1), _t(0.2), 1.0, temperature=10.0).item() - 0.1
    wrong = mapo_loss(_t(0.2), _t(0.1), 1.0, temperature=10.0).item() - 0.2
    assert right < math.log(2) < wrong


def test_mapo_zero_error_finite():
    loss = mapo_loss(torch.zeros(2), torch.tensor([0.0, 0.3]), 0.1)
    assert torch.isfinite(loss).all()


# ---------------------------------------------------------------- SFT and MSE


def test_sft_is_identity():
    e = _t(0.1, 0.2)
    assert torch.equal(sft_loss(e), e)


def test_per_sample_mse_values_and_bf16():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[1.0, 0.0], [0.0, 0.0]]])
    assert per_sample_mse(pred, target).tolist() == pytest.approx([(4 + 4) / 4, (1 + 1) / 4])
    out = per_sample_mse(pred.bfloat16(), target.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert out.tolist() == pytest.approx([2.0, 0.5])
    # 1-D inputs: one scalar per sample, the batch is not averaged away.
    assert per_sample_mse(_t(1.0, 3.0), _t(0.0, 1.0)).tolist() == pytest.approx([1.0, 4.0])
    with pytest.raises(ValueError, match=r"\[2, 2, 2\].*\[2, 4\]"):
        per_sample_mse(pred, target.reshape(2, 4))


# ---------------------------------------------------------------- DDIM inversion


def _alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD's scaled-linear schedule, in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class _OracleDenoiser:
    """Returns the true noise of x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, and checks every call.

    Each call after the first must see exactly the forward-process latent at the timesteps it
    is told, which proves every intermediate step of the inversion lands on the trajectory.
    """

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> None:
        self.x0, self.eps, self.abar = x0, eps, abar
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        assert s.dtype == torch.long and s.shape == x.shape[:1]
        if self.calls:  # the first call sees the clean x0
            a = self.abar[s].reshape(-1, 1, 1, 1)
            torch.testing.assert_close(x, a.sqrt() * self.x0 + (1 - a).sqrt() * self.eps)
        else:
            assert torch.equal(x, self.x0) and (s == 0).all()
        self.calls.append(s.clone())
        return self.eps.clone()


def test_inversion_grid_ends_exactly_at_t():
    t = torch.tensor([0, 3, 99, 537, 999])
    grid = inversion_grid(t, 10)
    assert grid.shape == (5, 11) and grid.dtype == torch.long
    assert (grid[:, 0] == 0).all()
    assert torch.equal(grid[:, -1], t)
    assert (grid[:, 1:] >= grid[:, :-1]).all()
    assert grid[3].tolist() == [round(537 * k / 10) for k in range(11)]
    assert grid[0].tolist() == [0] * 11
    with pytest.raises(ValueError, match="num_steps"):
        inversion_grid(t, 0)


def test_ddim_invert_oracle_lands_on_forward_process():
    abar = _alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([999, 537, 3, 1, 250])  # different per sample, including t < num_steps
    oracle = _OracleDenoiser(x0, eps, abar)
    result = ddim_invert(oracle, x0, t, abar, num_steps=10)
    assert isinstance(result, InversionResult)
    assert result.forward_passes == 10 == len(oracle.calls)
    # Each sample's last real step targets exactly its own t.
    assert torch.equal(result.grid[:, -1], t)
    for i, ti in enumerate(t.tolist()):
        a = abar[ti].item()
        expected = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i]
        torch.testing.assert_close(result.x_t[i], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.eps_star, eps, rtol=1e-9, atol=1e-9)


def test_ddim_invert_t_zero_and_dtype():
    abar = _alphas_cumprod()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 0])
    result = ddim_invert(_OracleDenoiser(x0, eps, abar), x0, t, abar, num_steps=4)
    a0 = abar[0].item()
    torch.testing.assert_close(result.x_t, math.sqrt(a0) * x0 + math.sqrt(1 - a0) * eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.eps_star, eps, rtol=1e-8, atol=1e-8)
    assert result.forward_passes == 4
    # float32 in, float32 out; the denoiser sees the input dtype.
    seen = []
    def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return torch.zeros_like(x)

    out = ddim_invert(denoise, x0.float(), torch.tensor([5, 7]), abar.float(), 2)
    assert out.x_t.dtype == out.eps_star.dtype == torch.float32 and seen == [torch.float32] * 2


def test_ddim_invert_with_eta_is_seeded():
    abar = _alphas_cumprod()
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 400, 999])

    def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return 0.5 * x  # any deterministic stand-in for a UNet

    def run(seed: int, eta: float) -> InversionResult:
        generator = torch.Generator().manual_seed(seed)
        return ddim_invert(denoise, x0, t, abar.float(), num_steps=5, eta=eta, generator=generator)

    first, again, other, plain = run(7, 0.2), run(7, 0.2), run(8, 0.2), run(7, 0.0)
    assert torch.equal(first.x_t, again.x_t) and torch.equal(first.eps_star, again.eps_star)
    assert not torch.allclose(first.x_t, other.x_t)  # another seed, other noise
    # The same noise weighs more the larger eta is: x_t moves further from plain DDIM's, per sample.
    farther = run(7, 0.6)
    gap = lambda result: (result.x_t - plain.x_t).flatten(1).norm(dim=1)  # noqa: E731
    assert (gap(first) > 1e-3).all() and (gap(farther) > 2 * gap(first)).all()
    assert torch.isfinite(first.x_t).all() and torch.isfinite(first.eps_star).all()


def test_ddim_invert_rejects_bad_inputs():
    abar = _alphas_cumprod(100)
    x0 = torch.zeros(2, 1, 2, 2)
    denoise = lambda x, s: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\]"):
        ddim_invert(denoise, x0, torch.tensor([0, 100]), abar)
    with pytest.raises(ValueError, match="shape"):
        ddim_invert(denoise, x0, torch.tensor([1, 2, 3]), abar)
    with pytest.raises(ValueError, match="integer"):
        ddim_invert(denoise, x0, torch.tensor([1.0, 2.0]), abar)
    with pytest.raises(ValueError, match="eta"):
        ddim_invert(denoise, x0, torch.tensor([1, 2]), abar, eta=1.5)
