"""Pure oracle metrics: how well images follow world captions, and how two sets of rewards compare.

Prompt adherence is measured with the exact detector: for every caption that names an attribute
(shape, colour, background), does the generated image show it? Preference tuning should move a
model's free choices towards a user's taste without breaking this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffpref.world.captions import caption_for, parse_caption
from diffpref.world.detector import detect_batch
from diffpref.world.render import BACKGROUNDS, COLORS, SHAPES

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "background")


def balanced_captions(n: int) -> list[str]:
    """``n`` full captions cycling through all 4 x 6 x 4 = 96 shape/colour/background combinations.

    The order keeps every prefix balanced, not just whole cycles: any 12 consecutive captions
    name each shape 3x, each colour 2x and each background 3x, so 240 prompts (2.5 cycles)
    still weigh all attributes equally. Index i = 24a + b of a cycle gives shape b % 4,
    colour (b + b // 12) % 6 (the 24 values of b cover all 24 shape/colour pairs) and
    background (a + b) % 4 (each pair meets every background once per cycle).
    """
    captions = []
    for i in range(n):
        a, b = divmod(i % (len(SHAPES) * len(COLORS) * len(BACKGROUNDS)), len(SHAPES) * len(COLORS))
        shape = SHAPES[b % len(SHAPES)]
        color = COLORS[(b + b // 12) % len(COLORS)]
        background = BACKGROUNDS[(a + b) % len(BACKGROUNDS)]
        captions.append(caption_for(shape, color, background))
    return captions


def adherence_of(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy of images against the attributes their captions name.

    Returns ``{"color_acc", "shape_acc", "background_acc", "mean_acc", "n"}``. An attribute's
    accuracy is over the captions that name it (NaN when none does); ``mean_acc`` averages the
    attributes that have one. An image with no detectable object fails shape and colour.
    """
    detections = detect_batch(images) if len(captions) else []
    if len(detections) != len(captions):
        raise ValueError(f"got {len(detections)} images but {len(captions)} captions")
    hits = dict.fromkeys(ATTRIBUTES, 0)
    named = dict.fromkeys(ATTRIBUTES, 0)
    for det, caption in zip(detections, captions):
        for attr, value in parse_caption(caption).items():
            named[attr] += 1
            hits[attr] += getattr(det, attr) == value
    result = {f"{attr}_acc": hits[attr] / named[attr] if named[attr] else math.nan for attr in ATTRIBUTES}
    scored = [v for v in result.values() if not math.isnan(v)]
    result["mean_acc"] = float(np.mean(scored)) if scored else math.nan
    result["n"] = len(captions)
    return result


def win_rate(rewards_a: Sequence[float] | np.ndarray, rewards_b: Sequence[float] | np.ndarray) -> float:
    """Fraction of paired items where a's reward beats b's; exact ties count half."""
    a = np.asarray(rewards_a, dtype=np.float64).ravel()
    b = np.asarray(rewards_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs paired rewards, got {a.size} and {b.size}")
    if a.size == 0:
        raise ValueError("win_rate needs at least one pair of rewards")
    return float(np.mean((a > b) + 0.5 * (a == b)))
