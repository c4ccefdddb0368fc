"""Captions of the synthetic world: any subset of shape, colour and background is named."""

from __future__ import annotations

import numpy as np

from diffpref.world.render import BACKGROUNDS, COLORS, SHAPES, WorldAttributes


def caption_for(shape: str | None = None, color: str | None = None, background: str | None = None) -> str:
    """"a red star on a black background"; unnamed parts are left out ("a shape")."""
    noun = shape if shape is not None else "shape"
    words = [color, noun] if color is not None else [noun]
    article = "an" if words[0][0] in "aeiou" else "a"
    text = f"{article} {' '.join(words)}"
    if background is not None:
        text += f" on a {background} background"
    return text


def parse_caption(caption: str) -> dict[str, str]:
    """Which categorical attributes a world caption names: {"shape": ..., "color": ..., "background": ...}."""
    words = caption.lower().replace(",", " ").split()
    named: dict[str, str] = {}
    for i, word in enumerate(words):
        if word in SHAPES:
            named["shape"] = word
        elif word in COLORS:
            # "on a black background" names the background, not the object's colour.
            if i + 1 < len(words) and words[i + 1] == "background":
                continue
            named["color"] = word
    for i, word in enumerate(words[:-1]):
        if word in BACKGROUNDS and words[i + 1] == "background":
            named["background"] = word
    return named


def sample_caption(rng: np.random.Generator, attrs: WorldAttributes, p_name: float = 0.6) -> str:
    """A caption that names each categorical attribute of ``attrs`` with probability p_name."""
    return caption_for(
        shape=attrs.shape if rng.random() < p_name else None,
        color=attrs.color if rng.random() < p_name else None,
        background=attrs.background if rng.random() < p_name else None,
    )


def sample_prompt(rng: np.random.Generator, p_name: float = 0.5) -> str:
    """A random world caption (no image behind it), for generation and evaluation."""
    return caption_for(
        shape=SHAPES[rng.integers(len(SHAPES))] if rng.random() < p_name else None,
        color=COLORS[rng.integers(len(COLORS))] if rng.random() < p_name else None,
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))] if rng.random() < p_name else None,
    )


def caption_vocabulary() -> list[str]:
    """Every word a world caption can contain."""
    return sorted({"a", "an", "shape", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS})
