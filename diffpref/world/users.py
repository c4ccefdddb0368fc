"""Simulated users of the preference world: linear tastes over detected attributes.

A user is a sparse weight vector over ``FEATURE_KEYS`` ("color:red", "size", ...). Their
reward for an image is ``weights . features`` of the image's ``Detection``; their choice
between two images follows a Bradley-Terry model on the reward difference.

JSON format (a file holds a list of users)::

    [{"user_id": "u1", "weights": {"color:red": 1.0, "size": -0.5, "background:black": 0.3}}]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from diffpref.world.detector import FEATURE_KEYS, Detection

Features = Union[Detection, Mapping[str, float]]
_KEY_INDEX = {k: i for i, k in enumerate(FEATURE_KEYS)}


@dataclass(frozen=True)
class WorldUser:
    """A simulated user: an id and non-empty weights keyed by ``FEATURE_KEYS`` entries."""

    user_id: str
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.user_id, str) or not self.user_id:
            raise ValueError(f"user_id must be a non-empty string, got {self.user_id!r}")
        if not isinstance(self.weights, Mapping):
            raise ValueError(f"user {self.user_id!r}: weights must be a mapping, got {type(self.weights).__name__}")
        clean: dict[str, float] = {}
        for key, value in self.weights.items():
            if key not in _KEY_INDEX:
                raise ValueError(
                    f"user {self.user_id!r}: invalid weight key {key!r}; valid keys are {', '.join(FEATURE_KEYS)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"user {self.user_id!r}: weight for {key!r} must be a finite number, got {value!r}")
            clean[key] = float(value)
        object.__setattr__(self, "weights", clean)  # frozen: store the validated copy

    def weight_vector(self) -> np.ndarray:
        """Weights as an array ordered like ``FEATURE_KEYS`` (zeros for absent keys)."""
        vec = np.zeros(len(FEATURE_KEYS))
        for key, value in self.weights.items():
            vec[_KEY_INDEX[key]] = value
        return vec

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "weights": dict(self.weights)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WorldUser":
        if not isinstance(data, Mapping):
            raise ValueError(f"a user must be a JSON object, got {type(data).__name__}")
        missing = {"user_id", "weights"} - set(data)
        if missing:
            raise ValueError(f"user entry is missing {sorted(missing)}")
        extra = set(data) - {"user_id", "weights"}
        if extra:
            raise ValueError(f"user entry has unknown fields {sorted(extra)}")
        return cls(user_id=data["user_id"], weights=data["weights"])


EXAMPLE_USERS: dict[str, WorldUser] = {
    "red_large": WorldUser("red_large", {"color:red": 1.0, "size": 1.0}),
    "dark_small": WorldUser("dark_small", {"background:black": 1.0, "size": -1.0}),
}


def load_users(path: str | Path) -> list[WorldUser]:
    """Read a JSON list of users; errors name the file (and the entry at fault)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from err
    if isinstance(data, dict):  # tolerate a file holding a single user
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of users, got {type(data).__name__}")
    users = []
    for i, entry in enumerate(data):
        try:
            users.append(WorldUser.from_dict(entry))
        except ValueError as err:
            raise ValueError(f"{path}: user #{i}: {err}") from err
    ids = [u.user_id for u in users]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate user ids {dupes}")
    return users


def save_users(users: Sequence[WorldUser], path: str | Path) -> None:
    """Write users as a JSON list (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([u.to_dict() for u in users], indent=2) + "\n")


def _feature_vector(item: Features) -> np.ndarray:
    if isinstance(item, Detection):
        return item.feature_vector()
    if isinstance(item, Mapping):
        unknown = set(item) - set(_KEY_INDEX)
        if unknown:
            raise ValueError(f"unknown feature keys {sorted(unknown)}; valid keys are {', '.join(FEATURE_KEYS)}")
        vec = np.zeros(len(FEATURE_KEYS))
        for key, value in item.items():
            vec[_KEY_INDEX[key]] = float(value)
        return vec
    raise TypeError(f"expected a Detection or a feature dict, got {type(item).__name__}")


def oracle_reward(user: WorldUser, items: Features | Sequence[Features] | np.ndarray) -> float | np.ndarray:
    """``weights . features``: a float for one Detection/feature dict, an array for a sequence.

    Arrays are feature vectors (1-D, a float) or matrices (2-D, an array) ordered like ``FEATURE_KEYS``.
    """
    w = user.weight_vector()
    if isinstance(items, (Detection, Mapping)):
        return float(_feature_vector(items) @ w)
    if isinstance(items, np.ndarray) and items.ndim == 1 and items.dtype != object:
        if items.shape[0] != len(FEATURE_KEYS):
            raise ValueError(f"feature vector needs {len(FEATURE_KEYS)} entries, got {items.shape[0]}")
        return float(items.astype(np.float64) @ w)
    if isinstance(items, np.ndarray) and items.ndim == 2:
        if items.shape[1] != len(FEATURE_KEYS):
            raise ValueError(f"feature matrix needs {len(FEATURE_KEYS)} columns, got {items.shape[1]}")
        return items.astype(np.float64) @ w
    if len(items) == 0:
        return np.zeros(0)
    return np.stack([_feature_vector(it) for it in items]) @ w


def bradley_terry_probability(
    user: WorldUser, item_0: Features | Sequence[Features], item_1: Features | Sequence[Features], temperature: float
) -> float | np.ndarray:
    """P(image 0 preferred) = sigmoid((r0 - r1) / temperature); temperature 0: 1, 0, or 0.5 on ties."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    diff = np.asarray(oracle_reward(user, item_0), dtype=np.float64) - np.asarray(oracle_reward(user, item_1))
    if temperature == 0:
        p = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    else:
        # Numerically stable sigmoid: tanh never overflows.
        p = 0.5 * (1.0 + np.tanh(diff / (2.0 * temperature)))
    return float(p) if p.ndim == 0 else p


def bradley_terry_choice(
    user: WorldUser,
    item_0: Features | Sequence[Features],
    item_1: Features | Sequence[Features],
    temperature: float = 1.0,
    rng: np.random.Generator | None = None,
) -> float | np.ndarray:
    """Simulated choice as ``label_0``: 1.0 if image 0 is preferred, 0.0 if image 1 is.

    With temperature > 0 the label is drawn with P(label_0 = 1) = sigmoid((r0 - r1) / T)
    (``rng`` required). With temperature 0 it is the deterministic argmax, and an exact
    reward tie gives 0.5 (a tie label, as in preference datasets). Sequences of items
    give an array of labels.
    """
    p = bradley_terry_probability(user, item_0, item_1, temperature)
    if temperature == 0:
        return p
    if rng is None:
        raise ValueError("bradley_terry_choice needs an rng when temperature > 0")
    draw = rng.random(np.shape(p))
    labels = (draw < p).astype(np.float64)
    return float(labels) if np.ndim(labels) == 0 else labels


def random_users(
    n: int,
    rng: np.random.Generator,
    prefix: str = "u",
    min_keys: int = 2,
    max_keys: int = 4,
    magnitude: tuple[float, float] = (0.5, 1.5),
) -> list[WorldUser]:
    """``n`` users "{prefix}0".."{prefix}{n-1}", each with 2-4 non-zero weights of mixed signs."""
    if not 2 <= min_keys <= max_keys <= len(FEATURE_KEYS):
        raise ValueError(f"need 2 <= min_keys <= max_keys <= {len(FEATURE_KEYS)}, got {min_keys}, {max_keys}")
    users = []
    for i in range(n):
        k = int(rng.integers(min_keys, max_keys + 1))
        keys = rng.choice(len(FEATURE_KEYS), size=k, replace=False)
        signs = rng.choice([-1.0, 1.0], size=k)
        # Mixed signs guaranteed: a user who only likes things has no trade-offs to learn.
        signs[0], signs[1] = 1.0, -1.0
        rng.shuffle(signs)
        mags = rng.uniform(*magnitude, size=k)
        weights = {FEATURE_KEYS[j]: round(float(s * m), 3) for j, s, m in zip(keys, signs, mags)}
        users.append(WorldUser(f"{prefix}{i}", weights))
    return users


TASTE_FAMILIES: dict[str, tuple[str, ...]] = {
    "color": tuple(k for k in FEATURE_KEYS if k.startswith("color:")),
    "background": tuple(k for k in FEATURE_KEYS if k.startswith("background:")),
    "shape": tuple(k for k in FEATURE_KEYS if k.startswith("shape:")),
    "size": ("size",),
    "brightness": ("brightness",),
}


def taste_users(
    n: int,
    rng: np.random.Generator,
    prefix: str = "u",
    families_per_user: tuple[int, int] = (1, 2),
    magnitude: tuple[float, float] = (1.0, 2.0),
    exclude: Sequence[WorldUser] = (),
) -> list[WorldUser]:
    """``n`` users with a few clear tastes: each likes one value of 1-2 attribute families.

    A family is colour, background or shape (the user likes one value of it) or size or
    brightness (more or less of it). Unlike ``random_users``, whose 2-4 mixed-sign weights a
    handful of choices barely reveal, these are the users few-shot personalization is about:
    four choices say a lot about them. A user whose set of keys equals that of a user in
    ``exclude`` is redrawn, so held-out users are combinations the training users never had.
    """
    low, high = families_per_user
    if not 1 <= low <= high <= len(TASTE_FAMILIES):
        raise ValueError(f"need 1 <= families_per_user[0] <= [1] <= {len(TASTE_FAMILIES)}, got {families_per_user}")
    taken = {frozenset(u.weights) for u in exclude}
    names = list(TASTE_FAMILIES)
    users: list[WorldUser] = []
    for i in range(n):
        for _ in range(1000):
            chosen = rng.choice(len(names), size=int(rng.integers(low, high + 1)), replace=False)
            weights = {}
            for j in sorted(chosen):
                keys = TASTE_FAMILIES[names[j]]
                key = keys[int(rng.integers(len(keys)))]
                sign = 1.0 if len(keys) > 1 else float(rng.choice([-1.0, 1.0]))
                weights[key] = round(sign * float(rng.uniform(*magnitude)), 3)
            if frozenset(weights) not in taken:
                break
        else:
            raise ValueError(f"could not draw a user unlike the {len(taken)} excluded ones; exclude fewer")
        users.append(WorldUser(f"{prefix}{i}", weights))
    return users
