"""Procedural images of the synthetic preference world.

Every image shows one flat-coloured object on a plain background. Three attributes are
categorical (shape, colour, background) and three continuous in [0, 1] (size, brightness,
centered). Captions name only some of the categorical ones, so the model has free choices
left over, and those free choices are what a simulated user's taste acts on.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("white", "black", "gray", "beige")
CONTINUOUS = ("size", "brightness", "centered")
CATEGORICAL = {"shape": SHAPES, "color": COLORS, "background": BACKGROUNDS}

# Hue (degrees) of each object colour; brightness moves the HSV value between these bounds.
COLOR_HUES = {"red": 0.0, "orange": 30.0, "yellow": 58.0, "green": 125.0, "blue": 225.0, "purple": 285.0}
VALUE_MIN, VALUE_MAX = 0.5, 1.0
BACKGROUND_RGB = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 205, 165),
}
# Object "radius" in pixels: size 0 -> RADIUS_MIN, size 1 -> RADIUS_MAX.
RADIUS_MIN, RADIUS_MAX = 7.0, 21.0
# Centre offset is bounded so the object stays inside the frame with this margin.
EDGE_MARGIN = 3.0
SUPERSAMPLE = 4


@dataclass(frozen=True)
class WorldAttributes:
    shape: str
    color: str
    background: str
    size: float
    brightness: float
    centered: float
    angle: float = 0.0  # direction of the off-centre shift, radians; not a preference attribute

    def __post_init__(self):
        for name, values in CATEGORICAL.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {values}")
        for name in CONTINUOUS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def object_radius(size: float) -> float:
    return RADIUS_MIN + size * (RADIUS_MAX - RADIUS_MIN)


def max_offset(radius: float) -> float:
    """Largest centre offset that keeps an object of this radius inside the frame."""
    return max(0.0, IMAGE_SIZE / 2 - EDGE_MARGIN - 1.1 * radius)


def object_rgb(color: str, brightness: float) -> tuple[int, int, int]:
    value = VALUE_MIN + brightness * (VALUE_MAX - VALUE_MIN)
    r, g, b = colorsys.hsv_to_rgb(COLOR_HUES[color] / 360.0, 1.0, value)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of the polygonal shapes; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.88 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, centroid at (cx, cy).
        R = 1.1 * r
        return [(cx + R * math.sin(a), cy - R * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        outer, inner = 1.1 * r, 0.45 * r
        points = []
        for i in range(10):
            radius = outer if i % 2 == 0 else inner
            a = i * math.pi / 5
            points.append((cx + radius * math.sin(a), cy - radius * math.cos(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_center(attrs: WorldAttributes) -> tuple[float, float]:
    radius = object_radius(attrs.size)
    offset = (1.0 - attrs.centered) * max_offset(radius)
    c = IMAGE_SIZE / 2
    return c + offset * math.cos(attrs.angle), c + offset * math.sin(attrs.angle)


def render(attrs: WorldAttributes) -> Image.Image:
    """Render one 64x64 RGB image (anti-aliased by supersampling)."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND_RGB[attrs.background])
    draw = ImageDraw.Draw(canvas)
    cx, cy = object_center(attrs)
    r = object_radius(attrs.size)
    fill = object_rgb(attrs.color, attrs.brightness)
    polygon = shape_polygon(attrs.shape, cx * s, cy * s, r * s)
    if polygon is None:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def sample_attributes(rng: np.random.Generator, **fixed) -> WorldAttributes:
    """Draw every attribute uniformly at random, except those given in ``fixed``."""
    values = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": COLORS[rng.integers(len(COLORS))],
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "size": float(rng.random()),
        "brightness": float(rng.random()),
        "centered": float(rng.random()),
        "angle": float(rng.random() * 2 * math.pi),
    }
    unknown = set(fixed) - set(values)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; expected some of {sorted(values)}")
    values.update({k: v for k, v in fixed.items() if v is not None})
    return WorldAttributes(**values)


def render_batch(attrs: list[WorldAttributes]) -> np.ndarray:
    """Render a list of attributes to a uint8 array of shape (N, 64, 64, 3)."""
    return np.stack([np.asarray(render(a)) for a in attrs])
