"""User encoders: a user's preference examples -> K tokens for the UNet's extra cross-attention.

A frozen backbone (``backbones.py``) turns the examples into features ``[B, k, F]`` (a padding mask
lets one batch hold users with different numbers of examples); a small trainable head turns them
into tokens ``[B, K, d]``. Two heads ship, one class each, on the ``UserEncoder`` base (input
checks, config, loading):

- ``SetUserEncoder`` (``ppd_encoder: set``, the sd15/sdxl recipes): a set transformer (Lee et al.
  2019): per-example MLP, self-attention blocks without positions, pooling by multi-head attention
  onto K learned seed queries (PMA). With no positions anywhere the tokens do not depend on the
  order of the examples.
- ``EvidenceUserEncoder`` (``ppd_encoder: evidence``, the shipped ``embedded-ppd`` adapter):
  ``tokens = LN(shared + W @ mean(phi(pref) - phi(rej)))``.

``UserEncoder.from_pretrained`` picks the class from the saved config, so adapters saved before the
split (one ``UserEncoder`` class with both heads behind flags) load unchanged.

Around them: ``embed_user`` (cached per set of examples, order-independent), ``mix_embeddings``
(interpolating between users) and ``save_user_embedding`` / ``load_user_embedding``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from diffpref.personalize.backbones import UserBackbone, UserExample

__all__ = ["UserEncoder", "SetUserEncoder", "EvidenceUserEncoder", "ENCODERS", "build_user_encoder", "UserExample",
           "embed_user", "example_digest", "user_cache_key", "mix_embeddings", "save_user_embedding",
           "load_user_embedding"]

# The set head's tokens start small: the personalized model starts next to the base model (as LoRA
# starts at B = 0), so preference training starts near log 2 instead of from whatever unit-scale
# random tokens would do to the UNet; not zero, so every weight gets gradient. It was the config key
# ``ppd_token_scale_init`` (default 0.05) until only recipes that never shipped changed it.
SET_TOKEN_SCALE_INIT = 0.05

# Keys of encoders saved by recipes that no longer exist (text anchors, a preference read-out); see
# reports/ppd_experiments.md. Saved at 0 / off they mean nothing, and such encoders still load.
_RETIRED_KEYS = {"preference_dim": 0, "num_anchors": 0, "free_anchors": 0, "anchor_evidence": False,
                 "anchor_words": None}
# Every key of the one UserEncoder class before the split: a saved config holds all of them.
_PRE_SPLIT_KEYS = frozenset({"feature_dim", "num_tokens", "token_dim", "hidden", "layers", "heads", "output_scale_init",
                             "evidence_dim", *_RETIRED_KEYS})


class UserEncoder(ModelMixin, ConfigMixin):
    """Base of the user encoders: ``features [B, k, F]`` (+ mask) -> ``tokens [B, K, d]``.

    A subclass builds its layers and implements ``encode(features, mask)`` on checked inputs.
    ``UserEncoder.from_pretrained(folder)`` returns the subclass the folder was saved from.
    """

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_inputs(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The mask (True = real example; all True when None) after checking shapes and emptiness."""
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
        return mask

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``features [B, k_max, F]``, ``mask [B, k_max]`` (True = real example) -> ``[B, K, d]``."""
        if type(self) is UserEncoder:
            raise TypeError("UserEncoder is the base class: build a SetUserEncoder or an EvidenceUserEncoder")
        return self.encode(features, self.check_inputs(features, mask))

    @staticmethod
    def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the real examples: ``values [B, k, C]``, ``mask [B, k]`` -> ``[B, C]``."""
        weights = mask.to(values.dtype).unsqueeze(-1)
        return (values * weights).sum(1) / weights.sum(1)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # A config saved before the split carries the other head's keys (and retired ones, at 0);
        # dropping them here keeps diffusers from warning about them on every load.
        expected = set(inspect.signature(cls.__init__).parameters)
        config_dict = {k: v for k, v in config_dict.items() if k in expected or k not in _PRE_SPLIT_KEYS}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> UserEncoder:
        if cls is not UserEncoder:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        config = json.loads((folder / cls.config_name).read_text())
        return encoder_class(config).from_pretrained(pretrained_model_name_or_path, **kwargs)


def encoder_class(config: Mapping) -> type[UserEncoder]:
    """The class a saved encoder config belongs to; a clear error for a retired recipe's encoder."""
    retired = {k: config[k] for k, off in _RETIRED_KEYS.items() if config.get(k, off) not in (off, [], None)}
    if retired:
        raise ValueError(f"this user encoder uses {retired}: text anchors and the preference read-out were "
                         "retired (reports/ppd_experiments.md names the last commit that can load it)")
    name = config.get("_class_name", "UserEncoder")
    if name in ENCODERS_BY_CLASS:
        return ENCODERS_BY_CLASS[name]
    # Saved before the split: one UserEncoder class, the evidence head when evidence_dim > 0.
    return EvidenceUserEncoder if int(config.get("evidence_dim", 0)) > 0 else SetUserEncoder


class SetUserEncoder(UserEncoder):
    """Set-transformer head. ``token_dim`` is the UNet's ``cross_attention_dim``.

    The output ends in a LayerNorm so user tokens sit at the scale of text-encoder states whatever
    the backbone's feature scale; its gain starts at ``output_scale_init`` (``SET_TOKEN_SCALE_INIT``).
    """

    @register_to_config
    def __init__(self, feature_dim: int, num_tokens: int = 4, token_dim: int = 768, hidden: int = 256,
                 layers: int = 2, heads: int = 4, output_scale_init: float = SET_TOKEN_SCALE_INIT):
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        if num_tokens < 1 or layers < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1 and layers={layers} >= 0")
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
        self.proj_out = nn.Linear(hidden, token_dim)
        self.norm_out = nn.LayerNorm(token_dim)
        if output_scale_init != 1.0:
            nn.init.constant_(self.norm_out.weight, output_scale_init)

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        padding = ~mask
        h = self.embed(features.to(self.dtype))  # (B, k, hidden)
        for block in self.blocks:
            h = block(h, src_key_padding_mask=padding)
        seeds = self.seeds.expand(h.shape[0], -1, -1)  # (B, K, hidden)
        kv = self.pool_norm(h)
        # Deep-sets path beside the attention pooling: the masked mean of the examples reaches every
        # token directly. Averaging is the natural estimate of a taste from a few choices, and
        # attention pooling alone (softmax over near-identical keys at init) learns it far more slowly.
        mean = self._masked_mean(h, mask).unsqueeze(1)
        tokens = seeds + mean + self.pool(seeds, kv, kv, key_padding_mask=padding, need_weights=False)[0]
        tokens = tokens + self.pool_mlp(tokens)
        return self.norm_out(self.proj_out(tokens))  # (B, K, d)


class EvidenceUserEncoder(UserEncoder):
    """Evidence head: ``tokens = LN(shared + W @ mean(phi(pref) - phi(rej)))``.

    The mean embedding difference between preferred and rejected images is the plain estimate of a
    linear taste from a few choices; one linear map shared by all users turns it into tokens, so every
    user's pairs train the same few weights (a learned head has to discover that statistic from the
    DPO signal first, and on the world it did not). ``W`` starts at zero: a user-blind start. It reads
    the ``[text, pref, rej, pref - rej]`` features of an open_clip backbone (``evidence_dim`` each).
    """

    @register_to_config
    def __init__(self, feature_dim: int, num_tokens: int = 4, token_dim: int = 768, evidence_dim: int = 64):
        super().__init__()
        if evidence_dim < 1 or feature_dim != 4 * evidence_dim:
            raise ValueError(f"the evidence encoder reads the [text, pref, rej, pref - rej] features of an open_clip "
                             f"backbone: it needs feature_dim = 4 * evidence_dim, got {feature_dim} and {evidence_dim}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1")
        gen = torch.Generator().manual_seed(0)
        self.evidence_tokens = nn.Parameter(torch.randn(num_tokens, token_dim, generator=gen))
        self.evidence_map = nn.Linear(evidence_dim, num_tokens * token_dim, bias=False)
        nn.init.zeros_(self.evidence_map.weight)
        # 1 / RMS of one pair's difference (set from the training data by ``set_evidence_scale``), so
        # the map's inputs are O(1) and its learning rate means the same on any backbone.
        self.register_buffer("evidence_scale", torch.ones(()))

    def preference_difference(self, features: torch.Tensor) -> torch.Tensor:
        """phi(pref) - phi(rej): the last block of the [text, pref, rej, pref - rej] features."""
        return features[..., -self.config.evidence_dim:]

    def set_evidence_scale(self, features: torch.Tensor) -> None:
        """Normalise the evidence by the RMS of single-pair differences, from per-example ``features [N, F]``."""
        rms = self.preference_difference(features).float().pow(2).mean().sqrt()
        if not torch.isfinite(rms) or rms <= 0:
            raise ValueError(f"cannot scale the evidence: the pair differences have RMS {float(rms)} "
                             "(are all preferred and rejected images identical?)")
        self.evidence_scale.fill_(float(1.0 / rms))

    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        diff = self.preference_difference(features).to(self.dtype)
        evidence = self._masked_mean(diff, mask) * self.evidence_scale  # (B, E)
        tokens = self.evidence_tokens + self.evidence_map(evidence).view(-1, *self.evidence_tokens.shape)
        return nn.functional.layer_norm(tokens, tokens.shape[-1:])


ENCODERS: dict[str, type[UserEncoder]] = {"set": SetUserEncoder, "evidence": EvidenceUserEncoder}
ENCODERS_BY_CLASS = {cls.__name__: cls for cls in ENCODERS.values()}


def build_user_encoder(kind: str, **kwargs) -> UserEncoder:
    """``kind`` ('set' | 'evidence', the ``ppd_encoder`` key) built with its own keyword arguments."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown user encoder {kind!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[kind](**kwargs)


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
