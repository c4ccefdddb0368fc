"""The training objectives, as a registry: a batch in, a per-sample loss and metrics out.

The trainer owns the loop (data, optimizer, checkpoints); an objective owns the diffusion
arithmetic (noising, targets, which passes run with or without the reference). ``policy`` and
``reference`` are callables ``(x_t, t, cond) -> model output`` so the same code serves LoRA (one
UNet, adapters switched off for the reference) and full fine-tuning (a frozen copy).

Adding an objective is one function and one ``register_objective`` call: here (``diffpref train`` and
``train/train.py`` then know it), or in your own script before it builds the ``TrainConfig`` and calls
``train`` (``tests/test_trainer.py`` registers a toy one that way)::

    def my_objective(x: ObjectiveInputs) -> ObjectiveOutput:
        winner = preferred(x.batch)                        # pairs: latents_0, latents_1, label; cond
        x_t = x.schedule.add_noise(winner, x.noise, x.t)
        err = losses.per_sample_mse(x.policy(x_t, x.t, x.batch["cond"]), x.schedule.target(winner, x.noise, x.t))
        return ObjectiveOutput(err, {"model_err": float(err.detach().mean())})

    register_objective("mine", my_objective, default_beta=1.0, data="pairs", uses_reference=False)

``method: mine`` then trains it: ``TrainConfig`` validates ``method`` against this registry and takes
``beta``'s default from it, the cache holds pairs (``data="pairs"``: latents_0, latents_1, label)
or single rated images (``data="ratings"``: latents, liked), and ``x.reference`` is None unless
``uses_reference`` (the trainer then keeps no frozen copy for full fine-tuning). An objective that
needs a setting of its own reads it from ``x.cfg`` (a ``TrainConfig`` field, e.g. ``cfg.kto_desirable_weight``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffpref import losses
from diffpref.inversion import ddim_invert, fixed_grid, grid_prefix, implied_noise
from diffpref.training.conditioning import image_cond, pair_cond, preferred_cond

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
DATA_KINDS = ("pairs", "ratings")


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


@dataclass
class ObjectiveInputs:
    """Everything one objective call sees: one micro-batch, the two models, its noise and timesteps."""

    batch: dict                             # pairs: latents_0, latents_1, label; ratings: latents, liked; both: cond
    policy: Denoiser
    reference: Denoiser | None              # None when the objective does not use one
    schedule: NoiseSchedule
    noise: torch.Tensor                     # [B, C, h, w], shared by both images of a pair
    t: torch.Tensor                         # [B]
    cfg: Any                                # the TrainConfig: beta and the objective's own settings
    generator: torch.Generator | None = None  # randomness of the objective itself (InPO's inversion with eta > 0)

    @property
    def beta(self) -> float:
        return self.cfg.beta


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[[ObjectiveInputs], ObjectiveOutput]
    default_beta: float
    data: str = "pairs"                     # what the cache holds: "pairs" or "ratings" (single liked/disliked images)
    uses_reference: bool = True             # whether fn reads x.reference (a frozen copy or the adapters-off pass)
    inverts: bool = False                   # InPO-like: t on the inversion grid, x_t read from the inversion cache


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, fn: Callable[[ObjectiveInputs], ObjectiveOutput], *, default_beta: float,
                       data: str = "pairs", uses_reference: bool = True, inverts: bool = False) -> Objective:
    """Make ``method: <name>`` train ``fn``; returns the entry. Re-registering a name replaces it."""
    if data not in DATA_KINDS:
        raise ValueError(f"data={data!r}: an objective trains on one of {', '.join(DATA_KINDS)}")
    OBJECTIVES[name] = Objective(name, fn, float(default_beta), data, uses_reference, inverts)
    return OBJECTIVES[name]


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"method={name!r} is not a registered objective; choose one of "
                         f"{', '.join(OBJECTIVES)}") from None


def preferred(batch: dict) -> torch.Tensor:
    """The preferred image of each pair (label >= 0.5 means image 0 won)."""
    first = (batch["label"] >= 0.5).view(-1, *([1] * (batch["latents_0"].dim() - 1)))
    return torch.where(first, batch["latents_0"], batch["latents_1"])


# ----------------------------------------------------------------------------- pairs
def _pair_errors(denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond2: dict, target: torch.Tensor):
    err = losses.per_sample_mse(denoise(x_t, t, cond2), target)
    return err.chunk(2)


def _winner_first(e0, e1, label):
    """Reorder per-sample errors so the preferred image comes first (label >= 0.5 means image 0 won)."""
    first = label >= 0.5
    return torch.where(first, e0, e1), torch.where(first, e1, e0)


@dataclass
class _Pairs:
    """Both images of every pair as one batch [2B]: winner and loser share t and the noise."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t2: torch.Tensor
    cond2: dict
    target: torch.Tensor
    extra_forward_passes: int = 0


def _forward_noised(x: ObjectiveInputs) -> _Pairs:
    x0 = torch.cat([x.batch["latents_0"], x.batch["latents_1"]])
    t2, eps = torch.cat([x.t, x.t]), torch.cat([x.noise, x.noise])
    return _Pairs(x0, x.schedule.add_noise(x0, eps, t2), t2, pair_cond(x.batch), x.schedule.target(x0, eps, t2))


def inversion_points(cfg, num_train_timesteps: int) -> torch.Tensor:
    """InPO's inversion grid [K] over [0, timestep_max) (``inversion.fixed_grid``): the path every inversion
    walks; the training timesteps are its points at or above timestep_min (``trainable_points``)."""
    high = num_train_timesteps if cfg.timestep_max is None else cfg.timestep_max
    points = fixed_grid(cfg.inversion_steps, high)
    if not bool((points >= cfg.timestep_min).any()):
        raise ValueError(f"no point of the {cfg.inversion_steps}-step inversion grid {points.tolist()} lies at or above "
                         f"timestep_min={cfg.timestep_min}; raise inversion_steps or lower timestep_min")
    return points


def _inverted(x: ObjectiveInputs) -> _Pairs:
    """DDIM-InPO's latents: x_t is the DDIM inversion of x0 along the fixed grid up to t, so it really maps
    back to x0; its implied noise eps* is the regression target. Inverting with the frozen reference keeps
    (x_t, eps*) fixed per image, so the trainer reads x_t from the inversion cache (batch ``inverted_0``,
    ``inverted_1``, built by ``training.cache.inversion``); inverting with the policy makes the target
    follow the policy, which lets the loss fall by moving the reference's error instead, and runs every step.
    Both invert with the image's own prompt, also when prompt dropout trains the sample without it: the
    cached trajectory is one per image, and eps* only needs an x_t that maps back to x0."""
    x0 = torch.cat([x.batch["latents_0"], x.batch["latents_1"]])
    t2, cond2 = torch.cat([x.t, x.t]), pair_cond(x.batch)
    if "inverted_0" in x.batch:
        x_t = torch.cat([x.batch["inverted_0"], x.batch["inverted_1"]])
        passes = 0
    else:
        points = inversion_points(x.cfg, len(x.schedule.alphas_cumprod)).to(t2.device)
        index = torch.searchsorted(points, t2)
        if bool((index >= len(points)).any()) or bool((points[index.clamp(max=len(points) - 1)] != t2).any()):
            raise ValueError(f"InPO trains at the points of its inversion grid {points.tolist()}, got t={x.t.tolist()}; "
                             "draw the timesteps with step.draw_micro_batch (or inversion_points)")
        inverter = x.reference if x.cfg.inversion_model == "reference" else x.policy
        own_prompt = pair_cond({**x.batch, "cond": x.batch.get("cond_undropped", x.batch["cond"])})
        with torch.no_grad():
            inv = ddim_invert(lambda z, s: x.schedule.eps_from_output(inverter(z, s, own_prompt), z, s), x0, t2,
                              x.schedule.alphas_cumprod, eta=x.cfg.inversion_eta, generator=x.generator,
                              grid=grid_prefix(points, index))
        x_t, passes = inv.x_t, inv.forward_passes
    eps_star = implied_noise(x_t, x0, t2, x.schedule.alphas_cumprod).to(x0.dtype)
    return _Pairs(x0, x_t, t2, cond2, x.schedule.target(x0, eps_star, t2), passes)


def _logistic_preference(x: ObjectiveInputs, pairs: _Pairs, loss_fn) -> ObjectiveOutput:
    """DPO's logistic loss on the policy's and the reference's errors of both images."""
    label = x.batch["label"]
    m0, m1 = _pair_errors(x.policy, pairs.x_t, pairs.t2, pairs.cond2, pairs.target)
    with torch.no_grad():
        r0, r1 = _reference_errors(x, pairs)
    # Soft labels weight the two orientations of the pair (label 1 or 0 gives the plain loss).
    loss = label * loss_fn(m0, m1, r0, r1, x.beta) + (1 - label) * loss_fn(m1, m0, r1, r0, x.beta)
    mw, ml = _winner_first(m0, m1, label)
    rw, rl = _winner_first(r0, r1, label)
    metrics = {k: float(v) for k, v in losses.dpo_metrics(mw, ml, rw, rl, x.beta).items()}
    return ObjectiveOutput(loss, metrics, pairs.extra_forward_passes)


def _reference_errors(x: ObjectiveInputs, pairs: _Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's errors of both images: read from the inversion cache where it holds them (InPO, prompt
    kept: the cache recorded the reference's output at exactly this x_t, prompt and t), else one reference pass
    (over the prompt-dropped samples only, when the rest are cached)."""
    if "ref_err_0" not in x.batch:
        return _pair_errors(x.reference, pairs.x_t, pairs.t2, pairs.cond2, pairs.target)
    r0, r1 = x.batch["ref_err_0"].float().clone(), x.batch["ref_err_1"].float().clone()
    dropped = x.batch.get("prompt_dropped")
    if dropped is not None and bool(dropped.any()):
        i = dropped.nonzero().flatten()
        rows = torch.cat([i, i + len(r0)])
        cond = {k: v[rows] for k, v in pairs.cond2.items()}
        d0, d1 = _pair_errors(x.reference, pairs.x_t[rows], pairs.t2[rows], cond, pairs.target[rows])
        r0[i], r1[i] = d0, d1
    return r0, r1


def dpo(x: ObjectiveInputs) -> ObjectiveOutput:
    """Diffusion-DPO (Wallace et al. 2023) on forward-noised pairs."""
    return _logistic_preference(x, _forward_noised(x), losses.diffusion_dpo_loss)


def inpo(x: ObjectiveInputs) -> ObjectiveOutput:
    """DDIM-InPO (Lu et al. 2025): the DPO loss at DDIM-inverted latents against their implied noise."""
    return _logistic_preference(x, _inverted(x), losses.inpo_loss)


def mapo(x: ObjectiveInputs) -> ObjectiveOutput:
    """MaPO (Hong et al. 2024): reference-free, the winner's error plus a log-odds margin."""
    pairs = _forward_noised(x)
    m0, m1 = _pair_errors(x.policy, pairs.x_t, pairs.t2, pairs.cond2, pairs.target)
    mw, ml = _winner_first(m0, m1, x.batch["label"])
    margin = (mw - ml).detach()
    return ObjectiveOutput(losses.mapo_loss(mw, ml, x.beta),
                           {"model_margin": float(margin.mean()), "implicit_acc": float((margin < 0).float().mean())})


def sft(x: ObjectiveInputs) -> ObjectiveOutput:
    """Supervised fine-tuning on the preferred image of each pair (the baseline); the loser is never run."""
    winner = preferred(x.batch)
    x_t = x.schedule.add_noise(winner, x.noise, x.t)
    err = losses.per_sample_mse(x.policy(x_t, x.t, preferred_cond(x.batch)),
                                x.schedule.target(winner, x.noise, x.t))
    return ObjectiveOutput(losses.sft_loss(err), {"model_err": float(err.detach().mean())})


# ----------------------------------------------------------------------------- ratings
def kto(x: ObjectiveInputs) -> ObjectiveOutput:
    """Diffusion-KTO (Li et al. 2024) on single images liked (1) or disliked (0)."""
    x0, cond = x.batch["latents"], image_cond(x.batch)
    x_t, target = x.schedule.add_noise(x0, x.noise, x.t), x.schedule.target(x0, x.noise, x.t)
    model_err = losses.per_sample_mse(x.policy(x_t, x.t, cond), target)
    with torch.no_grad():
        ref_err = losses.per_sample_mse(x.reference(x_t, x.t, cond), target)
    kl_ref = losses.kto_reference_point(model_err, ref_err)
    liked = x.batch["liked"] > 0.5
    loss = losses.kto_loss(model_err, ref_err, liked, x.beta, kl_ref, x.cfg.kto_desirable_weight,
                           x.cfg.kto_undesirable_weight)
    reward = (ref_err - model_err).detach()
    metrics = {"kl_ref": float(kl_ref),
               "reward_liked": float(reward[liked].mean()) if liked.any() else 0.0,
               "reward_disliked": float(reward[~liked].mean()) if (~liked).any() else 0.0}
    return ObjectiveOutput(loss, metrics)


# Betas in the -beta/2 form of diffusion_dpo_loss: the papers' settings for SD1.5.
register_objective("dpo", dpo, default_beta=5000.0)
register_objective("inpo", inpo, default_beta=2000.0, inverts=True)
register_objective("kto", kto, default_beta=1000.0, data="ratings")
register_objective("mapo", mapo, default_beta=0.1, uses_reference=False)
register_objective("sft", sft, default_beta=0.0, uses_reference=False)
