"""In-memory records for pairwise preferences and single-image ratings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

# Labels this close to 0.5 are ties: float labels read from parquet or JSON may
# carry rounding noise, and a tie must never be mistaken for a (weak) preference.
TIE_TOLERANCE = 1e-6


def is_tie(label: float) -> bool:
    """Whether a label says neither image is preferred."""
    return abs(label - 0.5) <= TIE_TOLERANCE


@dataclass
class PreferencePair:
    """One prompt, two decoded RGB images and how much image_0 is preferred.

    ``label`` is the probability that image_0 is preferred: 1.0 means image_0 wins,
    0.0 means image_1 wins, 0.5 is a tie; anything in [0, 1] is allowed as a soft
    label. ``source_row`` names the file and row the pair came from ("file:row"),
    so problems seen later in training can be traced back to the data.
    """

    prompt: str
    image_0: Image.Image
    image_1: Image.Image
    label: float
    user_id: str = ""
    source_row: str | int = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Catch bad labels when the record is built rather than as a NaN loss later.
        if not isinstance(self.label, (int, float)) or math.isnan(self.label) or not 0.0 <= self.label <= 1.0:
            raise ValueError(f"label must be a number in [0, 1], got {self.label!r} ({self.source_row})")
        self.label = float(self.label)

    @property
    def is_tie(self) -> bool:
        """Whether the label is 0.5, i.e. neither image is preferred."""
        return is_tie(self.label)

    @property
    def preferred(self) -> Image.Image:
        """The winning image: image_0 when label >= 0.5 (ties included), else image_1."""
        return self.image_0 if self.label >= 0.5 else self.image_1

    @property
    def rejected(self) -> Image.Image:
        """The losing image: the one ``preferred`` does not return."""
        return self.image_1 if self.label >= 0.5 else self.image_0


@dataclass
class ImageRating:
    """One prompt and one image that a user liked or disliked (for unpaired objectives such as KTO)."""

    prompt: str
    image: Image.Image
    liked: bool
    user_id: str = ""
    source_row: str | int = ""
    extras: dict[str, Any] = field(default_factory=dict)


def pairs_to_ratings(pairs: Iterable[PreferencePair]) -> list[ImageRating]:
    """One like (the preferred image) and one dislike (the rejected image) per decided pair.

    Ties are left out: they say nothing about which image is liked. A soft label
    counts as a decision for the side it leans to.
    """
    ratings: list[ImageRating] = []
    for pair in pairs:
        if pair.is_tie:
            continue
        for image, liked in ((pair.preferred, True), (pair.rejected, False)):
            ratings.append(
                ImageRating(
                    prompt=pair.prompt,
                    image=image,
                    liked=liked,
                    user_id=pair.user_id,
                    source_row=pair.source_row,
                    extras=dict(pair.extras),
                )
            )
    return ratings
