"""The user encoder: a user's preference examples -> K tokens for the UNet's extra cross-attention.

A frozen backbone (``backbones.py``) turns the examples into features; ``UserEncoder`` is the
trainable head, a small set transformer (Lee et al. 2019): per-example MLP, self-attention blocks
without positions, then pooling by multi-head attention onto K learned seed queries (PMA). With no
positions anywhere the tokens do not depend on the order of the examples, and a padding mask lets
one batch hold users with different numbers of examples.

Around it: ``embed_user`` (cached per set of examples, order-independent), ``mix_embeddings``
(interpolating between users) and ``save_user_embedding`` / ``load_user_embedding``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from diffpref.personalize.backbones import UserBackbone, UserExample

__all__ = ["UserEncoder", "UserExample", "embed_user", "example_digest", "user_cache_key", "mix_embeddings",
           "save_user_embedding", "load_user_embedding"]


class UserEncoder(ModelMixin, ConfigMixin):
    """Set transformer head: ``features [B, k, F]`` (+ mask) -> ``tokens [B, K, d]``.

    ``token_dim`` is the UNet's ``cross_attention_dim``. The output ends in a LayerNorm so user
    tokens sit at the scale of text-encoder states whatever the backbone's feature scale.
    """

    @register_to_config
    def __init__(self, feature_dim: int, num_tokens: int = 4, token_dim: int = 768, hidden: int = 256,
                 layers: int = 2, heads: int = 4, output_scale_init: float = 1.0, preference_dim: int = 0,
                 num_anchors: int = 0, anchor_words: list[str] | None = None, anchor_evidence: bool = False,
                 free_anchors: int = 0, evidence_dim: int = 0):
        super().__init__()
        if evidence_dim > 0:
            self._init_evidence(feature_dim, num_tokens, token_dim, evidence_dim, num_anchors, preference_dim)
            return
        if hidden % heads != 0:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        if num_tokens < 1 or layers < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1 and layers={layers} >= 0")
        if free_anchors < 0 or (free_anchors > 0 and num_anchors == 0):
            raise ValueError(f"free_anchors={free_anchors} must be >= 0, and > 0 only beside text anchors "
                             f"(num_anchors={num_anchors})")
        # Backbone features can be large and unevenly scaled (LLM hidden states have outlier dims).
        self.embed = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        ])
        self.seeds = nn.Parameter(torch.randn(1, num_tokens, hidden) / math.sqrt(hidden))
        self.pool_norm = nn.LayerNorm(hidden)
        self.pool = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.pool_mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                      nn.Linear(4 * hidden, hidden))
        if num_anchors > 0:
            # Text-anchored tokens (``anchors.py``): each token is a softmax mixture of the rows of
            # ``anchors`` (text-encoder states of prompt words, set by ``set_anchors``). The norm keeps
            # the logits from saturating the softmax, where a one-hot mixture would stop learning.
            # Zero weights: every token starts as the plain average of the anchors.
            self.register_buffer("anchors", torch.zeros(num_anchors, token_dim))
            # Free anchors: learned tokens beside the words, for tastes no prompt word names (size,
            # brightness); they start near the average word (``set_anchors``) and DPO moves them.
            self.free_anchor_tokens = nn.Parameter(torch.zeros(free_anchors, token_dim)) if free_anchors else None
            self.anchor_norm = nn.LayerNorm(hidden)
            self.anchor_logits = nn.Linear(hidden, num_anchors + free_anchors)
            nn.init.zeros_(self.anchor_logits.weight)
            nn.init.zeros_(self.anchor_logits.bias)
            if preference_dim > 0:
                # Each anchor word's direction in the backbone's space (its text embedding), so that the
                # preference read-out must name the words that tell the user's choices apart.
                self.register_buffer("anchor_directions", torch.zeros(num_anchors, preference_dim))
                # a free anchor's direction is learned (from zero: no evidence, no read-out at first)
                self.free_anchor_directions = (nn.Parameter(torch.zeros(free_anchors, preference_dim))
                                               if free_anchors else None)
                self.preference_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            if anchor_evidence:
                if preference_dim <= 0 or feature_dim != 4 * preference_dim:
                    raise ValueError("anchor_evidence reads the [text, pref, rej, pref - rej] features of an open_clip "
                                     f"backbone: it needs feature_dim = 4 * preference_dim, got {feature_dim} and "
                                     f"{preference_dim}")
                self.evidence_log_scale = nn.Parameter(torch.tensor(math.log(30.0)))
            readout_dim = 0
        else:
            self.proj_out = nn.Linear(hidden, token_dim)
            self.norm_out = nn.LayerNorm(token_dim)
            readout_dim = num_tokens * token_dim
        # Optional training aid (``predict_preference``): a linear read-out of the tokens as a reward
        # direction in the backbone's image-embedding space. Inference never uses it.
        self.preference_head = nn.Linear(readout_dim, preference_dim) if preference_dim > 0 and readout_dim else None
        if output_scale_init != 1.0 and num_anchors == 0:
            # Small tokens at first: the personalized model starts next to the base model (as LoRA
            # starts at B = 0), so preference training starts near log 2 instead of from whatever
            # unit-scale random tokens would do to the UNet; not zero, so every weight gets gradient.
            nn.init.constant_(self.norm_out.weight, output_scale_init)

    def _init_evidence(self, feature_dim: int, num_tokens: int, token_dim: int, evidence_dim: int,
                       num_anchors: int, preference_dim: int) -> None:
        """The evidence encoder (``evidence_dim`` > 0): ``tokens = LN(shared + W @ mean(phi(pref) - phi(rej)))``.

        The mean embedding difference between preferred and rejected images is the plain estimate of a
        linear taste from a few choices; one linear map shared by all users turns it into tokens, so every
        user's pairs train the same few weights (a learned head has to discover that statistic from the
        DPO signal first, and on the world it did not). ``W`` starts at zero: a user-blind start.
        """
        if feature_dim != 4 * evidence_dim:
            raise ValueError(f"the evidence encoder reads the [text, pref, rej, pref - rej] features of an open_clip "
                             f"backbone: it needs feature_dim = 4 * evidence_dim, got {feature_dim} and {evidence_dim}")
        if num_anchors or preference_dim:
            raise ValueError("the evidence encoder has no text anchors and no preference head: "
                             f"got num_anchors={num_anchors}, preference_dim={preference_dim}")
        gen = torch.Generator().manual_seed(0)
        self.evidence_tokens = nn.Parameter(torch.randn(num_tokens, token_dim, generator=gen))
        self.evidence_map = nn.Linear(evidence_dim, num_tokens * token_dim, bias=False)
        nn.init.zeros_(self.evidence_map.weight)
        # 1 / RMS of one pair's difference (set from the training data by ``set_evidence_scale``), so
        # the map's inputs are O(1) and its learning rate means the same on any backbone.
        self.register_buffer("evidence_scale", torch.ones(()))
        self.preference_head = None

    def set_evidence_scale(self, features: torch.Tensor) -> None:
        """Normalise the evidence by the RMS of single-pair differences, from per-example ``features [N, F]``."""
        rms = self._preference_difference(features).float().pow(2).mean().sqrt()
        if not torch.isfinite(rms) or rms <= 0:
            raise ValueError(f"cannot scale the evidence: the pair differences have RMS {float(rms)} "
                             "(are all preferred and rejected images identical?)")
        self.evidence_scale.fill_(float(1.0 / rms))

    def _preference_difference(self, features: torch.Tensor) -> torch.Tensor:
        """phi(pref) - phi(rej): the last block of the [text, pref, rej, pref - rej] features."""
        return features[..., -self.config.evidence_dim:]

    def _evidence_forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(self.dtype).unsqueeze(-1)
        diff = self._preference_difference(features).to(self.dtype)
        evidence = (diff * weights).sum(1) / weights.sum(1) * self.evidence_scale  # (B, E)
        tokens = self.evidence_tokens + self.evidence_map(evidence).view(-1, *self.evidence_tokens.shape)
        return nn.functional.layer_norm(tokens, tokens.shape[-1:])

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                return_unscaled: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``features [B, k_max, F]``, ``mask [B, k_max]`` (True = real example) -> ``[B, K, d]``.

        ``return_unscaled=True`` also returns the tokens before ``norm_out``'s affine scale (unit
        scale whatever that scale has become), which is what ``predict_preference`` reads; with text
        anchors it returns the mixture weights ``[B, K, A]`` instead.
        """
        if features.ndim != 3 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features must be [B, k, {self.config.feature_dim}], got {tuple(features.shape)}")
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        if mask.shape != features.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(features.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any(1).all()):  # this is a CPU-GPU sync point, but an empty user would give NaNs
            empty = (~mask.any(1)).nonzero().flatten().tolist()
            raise ValueError(f"every user needs at least one real example; rows {empty} are all padding")
        if self.config.evidence_dim > 0:
            if return_unscaled:
                raise ValueError("the evidence encoder has no preference head (return_unscaled)")
            return self._evidence_forward(features, mask)
        padding = ~mask
        h = self.embed(features.to(self.dtype))  # (B, k, hidden)
        for block in self.blocks:
            h = block(h, src_key_padding_mask=padding)
        seeds = self.seeds.expand(h.shape[0], -1, -1)  # (B, K, hidden)
        kv = self.pool_norm(h)
        # Deep-sets path beside the attention pooling: the masked mean of the examples reaches every
        # token directly. Averaging is the natural estimate of a taste from a few choices, and
        # attention pooling alone (softmax over near-identical keys at init) learns it far more slowly.
        weights = mask.to(h.dtype).unsqueeze(-1)
        mean = (h * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        tokens = seeds + mean + self.pool(seeds, kv, kv, key_padding_mask=padding, need_weights=False)[0]
        tokens = tokens + self.pool_mlp(tokens)
        if self.config.num_anchors > 0:
            logits = self.anchor_logits(self.anchor_norm(tokens))  # (B, K, A)
            if self.config.anchor_evidence:
                # Zero-shot evidence for each word: how far, on average over the examples, the preferred
                # image lies beyond the rejected one along the word's text direction. A word that keeps
                # separating the user's choices ("red" for someone who likes red) is the natural first
                # guess at their taste; the learned logits correct it.
                directions = self.all_anchor_directions()
                diff = features[..., -self.config.preference_dim:].to(directions.dtype)
                per_example = diff @ directions.T  # (B, k, A)
                evidence = (per_example * weights).sum(1) / weights.sum(1)
                logits = logits + self.evidence_log_scale.exp() * evidence.unsqueeze(1).to(logits.dtype)
            mixture = logits.softmax(-1)
            anchored = mixture @ self.all_anchors().to(mixture.dtype)
            return (anchored, mixture) if return_unscaled else anchored
        projected = self.proj_out(tokens)
        scaled = self.norm_out(projected)  # (B, K, d)
        if not return_unscaled:
            return scaled
        unscaled = nn.functional.layer_norm(projected, projected.shape[-1:], eps=self.norm_out.eps)
        return scaled, unscaled

    def all_anchors(self) -> torch.Tensor:
        """The anchor bank the tokens mix: the word anchors, then the free ones ``[A + M, token_dim]``."""
        if self.free_anchor_tokens is None:
            return self.anchors
        return torch.cat([self.anchors, self.free_anchor_tokens.to(self.anchors.dtype)])

    def all_anchor_directions(self) -> torch.Tensor:
        """Backbone-space direction of every anchor ``[A + M, preference_dim]`` (free ones learned)."""
        if self.free_anchor_directions is None:
            return self.anchor_directions
        return torch.cat([self.anchor_directions, self.free_anchor_directions.to(self.anchor_directions.dtype)])

    def set_anchors(self, anchors: torch.Tensor, words: Sequence[str] | None = None,
                    directions: torch.Tensor | None = None) -> None:
        """Fill the anchor bank (``[num_anchors, token_dim]``, see ``anchors.build_text_anchors``).

        ``directions [num_anchors, preference_dim]``: the anchor words embedded by the backbone's text
        tower, which the preference read-out uses (required when the encoder has one).
        """
        if self.config.num_anchors == 0:
            raise ValueError("this encoder was built with num_anchors=0: it has no anchor bank")
        if tuple(anchors.shape) != tuple(self.anchors.shape):
            raise ValueError(f"anchors must have shape {tuple(self.anchors.shape)}, got {tuple(anchors.shape)}")
        if not torch.isfinite(anchors).all():
            raise ValueError("anchors hold NaN or inf values")
        self.anchors.copy_(anchors.to(self.anchors))
        if self.free_anchor_tokens is not None:
            with torch.no_grad():  # the average word, spread apart so that each free anchor gets its own gradient
                spread = anchors.std(0) if len(anchors) > 1 else anchors.abs().mean().expand(anchors.shape[1])
                noise = torch.randn(self.free_anchor_tokens.shape, generator=torch.Generator().manual_seed(0))
                self.free_anchor_tokens.copy_((anchors.mean(0) + 0.5 * spread * noise).to(self.free_anchor_tokens))
        if hasattr(self, "anchor_directions"):
            if directions is None or tuple(directions.shape) != tuple(self.anchor_directions.shape):
                raise ValueError(f"this encoder reads preferences through its anchors: pass directions of shape "
                                 f"{tuple(self.anchor_directions.shape)}, got "
                                 f"{None if directions is None else tuple(directions.shape)}")
            self.anchor_directions.copy_(directions.to(self.anchor_directions))
        if words is not None:
            self.register_to_config(anchor_words=list(words))

    def predict_preference(self, unscaled_tokens: torch.Tensor, image_diff: torch.Tensor) -> torch.Tensor:
        """Logit that the user prefers image a over b: ``head(tokens) . (phi(a) - phi(b))``, shape [B].

        Bradley-Terry over backbone image embeddings, with the user's reward direction read from
        their tokens. Trained on the pair being denoised (never in its own context), it gives the
        head a direct, low-variance signal about each user's taste from the first step, where the
        DPO gradient through the UNet is weak and noisy while the user branch is still small.
        """
        if self.config.num_anchors > 0 and self.config.preference_dim > 0:
            # unscaled_tokens are the mixture weights [B, K, A]: the user's reward direction is the
            # average over tokens of their anchor words' backbone embeddings.
            direction = unscaled_tokens.mean(1) @ self.all_anchor_directions().to(unscaled_tokens.dtype)
            return self.preference_log_scale.exp() * (direction * image_diff.to(direction.dtype)).sum(-1)
        if self.preference_head is None:
            raise ValueError("this encoder was built with preference_dim=0: it has no preference head")
        direction = self.preference_head(unscaled_tokens.flatten(1).to(self.dtype))
        return (direction * image_diff.to(direction.dtype)).sum(-1)


# ----------------------------------------------------------------------------------------------
# Embedding a user, with a cache


def _image_bytes(image: Image.Image | np.ndarray) -> bytes:
    array = np.ascontiguousarray(np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image)
    return f"{array.dtype.str}{array.shape}".encode() + array.tobytes()


def example_digest(example: UserExample) -> str:
    """sha256 of one example's prompt and pixels (a PIL image and its uint8 array hash alike)."""
    h = hashlib.sha256()
    for part in (example.prompt.encode("utf-8"), _image_bytes(example.preferred), _image_bytes(example.rejected)):
        h.update(len(part).to_bytes(8, "little"))  # length prefixes keep the boundaries unambiguous
        h.update(part)
    return h.hexdigest()


def user_cache_key(examples: Sequence[UserExample]) -> str:
    """One key per multiset of examples: the per-example digests are sorted, so order does not matter."""
    return hashlib.sha256("".join(sorted(example_digest(ex) for ex in examples)).encode()).hexdigest()


@torch.no_grad()
def embed_user(encoder: UserEncoder, backbone: UserBackbone, examples: Sequence[UserExample],
               cache: dict | None = None) -> torch.Tensor:
    """The user's tokens ``[K, d]`` from their examples.

    ``cache`` maps ``user_cache_key(examples)`` to tokens; it belongs to one (encoder weights,
    backbone) pair -- start a new dict after training the encoder further.
    """
    if len(examples) == 0:
        raise ValueError("a user needs at least one example; got an empty list")
    key = user_cache_key(examples) if cache is not None else None
    if cache is not None and key in cache:
        return cache[key]
    features = backbone.embed_examples(list(examples))  # (k, F), or (1, F) for a set-summarising backbone
    tokens = encoder(features.unsqueeze(0).to(encoder.device))[0].detach()
    if cache is not None:
        cache[key] = tokens
    return tokens


def mix_embeddings(users: Mapping[str, tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Weighted average of user tokens, ``{name: (tokens, weight)}``; weights are normalised to sum 1."""
    if not users:
        raise ValueError("mix_embeddings needs at least one user")
    shapes = {name: tuple(tokens.shape) for name, (tokens, _) in users.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"user tokens differ in shape: {shapes}")
    for name, (_, weight) in users.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of user {name!r} is {weight}; weights must be finite and >= 0")
    total = sum(float(weight) for _, weight in users.values())
    if total <= 0:
        weights = {name: weight for name, (_, weight) in users.items()}
        raise ValueError(f"all weights are zero ({weights}); give some user a positive weight")
    mixed = None
    for tokens, weight in users.values():
        if weight == 0:
            continue  # so that weights (1, 0) return the user exactly, even if the other holds inf/NaN
        term = tokens * (float(weight) / total)
        mixed = term if mixed is None else mixed + term
    return mixed


# ----------------------------------------------------------------------------------------------
# Files

_FORMAT = "diffpref-user-embedding"


def save_user_embedding(path: str | Path, tokens: torch.Tensor, meta: dict | None = None) -> Path:
    """Write ``tokens [K, d]`` as safetensors, with ``meta`` (JSON-serialisable) in the header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": _FORMAT, "meta": json.dumps(meta or {})}
    save_file({"tokens": tokens.detach().cpu().contiguous()}, str(path), metadata=header)
    return path


def load_user_embedding(path: str | Path) -> tuple[torch.Tensor, dict]:
    """``(tokens, meta)`` as written by ``save_user_embedding``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a user embedding file "
                             f"(format={header.get('format')!r}, expected {_FORMAT!r})")
        return f.get_tensor("tokens"), json.loads(header["meta"])
