"""Each training objective as one function: a batch in, a per-sample loss and metrics out.

The trainer owns the loop (data, optimizer, checkpoints); these functions own the diffusion
arithmetic (noising, targets, which passes run with or without the reference). ``policy`` and
``reference`` are callables ``(x_t, t, cond) -> model output`` so the same code serves LoRA (one
UNet, adapters switched off for the reference) and full fine-tuning (a frozen copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffpref import losses
from diffpref.inversion import ddim_invert

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                      # per sample, shape [B]
    metrics: dict[str, float] = field(default_factory=dict)
    extra_forward_passes: int = 0           # UNet passes beyond the policy pass and the reference pass


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={self.prediction_type!r}: diffpref trains epsilon or v_prediction models")

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(like.device)[t].float()
        return a.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: eps, or v = sqrt(a) eps - sqrt(1 - a) x0."""
        if self.prediction_type == "epsilon":
            return noise
        a = self.alpha(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def eps_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return output
        a = self.alpha(t, x_t)
        return a.sqrt() * output + (1 - a).sqrt() * x_t


def _double(cond: dict) -> dict:
    return {k: torch.cat([v, v]) for k, v in cond.items()}


def _pair_errors(denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond2: dict, target: torch.Tensor):
    err = losses.per_sample_mse(denoise(x_t, t, cond2), target)
    return err.chunk(2)


def _winner_first(e0, e1, label):
    """Reorder per-sample errors so the preferred image comes first (label >= 0.5 means image 0 won)."""
    first = label >= 0.5
    return torch.where(first, e0, e1), torch.where(first, e1, e0)


def _dpo_metrics(mw, ml, rw, rl, beta) -> dict[str, float]:
    return {k: float(v) for k, v in losses.dpo_metrics(mw, ml, rw, rl, beta).items()}


def paired_preference(batch: dict, policy: Denoiser, reference: Denoiser | None, schedule: NoiseSchedule,
                      noise: torch.Tensor, t: torch.Tensor, beta: float, method: str,
                      inversion_steps: int = 10, inversion_eta: float = 0.0,
                      generator: torch.Generator | None = None, inversion_model: str = "reference") -> ObjectiveOutput:
    """DPO, InPO, MaPO and SFT on a batch of pairs; winner and loser share t and the noise."""
    x0 = torch.cat([batch["latents_0"], batch["latents_1"]])
    t2, cond2, label = torch.cat([t, t]), _double(batch["cond"]), batch["label"]
    extra = 0
    if method == "inpo":
        # DDIM-InPO: the latent at t is reached by DDIM inversion of x0, so it is a latent that really
        # maps back to x0; its implied noise eps* is the regression target. Inverting with the frozen
        # reference keeps (x_t, eps*) fixed per image; inverting with the policy makes the target
        # follow the policy, which lets the loss fall by moving the reference's error instead.
        inverter = reference if inversion_model == "reference" else policy
        with torch.no_grad():
            inv = ddim_invert(lambda x, s: schedule.eps_from_output(inverter(x, s, cond2), x, s), x0, t2,
                              schedule.alphas_cumprod, num_steps=inversion_steps, eta=inversion_eta, generator=generator)
        x_t, eps = inv.x_t, inv.eps_star
        extra = inv.forward_passes
    else:
        eps = torch.cat([noise, noise])
        x_t = schedule.add_noise(x0, eps, t2)
    target = schedule.target(x0, eps, t2)

    if method == "sft":
        # Only the preferred image is a training example; the other half of the pass is wasted, so skip it.
        winner = torch.where((label >= 0.5).view(-1, *([1] * (x0.dim() - 1))), batch["latents_0"], batch["latents_1"])
        x_w = schedule.add_noise(winner, noise, t)
        err = losses.per_sample_mse(policy(x_w, t, batch["cond"]), schedule.target(winner, noise, t))
        return ObjectiveOutput(losses.sft_loss(err), {"model_err": float(err.detach().mean())})

    m0, m1 = _pair_errors(policy, x_t, t2, cond2, target)
    if method == "mapo":
        mw, ml = _winner_first(m0, m1, label)
        loss = losses.mapo_loss(mw, ml, beta)
        margin = (mw - ml).detach()
        return ObjectiveOutput(loss, {"model_margin": float(margin.mean()), "implicit_acc": float((margin < 0).float().mean())}, extra)

    with torch.no_grad():
        r0, r1 = _pair_errors(reference, x_t, t2, cond2, target)
    loss_fn = losses.inpo_loss if method == "inpo" else losses.diffusion_dpo_loss
    # Soft labels weight the two orientations of the pair (label 1 or 0 gives the plain loss).
    loss = label * loss_fn(m0, m1, r0, r1, beta) + (1 - label) * loss_fn(m1, m0, r1, r0, beta)
    mw, ml = _winner_first(m0, m1, label)
    rw, rl = _winner_first(r0, r1, label)
    return ObjectiveOutput(loss, _dpo_metrics(mw, ml, rw, rl, beta), extra)


def kto(batch: dict, policy: Denoiser, reference: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor,
        t: torch.Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> ObjectiveOutput:
    """Diffusion-KTO on single images liked (1) or disliked (0)."""
    x0 = batch["latents"]
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    model_err = losses.per_sample_mse(policy(x_t, t, batch["cond"]), target)
    with torch.no_grad():
        ref_err = losses.per_sample_mse(reference(x_t, t, batch["cond"]), target)
    kl_ref = losses.kto_reference_point(model_err, ref_err)
    liked = batch["liked"] > 0.5
    loss = losses.kto_loss(model_err, ref_err, liked, beta, kl_ref, desirable_weight, undesirable_weight)
    reward = (ref_err - model_err).detach()
    metrics = {"kl_ref": float(kl_ref),
               "reward_liked": float(reward[liked].mean()) if liked.any() else 0.0,
               "reward_disliked": float(reward[~liked].mean()) if (~liked).any() else 0.0}
    return ObjectiveOutput(loss, metrics)
