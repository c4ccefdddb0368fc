"""Preference objectives for diffusion models, one function per objective, all per-sample.

Every objective takes per-sample denoising errors (``per_sample_mse`` of a prediction
against its target, shape ``[B]``) and returns a per-sample loss of shape ``[B]``; the
caller reduces it (mean, or a weighted mean), as k-diffusion's denoisers do. Keeping the
UNet calls out of this file means each objective can be checked against hand-computed
numbers, and one training loop serves all of them.

Convention for pairs: ``*_w`` is the preferred image (winner), ``*_l`` the rejected one
(loser), both noised with the same timestep and noise. A lower error means the model finds
the image more likely, so every objective below rewards a lower winner error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "diffusion_dpo_loss",
    "dpo_metrics",
    "inpo_loss",
    "kto_loss",
    "kto_reference_point",
    "mapo_loss",
    "per_sample_mse",
    "sft_loss",
    "soft_label_dpo_loss",
]

# MaPO's default temperature: the MaPO reference training script scales the log-odds
# margin by the scheduler's num_train_timesteps (1000 for SD1.5/SDXL) before the sigmoid.
MAPO_TEMPERATURE = 1000.0

# Errors below this are clamped in MaPO's log-odds: log(exp(-e) / (1 - exp(-e))) goes to +inf
# as e -> 0, and an exactly-zero error (e.g. a degenerate all-zero latent) must not produce inf.
MAPO_MIN_ERR = 1e-8


def _as_float(x: Tensor) -> Tensor:
    """``x`` in at least float32: bf16/fp16 errors lose the small margins the losses live on."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_errors(**errors: Tensor) -> None:
    """Raise ValueError unless every error is a 1-D tensor and all have the same shape [B]."""
    shapes = {name: tuple(err.shape) for name, err in errors.items()}
    for name, shape in shapes.items():
        if len(shape) != 1:
            raise ValueError(
                f"{name} must be a per-sample error of shape [B], got shape {list(shape)}; "
                "reduce the squared error over non-batch dims with per_sample_mse"
            )
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"per-sample errors must all have the same shape [B], got {listed}")


def _check_beta(beta: float | Tensor) -> None:
    """Raise ValueError for a non-positive or non-finite python beta (tensors are left alone: no sync)."""
    if isinstance(beta, (int, float)) and not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r} must be a finite number > 0")


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all non-batch dims, in float32 (float64 stays float64): shape [B].

    Computed in float32 even for bf16 inputs, because preference losses use differences of
    these errors between two images, which bf16 (8 bits of mantissa) would round away.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}")
    if pred.ndim == 0:
        raise ValueError("pred and target need a batch dimension, got 0-d tensors")
    squared = (_as_float(pred) - _as_float(target)).pow(2)
    if squared.ndim == 1:
        # Nothing to average over; torch.mean(dim=()) would instead reduce the batch too.
        return squared
    return squared.mean(dim=tuple(range(1, squared.ndim)))


def sft_loss(model_err_w: Tensor) -> Tensor:
    """Supervised fine-tuning on the preferred images only: the winner's error itself (baseline)."""
    _check_errors(model_err_w=model_err_w)
    return _as_float(model_err_w)


def _dpo_bracket(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor) -> Tensor:
    """(model_w - model_l) - (ref_w - ref_l): negative when the model moved towards the winner."""
    model_w, model_l, ref_w, ref_l = map(_as_float, (model_err_w, model_err_l, ref_err_w, ref_err_l))
    return (model_w - model_l) - (ref_w - ref_l)


def diffusion_dpo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float | Tensor,
) -> Tensor:
    """Diffusion-DPO per sample: -log sigmoid(-beta/2 * [(e_w - e_l) - (e_ref_w - e_ref_l)]).

    Implements Wallace et al. 2023 (Diffusion-DPO, arXiv:2311.12908), eq. 14 with T * omega(lambda_t) folded into beta.

    SD1.5 and SDXL use beta 5000 in this -beta/2 form (the diffusers example writes the same
    loss as ``beta_dpo=2500`` without the 1/2). All errors are per-sample
    mean squared errors of shape [B], computed at the same t and noise for winner and loser;
    the reference errors should come from the frozen model under ``torch.no_grad``.
    """
    _check_errors(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    _check_beta(beta)
    bracket = _dpo_bracket(model_err_w, model_err_l, ref_err_w, ref_err_l)
    # logsigmoid instead of log(sigmoid(.)): with beta in the thousands the argument easily
    # reaches -1e4, where sigmoid underflows to 0 and log gives -inf (and a NaN gradient).
    return -F.logsigmoid(-0.5 * beta * bracket)


def soft_label_dpo_loss(
    model_err_0: Tensor,
    model_err_1: Tensor,
    ref_err_0: Tensor,
    ref_err_1: Tensor,
    label: float | Tensor,
    beta: float | Tensor,
) -> Tensor:
    """Diffusion-DPO with soft labels: label * DPO(0 wins) + (1 - label) * DPO(1 wins), per sample.

    Implements Wallace et al. 2023 (Diffusion-DPO), eq. 14, in expectation over a Bernoulli(label) winner.

    ``label`` is the probability that image 0 is preferred (the ``label_0`` of Pick-a-Pic),
    a float or a tensor of shape [B]: 1.0 gives exactly ``diffusion_dpo_loss`` with image 0 as
    the winner, 0.0 the same with image 1 as the winner, and 0.5 (a tie) a loss that is
    symmetric in the two images.
    """
    _check_errors(model_err_0=model_err_0, model_err_1=model_err_1, ref_err_0=ref_err_0, ref_err_1=ref_err_1)
    if isinstance(label, Tensor):
        if label.ndim not in (0, 1) or (label.ndim == 1 and label.shape != model_err_0.shape):
            raise ValueError(
                f"label must be a float or a tensor of shape {list(model_err_0.shape)}, got shape {list(label.shape)}"
            )
        label = _as_float(label)
    elif not 0.0 <= float(label) <= 1.0:
        raise ValueError(f"label={label!r} must lie in [0, 1] (the probability that image 0 is preferred)")
    loss_0_wins = diffusion_dpo_loss(model_err_0, model_err_1, ref_err_0, ref_err_1, beta)
    loss_1_wins = diffusion_dpo_loss(model_err_1, model_err_0, ref_err_1, ref_err_0, beta)
    # Both terms are finite (logsigmoid), so label 1 or 0 makes the other term an exact 0.
    return label * loss_0_wins + (1.0 - label) * loss_1_wins


@torch.no_grad()
def dpo_metrics(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float | Tensor,
) -> dict[str, Tensor]:
    """Batch diagnostics of Diffusion-DPO as detached 0-d float tensors (call ``.item()`` to log).

    - ``implicit_acc``: fraction of pairs whose bracket (model_w - model_l) - (ref_w - ref_l)
      is < 0, i.e. where the model prefers the winner more than the reference does.
    - ``reward_margin``: mean of -beta/2 * bracket, the argument of the sigmoid in the loss.
    - ``model_margin``: mean of model_w - model_l (negative: the model fits the winner better).
    - ``ref_margin``: mean of ref_w - ref_l, the same for the frozen reference.

    Tensors rather than floats so a training step does not force a GPU sync per metric.
    """
    _check_errors(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    bracket = _dpo_bracket(model_err_w, model_err_l, ref_err_w, ref_err_l)
    return {
        "implicit_acc": (bracket < 0).to(bracket.dtype).mean(),
        "reward_margin": (-0.5 * beta * bracket).mean(),
        "model_margin": (_as_float(model_err_w) - _as_float(model_err_l)).mean(),
        "ref_margin": (_as_float(ref_err_w) - _as_float(ref_err_l)).mean(),
    }


def inpo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float | Tensor,
) -> Tensor:
    """DDIM-InPO per sample: the Diffusion-DPO logistic loss on errors against the inversion-implied noise.

    Implements Lu et al., CVPR 2025 (DDIM-InPO, arXiv:2503.18454): DPO with target eps* at the inverted x_t.

    The formula is that of ``diffusion_dpo_loss``; what makes it InPO is where the errors come
    from. Each image's x_t and target must come from ``diffpref.inversion.ddim_invert``: x_t is
    the DDIM inversion of x0 to exactly that sample's t, and the target of both model and
    reference errors is the implied noise ``eps_star = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``,
    not fresh Gaussian noise. Feeding forward-noised errors here silently gives plain DPO.
    SD1.5 setting: beta 2000 (in this -beta/2 form).
    """
    return diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)


def kto_reference_point(model_err: Tensor, ref_err: Tensor) -> Tensor:
    """Batch estimate of the KL reference point of Diffusion-KTO: clamp(mean(ref_err - model_err), min=0), detached.

    Implements Li et al. 2024 (Diffusion-KTO, "Aligning Diffusion Models by Optimizing Human Utility"): Q_ref.

    The implicit reward of one image is ref_err - model_err (how much better the model
    denoises it than the reference). Its batch mean over all images, liked and disliked, is a
    cheap estimate of the KL between model and reference; unlike the language KTO we do not
    build mismatched (prompt, image) pairs, which would cost two more UNet passes. The
    estimate is clamped at 0 because a KL is non-negative, and detached because it is a
    baseline that moves with the model, not a quantity to optimise.
    """
    _check_errors(model_err=model_err, ref_err=ref_err)
    return (_as_float(ref_err) - _as_float(model_err)).mean().clamp(min=0.0).detach()


def kto_loss(
    model_err: Tensor,
    ref_err: Tensor,
    liked: Tensor,
    beta: float | Tensor,
    kl_ref: float | Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Diffusion-KTO per sample: w_y * (1 - sigmoid(sign_y * beta * (ref_err - model_err - kl_ref))).

    Implements Li et al. 2024 (Diffusion-KTO, "Aligning Diffusion Models by Optimizing Human Utility"): KTO loss.

    Unpaired feedback: ``liked`` is a bool tensor [B] (nonzero counts as liked); liked images
    get sign +1 and ``desirable_weight``, disliked ones sign -1 and ``undesirable_weight``.
    ``kl_ref`` is the batch-level reference point (see ``kto_reference_point``); it is clamped
    at >= 0 and detached here too, so passing a raw estimate cannot push gradients through it.
    """
    _check_errors(model_err=model_err, ref_err=ref_err, liked=liked)
    _check_beta(beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable_weight={desirable_weight} and undesirable_weight={undesirable_weight} must be >= 0"
        )
    model_err, ref_err = _as_float(model_err), _as_float(ref_err)
    kl = torch.as_tensor(kl_ref, dtype=model_err.dtype, device=model_err.device).detach().clamp(min=0.0)
    liked = liked.to(device=model_err.device) != 0
    reward = ref_err - model_err - kl
    # Scalars as tensors of the errors' dtype: a float32 detour would round the weights.
    sign = torch.where(liked, model_err.new_tensor(1.0), model_err.new_tensor(-1.0))
    weight = torch.where(liked, model_err.new_tensor(desirable_weight), model_err.new_tensor(undesirable_weight))
    return weight * (1.0 - torch.sigmoid(sign * beta * reward))


def _mapo_log_odds(err: Tensor) -> Tensor:
    """f(e) = log(p / (1 - p)) with p = exp(-e): the log-odds of the error's pseudo-likelihood.

    Written as -e - log(-expm1(-e)) so that small errors (p close to 1) keep full precision.
    """
    err = err.clamp(min=MAPO_MIN_ERR)
    return -err - torch.log(-torch.expm1(-err))


def mapo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    beta: float | Tensor,
    temperature: float = MAPO_TEMPERATURE,
) -> Tensor:
    """MaPO per sample: e_w - beta * log sigmoid(T * (f(e_w) - f(e_l))), f(e) = log(exp(-e) / (1 - exp(-e))).

    Implements Hong et al. 2024 (MaPO, arXiv:2406.06424): winner MSE + beta * the log-odds margin loss, reference-free.

    Reference-free, so it needs no reference UNet pass. Each error e >= 0 is mapped to a
    pseudo-likelihood p = exp(-e) in (0, 1] (saturating: 1 for a perfect denoise, -> 0 for
    a bad one) and f is its log-odds, log p - log(1 - p). f is strictly decreasing in e, so
    f(e_w) - f(e_l) > 0 exactly when the winner is denoised better than the loser: the margin
    favours a lower winner error, and lowering e_w lowers both the SFT term e_w and the
    margin term. Errors are clamped at ``MAPO_MIN_ERR`` before f, because f(0) = +inf.

    ``temperature`` (T) scales the log-odds margin before the sigmoid; its default 1000
    matches the num_train_timesteps scale (1000 for SD1.5/SDXL) that the MaPO reference code
    uses. Per-pair error gaps are ~1e-3, so without it the sigmoid would sit at 1/2.
    """
    _check_errors(model_err_w=model_err_w, model_err_l=model_err_l)
    _check_beta(beta)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    err_w, err_l = _as_float(model_err_w), _as_float(model_err_l)
    margin = _mapo_log_odds(err_w) - _mapo_log_odds(err_l)
    return err_w - beta * F.logsigmoid(temperature * margin)
