"""A warm pool of base-model candidate images that fits anyone: pairs in milliseconds, not seconds.

A pair's candidates are base-model images (no user tokens), so they do not depend on who will
rate them: one batched pipeline call makes candidates for everyone, while the app is idle, and
a person's next pair is then only a choice among pooled candidates (BALD on their posterior, see
``pairs.py``) and a database write. Batching is what pays: on 2 CPU cores a batch of 16 images
costs about as much as 4 single ones.

The pool holds ``groups`` of ``candidates`` images, each group one prompt (both images of a pair
come from one prompt). Each person sees an image at most once: ``take`` marks the two shown images
as used *for that person*; other people still get them. A group stays useful to a person while it
has two images they have not seen, so one group of 4 gives each person two pairs.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CandidateGroup:
    """``candidates`` base images of one prompt, with their seeds and (optionally) image features."""

    group_id: int
    prompt: str
    seeds: list[int]
    images: list[np.ndarray]
    features: np.ndarray | None = None  # (candidates, d); None without an image backbone
    used_by: dict[str, set[int]] = field(default_factory=dict)  # person -> indices they have seen

    def unused(self, user_id: str) -> list[int]:
        seen = self.used_by.get(user_id, ())
        return [k for k in range(len(self.images)) if k not in seen]


class CandidatePool:
    """Thread-safe pool of ``CandidateGroup``; the oldest groups leave once ``max_groups`` is exceeded."""

    def __init__(self, max_groups: int):
        if max_groups < 1:
            raise ValueError(f"max_groups={max_groups} must be >= 1")
        self.max_groups = max_groups
        self._groups: list[CandidateGroup] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._groups)

    def add(self, prompt: str, seeds: list[int], images: list[np.ndarray], features: np.ndarray | None) -> None:
        with self._lock:
            self._groups.append(CandidateGroup(next(self._ids), prompt, list(seeds), list(images), features))
            del self._groups[:-self.max_groups]

    def available(self, user_id: str) -> int:
        """How many groups can still give this person a pair (two images they have not seen)."""
        with self._lock:
            return sum(len(g.unused(user_id)) >= 2 for g in self._groups)

    def candidates(self, user_id: str, groups: int, rng: np.random.Generator) -> list[tuple[CandidateGroup, list[int]]]:
        """Up to ``groups`` groups (random among the newest useful ones) with the indices this person has not seen."""
        with self._lock:
            useful = [(g, g.unused(user_id)) for g in self._groups]
            useful = [(g, idx) for g, idx in useful if len(idx) >= 2]
        if len(useful) <= groups:
            return useful
        # Newest first, among twice as many as needed: fresh prompts, yet not always the same two.
        window = useful[-2 * groups:]
        return [window[int(k)] for k in sorted(rng.choice(len(window), size=groups, replace=False))]

    def take(self, user_id: str, group: CandidateGroup, indices: tuple[int, int]) -> None:
        with self._lock:
            group.used_by.setdefault(user_id, set()).update(indices)
