"""A few-shot user reward model: prototype tastes learned from many people, a person's mix read from K choices.

PAL (Chen et al. 2024, "PAL: Pluralistic Alignment Framework", the PAL-B reward) models person i's
reward of an image x as a point on a simplex of shared prototype tastes:

    r_i(x) = < f(phi(x)), P^T w_i >,   w_i in the simplex Delta^{M-1},   P: M prototypes [M, m]

``phi`` is a frozen image embedding (the world CLIP on the world, any open_clip model on real
images, through ``diffpref.personalize.backbones.OpenClipBackbone``), ``f`` a small shared MLP and
``P`` the prototypes. ``f``, ``P`` and one ``w`` per training person are learned together from the
training people's pairs with the Bradley-Terry loss ``-log sigmoid(r_i(x_w) - r_i(x_l))``
(``train_reward_model``). For a new person, ``f`` and ``P`` stay fixed and only ``w`` is read from
their K choices (``PrototypeRewardModel.person``):

- ``"posterior"`` (default): the posterior mean of ``w`` under a sparse Dirichlet(alpha) prior and
  the Bradley-Terry likelihood of the K choices, by self-normalised importance sampling from the
  prior (``mixture_posterior_mean``). The reward is linear in ``w``, so this is the posterior-mean
  reward. The prior says what the training people showed: a person holds few of the tastes.
- ``"map"``: PAL's own few-shot step, the most likely ``w`` (softmax logits, an L2 penalty).

Candidates of one prompt share it, so the world model scores images only (a text term would
cancel in every comparison it is used for); ``score`` still takes the prompts, for models that do.

    reward = person_reward(examples)                # examples: UserExample(prompt, preferred, rejected)
    scores = reward.score(images, prompts)          # higher = this person likes it more
    out = pipe(prompt, seed=s, best_of=8, reward=reward)   # PersonalizedPipeline: the best of 8 is shown
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffpref.personalize.backbones import OpenClipBackbone, UserExample

CONFIG_NAME = "reward_config.json"
WEIGHTS_NAME = "reward.safetensors"
EMBEDDED_REWARD = "embedded-reward"
ESTIMATORS = ("posterior", "map")


def embedded_reward_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "world-reward"


def resolve_reward_path(path: str | os.PathLike) -> Path:
    if str(path) == EMBEDDED_REWARD:
        return embedded_reward_path()
    folder = Path(path)
    if not (folder / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{folder} is not a reward model folder (no {CONFIG_NAME}); pass "
                                f"'{EMBEDDED_REWARD}' or a folder written by PrototypeRewardModel.save_pretrained")
    return folder


def _sigmoid_log(z: np.ndarray) -> np.ndarray:
    """log sigmoid(z), overflow-free."""
    return -np.logaddexp(0.0, -z)


def mixture_posterior_mean(diffs: np.ndarray, alpha: float, scale: float = 1.0, samples: int = 20000,
                           seed: int = 0) -> np.ndarray:
    """E[w | choices] for w ~ Dirichlet(alpha 1_M), p(choice k) = sigmoid(scale * diffs[k] . w).

    ``diffs`` [K, M]: each prototype's reward of the chosen image minus the rejected one. Importance
    sampling with the prior as proposal: weights = likelihood, normalised in log space. K = 0 gives
    the prior mean (uniform w).
    """
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 2:
        raise ValueError(f"diffs must be [K, M], got shape {diffs.shape}")
    if alpha <= 0 or scale <= 0:
        raise ValueError(f"alpha and scale must be > 0, got {alpha}, {scale}")
    num = diffs.shape[1]
    if diffs.shape[0] == 0:
        return np.full(num, 1.0 / num)
    w = np.random.default_rng(seed).dirichlet(np.full(num, alpha), size=samples)  # [S, M]
    log_lik = _sigmoid_log(scale * w @ diffs.T).sum(axis=1)                       # [S]
    weights = np.exp(log_lik - log_lik.max())
    return weights @ w / weights.sum()


def mixture_map(diffs: np.ndarray, scale: float = 1.0, l2: float = 0.1, steps: int = 200) -> np.ndarray:
    """PAL's few-shot fit: w = softmax(z) maximising sum_k log sigmoid(scale * diffs[k] . w) - l2/2 |z|^2."""
    d = torch.as_tensor(np.asarray(diffs, dtype=np.float64))
    z = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -F.logsigmoid(scale * d @ torch.softmax(z, 0)).sum() + 0.5 * l2 * (z * z).sum()
        loss.backward()
        return loss

    if d.shape[0]:
        opt.step(closure)
    return torch.softmax(z.detach(), 0).numpy()


class PrototypeRewardModel(nn.Module):
    """``f`` (embedding -> m) and M prototypes; ``prototype_rewards`` gives every prototype's reward."""

    def __init__(self, embed_dim: int, feature_dim: int = 32, hidden: int = 128, num_prototypes: int = 20,
                 prior_alpha: float = 0.3, likelihood_scale: float = 1.0, backbone: str | list | None = None):
        super().__init__()
        self.config = {"embed_dim": embed_dim, "feature_dim": feature_dim, "hidden": hidden,
                       "num_prototypes": num_prototypes, "prior_alpha": prior_alpha,
                       "likelihood_scale": likelihood_scale, "backbone": backbone}
        self.feature = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, feature_dim))
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, feature_dim) * feature_dim ** -0.5)
        self._backbone = None

    def prototype_rewards(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[..., E] normalised image embeddings -> [..., M] rewards, one per prototype taste."""
        return self.feature(embeddings) @ self.prototypes.T

    @torch.no_grad()
    def prototype_rewards_np(self, embeddings: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        return self.prototype_rewards(x).double().numpy()

    # ------------------------------------------------------------------ a person
    def mixture(self, winner_embeddings: np.ndarray, loser_embeddings: np.ndarray, estimator: str = "posterior",
                seed: int = 0) -> np.ndarray:
        """A person's w [M] from the embeddings of K chosen and K rejected images ([K, E] each)."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r}; valid estimators are {', '.join(ESTIMATORS)}")
        winner, loser = np.asarray(winner_embeddings), np.asarray(loser_embeddings)
        if winner.shape != loser.shape:
            raise ValueError(f"winner and loser embeddings differ in shape: {winner.shape} vs {loser.shape}")
        if winner.shape[0] == 0:
            return np.full(self.config["num_prototypes"], 1.0 / self.config["num_prototypes"])
        diffs = self.prototype_rewards_np(winner) - self.prototype_rewards_np(loser)
        scale = self.config["likelihood_scale"]
        if estimator == "map":
            return mixture_map(diffs, scale=scale)
        return mixture_posterior_mean(diffs, self.config["prior_alpha"], scale=scale, seed=seed)

    @property
    def backbone(self) -> OpenClipBackbone:
        if self._backbone is None:
            spec = self.config["backbone"]
            self._backbone = OpenClipBackbone.from_pretrained(tuple(spec) if isinstance(spec, list) else spec)
        return self._backbone

    def person(self, examples: Sequence[UserExample], estimator: str = "posterior") -> PersonReward:
        """The reward of the person who made these choices (none: the population's average taste)."""
        examples = list(examples)
        if examples:
            emb = self.backbone.embed_images([e.preferred for e in examples] + [e.rejected for e in examples]).numpy()
            w = self.mixture(emb[:len(examples)], emb[len(examples):], estimator)
        else:
            w = self.mixture(np.zeros((0, 1)), np.zeros((0, 1)), estimator)
        return PersonReward(self, w, num_choices=len(examples))

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | os.PathLike, extra: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in self.state_dict().items()},
                  str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps({**self.config, **(extra or {})}, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = EMBEDDED_REWARD) -> PrototypeRewardModel:
        folder = resolve_reward_path(path)
        config = json.loads((folder / CONFIG_NAME).read_text())
        keys = ("embed_dim", "feature_dim", "hidden", "num_prototypes", "prior_alpha", "likelihood_scale", "backbone")
        missing = [k for k in keys if k not in config]
        if missing:
            raise ValueError(f"{folder / CONFIG_NAME}: missing keys {missing}")
        model = cls(**{k: config[k] for k in keys})
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return model.eval().requires_grad_(False)


_LOADED: dict[str, PrototypeRewardModel] = {}


def person_reward(examples: Sequence[UserExample], model: str | os.PathLike | PrototypeRewardModel = EMBEDDED_REWARD,
                  estimator: str = "posterior") -> PersonReward:
    """The reward of the person who made ``examples`` (their stored choices), for ``pipe(..., best_of=N, reward=)``.

    A model given by name is loaded once per process. Ties and skips are not choices: leave them out.
    """
    if not isinstance(model, PrototypeRewardModel):
        key = str(resolve_reward_path(model).resolve())
        if key not in _LOADED:
            _LOADED[key] = PrototypeRewardModel.from_pretrained(key)
        model = _LOADED[key]
    return model.person(examples, estimator=estimator)


@dataclass
class PersonReward:
    """One person's reward: ``score(images)`` = sum_j w_j * (prototype j's reward)."""

    model: PrototypeRewardModel
    weights: np.ndarray  # w on the simplex, [M]
    num_choices: int = 0

    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.prototype_rewards_np(embeddings) @ self.weights

    def score(self, images: Sequence | np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        """Rewards [N] of uint8 images (N, H, W, 3) or PIL images; ``prompts`` are accepted and unused (see module)."""
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        return self.score_embeddings(self.model.backbone.embed_images(images).numpy())


@dataclass
class LinearEmbeddingReward:
    """A reward linear in the backbone's image embedding, ``w . phi(x)``: the app's Bayesian taste model
    (``diffpref.app.pairs.fit_posterior(...).mean``) as a reward the pipeline can rank candidates by."""

    backbone: OpenClipBackbone
    weights: np.ndarray  # [E]

    def score(self, images: Sequence | np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        return self.backbone.embed_images(images).numpy().astype(np.float64) @ np.asarray(self.weights, np.float64)


def train_reward_model(embeddings: np.ndarray, labels: np.ndarray, num_prototypes: int = 20, feature_dim: int = 32,
                       hidden: int = 128, steps: int = 1500, lr: float = 3e-3, weight_decay: float = 1e-4,
                       mixture_l2: float = 1e-3, mixture_lr: float = 0.05, seed: int = 0, backbone: str | list | None = None,
                       progress: bool = True) -> tuple[PrototypeRewardModel, np.ndarray]:
    """Fit ``f``, the prototypes and each training person's w on a shared pool of pairs (full batch, Adam).

    ``embeddings`` [n, 2, E]: image embeddings of the pool's pairs; ``labels`` [U, n]: person u's
    choice per pair (1 image 0, 0 image 1, 0.5 indifferent: left out). Returns the model and the
    training people's mixtures [U, M].
    """
    torch.manual_seed(seed)
    emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    if emb.ndim != 3 or emb.shape[1] != 2 or y.ndim != 2 or y.shape[1] != emb.shape[0]:
        raise ValueError(f"expected embeddings [n, 2, E] and labels [U, n], got {tuple(emb.shape)}, {tuple(y.shape)}")
    decided = (y != 0.5).float()
    if decided.sum() == 0:
        raise ValueError("no decided pair to train on: every label is 0.5")
    model = PrototypeRewardModel(emb.shape[-1], feature_dim, hidden, num_prototypes, backbone=backbone)
    logits = nn.Parameter(torch.zeros(y.shape[0], num_prototypes))
    # the mixtures get a larger step and no decay: decay would pull every person towards the uniform mix
    opt = torch.optim.AdamW([{"params": list(model.parameters())},
                             {"params": [logits], "lr": mixture_lr, "weight_decay": 0.0}], lr=lr, weight_decay=weight_decay)
    for _ in tqdm(range(steps), desc="train reward", disable=not progress, dynamic_ncols=True):
        proto = model.prototype_rewards(emb)                        # [n, 2, M]
        margin = torch.softmax(logits, -1) @ (proto[:, 0] - proto[:, 1]).T  # [U, n]: r_u(image 0) - r_u(image 1)
        loss = (F.binary_cross_entropy_with_logits(margin, y, reduction="none") * decided).sum() / decided.sum()
        loss = loss + mixture_l2 * logits.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model, torch.softmax(logits.detach(), -1).numpy()
