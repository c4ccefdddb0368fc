"""Few-shot context for PPD training: every pair's frozen-backbone embeddings, grouped by user.

The user encoder's backbone is frozen, so the embeddings of every pair (prompt, image 0, image 1)
are computed once, next to the latent cache, and training only runs the small trainable head. For
each training pair, the user's context is k of that user's *other* pairs (never the pair being
trained on), with k drawn anew per sample so the head learns to read any number of shots. Pairs
that hold a personalized image (on-policy pairs, ``diffpref world policy-pairs``) are trained on
but never used as context: a user's context is what evaluation and the app read, base-image pairs.

A user with fewer than 2 base-image pairs has no context for any of their pairs (the pair being
trained on is never its own context). Raw Pick-a-Pic has many such users. They are dropped from
personalization, counted and said once (``ContextBank.skip_message``): their pairs still train, as
samples without a user (like user dropout), and ``has_context`` tells the conditioner which rows those are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffpref.data import iter_preferences
from diffpref.personalize.backbones import example_features_from_embeddings

# Model names of personalized images start with this (``diffpref world policy-pairs`` writes them).
POLICY_MODEL_PREFIX = "ppd-policy"

logger = logging.getLogger(__name__)


def is_policy_model(name: object) -> bool:
    """Whether a pair's ``model_0``/``model_1`` names a personalized image (such a pair is never context)."""
    return isinstance(name, str) and name.startswith(POLICY_MODEL_PREFIX)


@dataclass
class ContextBank:
    text: torch.Tensor        # [N, E] prompt embeddings
    image_0: torch.Tensor     # [N, E]
    image_1: torch.Tensor     # [N, E]
    label: torch.Tensor       # [N] probability that image 0 was preferred
    user_index: torch.Tensor  # [N]
    context_ok: torch.Tensor | None = None  # [N] bool: may be a user's context (default: every pair)

    def __post_init__(self):
        if self.context_ok is None:
            self.context_ok = torch.ones(len(self.label), dtype=torch.bool)
        self.context_ok = self.context_ok.bool()
        self.context_of_user: dict[int, torch.Tensor] = {}
        for user in self.user_index.unique().tolist():
            self.context_of_user[user] = ((self.user_index == user) & self.context_ok).nonzero().flatten()
        # A row has context when its user has a context pair other than the row itself.
        count = torch.zeros(int(self.user_index.max()) + 1 if len(self.user_index) else 0, dtype=torch.long)
        count.index_add_(0, self.user_index, self.context_ok.long())
        others = count[self.user_index] - self.context_ok.long()
        self._has_context = others > 0
        lone = ~self._has_context
        self.dropped_users = int(self.user_index[lone].unique().numel())
        self.dropped_pairs = int(lone.sum())

    @property
    def skip_message(self) -> str | None:
        """One line counting the users PPD cannot personalize (None when there are none)."""
        if not self.dropped_users:
            return None
        total = int(self.user_index.unique().numel())
        return (f"PPD: dropped {self.dropped_users} of {total} users with fewer than 2 base-image pairs "
                f"({self.dropped_pairs} of {len(self.label)} pairs): they have no few-shot context, so their "
                "pairs train without a user (as user dropout) and never serve as context")

    def has_context(self, rows: torch.Tensor) -> torch.Tensor:
        """[B] bool: whether each row's user has another base-image pair to serve as its context."""
        return self._has_context[rows.cpu()]

    @property
    def context_rows(self) -> torch.Tensor:
        return self.context_ok.nonzero().flatten()

    @property
    def feature_dim(self) -> int:
        return 4 * self.text.shape[1]

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-example features [k, F] of pairs ``rows``, preferred image first."""
        first = (self.label[rows] >= 0.5).unsqueeze(1)
        preferred = torch.where(first, self.image_0[rows], self.image_1[rows])
        rejected = torch.where(first, self.image_1[rows], self.image_0[rows])
        return example_features_from_embeddings(self.text[rows], preferred, rejected)

    def sample_context(self, rows: torch.Tensor, generators: list[torch.Generator], k_min: int,
                       k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, k_max, F], mask [B, k_max]) of k other pairs of each row's user.

        A row without context (``has_context`` False: its user was dropped) gets one zero placeholder
        example, so the encoder runs on the whole batch; the conditioner then removes that sample's user
        tokens. The context never contains the pair being trained on, nor an on-policy pair.
        """
        batch = torch.zeros(len(rows), k_max, self.feature_dim)
        mask = torch.zeros(len(rows), k_max, dtype=torch.bool)
        for b, (row, gen) in enumerate(zip(rows.tolist(), generators)):
            others = self.context_of_user[int(self.user_index[row])]
            others = others[others != row]
            if len(others) == 0:
                mask[b, 0] = True  # placeholder: zero features, user tokens removed by the conditioner
                continue
            k = int(torch.randint(k_min, k_max + 1, (1,), generator=gen))
            k = min(k, len(others))
            chosen = others[torch.randperm(len(others), generator=gen)[:k]]
            batch[b, :k] = self.features(chosen)
            mask[b, :k] = True
        return batch, mask

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({"text": self.text, "image_0": self.image_0, "image_1": self.image_1, "label": self.label,
                   "user_index": self.user_index, "context_ok": self.context_ok}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ContextBank:
        return cls(**load_file(str(path)))


def build_context_bank(cache, backbone, data_path, tie_policy: str, backbone_name: str, batch_size: int = 128,
                       progress: bool = True) -> ContextBank:
    """Embed every pair of the data with the frozen backbone once; stored beside the latent cache."""
    safe = "".join(c if c.isalnum() else "_" for c in backbone_name)[-80:]
    path = Path(cache.path) / f"context-{safe}.safetensors"
    if path.exists():
        return ContextBank.load(path)
    users = {u: i for i, u in enumerate(cache.users)}
    text, im0, im1, label, user, context_ok = [], [], [], [], [], []
    pending: list = []

    def flush():
        text.append(backbone.embed_texts([p.prompt for p in pending]))
        im0.append(backbone.embed_images([p.image_0 for p in pending]))
        im1.append(backbone.embed_images([p.image_1 for p in pending]))
        label.extend(p.label for p in pending)
        user.extend(users[p.user_id] for p in pending)
        context_ok.extend(not any(is_policy_model(p.extras.get(k)) for k in ("model_0", "model_1")) for p in pending)
        pending.clear()

    # Same reader and tie policy as the latent cache, so row i here is row i there (checked below).
    for pair in tqdm(iter_preferences(data_path, tie_policy=tie_policy, progress=False), total=len(cache),
                     desc="embed context", disable=not progress, dynamic_ncols=True):
        pending.append(pair)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    bank = ContextBank(torch.cat(text).float().cpu(), torch.cat(im0).float().cpu(), torch.cat(im1).float().cpu(),
                       torch.tensor(label, dtype=torch.float32), torch.tensor(user, dtype=torch.long),
                       torch.tensor(context_ok, dtype=torch.bool))
    if len(bank.label) != len(cache):
        raise RuntimeError(f"context bank has {len(bank.label)} pairs but the latent cache {len(cache)}: "
                           "the data changed while training started; delete the cache and rerun")
    for i in (0, len(cache) - 1):
        if int(cache[i]["user_index"]) != int(bank.user_index[i]):
            raise RuntimeError("context bank and latent cache disagree on row order; delete the cache and rerun")
    bank.save(path)
    return bank


def report_skips(bank: ContextBank, echo=None) -> None:
    """Say once how many users PPD dropped for lack of context (``echo``: e.g. ``accelerator.print``)."""
    message = bank.skip_message
    if message:
        (echo or logger.warning)(message)
