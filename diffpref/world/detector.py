"""Measure the world attributes back from pixels, for any 64x64 RGB image.

The detector is the oracle's eyes: simulated users score images through it, so it must work
on generated images as well as on clean renders. It assumes one object on a plain background:

* background: the median border colour, snapped to the nearest ``BACKGROUND_RGB``;
* object coverage ``alpha``: each pixel's colour projected on the background -> object colour
  line (renders are anti-aliased by box filtering, so edge pixels are linear mixtures and
  ``alpha`` is their exact fractional coverage);
* colour / brightness: circular mean hue and median HSV value of the object's core pixels;
* shape: a tiny CNN on the cropped coverage map (``shape_classifier``);
* size: the object's area inverted through a calibrated per-shape area law;
* centered: the coverage centroid's distance from the image centre over ``max_offset``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from diffpref.world.render import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOR_HUES,
    COLORS,
    CONTINUOUS,
    IMAGE_SIZE,
    RADIUS_MAX,
    RADIUS_MIN,
    SHAPES,
    VALUE_MAX,
    VALUE_MIN,
    max_offset,
)

FEATURE_KEYS: tuple[str, ...] = (
    *(f"shape:{s}" for s in SHAPES),
    *(f"color:{c}" for c in COLORS),
    *(f"background:{b}" for b in BACKGROUNDS),
    *CONTINUOUS,
)

# A pixel is a candidate object pixel when it is this far (RGB Euclidean) from the background.
# The closest object/background pair in the world (dark green on black) is ~114 apart, so 40
# keeps most edge pixels out of the candidates yet ignores mild noise.
CANDIDATE_DISTANCE = 40.0
# Fewer candidate pixels than this means "no object" (the smallest star covers ~70 pixels).
MIN_OBJECT_PIXELS = 6
# Core pixels (used for colour) are at least this fraction of the 90th-percentile distance.
CORE_FRACTION = 0.8
# Coverage below this is treated as background noise rather than a faint edge.
ALPHA_FLOOR = 0.08
CHUNK = 512

# Area law per shape, area = k * r^2 + b * r (r = render.object_radius), least-squares fitted
# on renders through this module's own alpha (see ``calibrate_geometry``). The linear term
# absorbs the rasterizer's boundary inflation, which a pure k * r^2 law would miss by ~3%.
AREA_LAW: dict[str, tuple[float, float]] = {
    "circle": (3.1478, 0.6024),
    "square": (3.0986, 0.8776),
    "triangle": (1.5711, 0.6231),
    "star": (1.4548, 0.5423),
}
# Mean coverage centroid of a perfectly centred object, in continuous pixel coordinates (x, y)
# (same calibration). Equal to the nominal (32, 32) up to rasterization jitter of ~0.04 px.
CENTER_XY: dict[str, tuple[float, float]] = {
    "circle": (32.0, 32.0),
    "square": (32.0, 32.0),
    "triangle": (32.042, 32.013),
    "star": (31.999, 32.011),
}

_BG_ARRAY = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=np.float32)
_HUE_ARRAY = np.array([COLOR_HUES[c] for c in COLORS], dtype=np.float64)


@dataclass(frozen=True)
class Detection:
    """Attributes measured from one image. ``found=False``: no object; shape/colour are None."""

    shape: str | None
    color: str | None
    background: str | None
    size: float
    brightness: float
    centered: float
    found: bool = True

    def features(self) -> dict[str, float]:
        """One-hot categoricals plus the continuous values, keyed as in ``FEATURE_KEYS``."""
        feats = dict.fromkeys(FEATURE_KEYS, 0.0)
        for name in ("shape", "color", "background"):
            value = getattr(self, name)
            if value is not None:
                feats[f"{name}:{value}"] = 1.0
        for name in CONTINUOUS:
            feats[name] = float(getattr(self, name))
        return feats

    def feature_vector(self) -> np.ndarray:
        """``features()`` as an array ordered like ``FEATURE_KEYS``."""
        feats = self.features()
        return np.array([feats[k] for k in FEATURE_KEYS], dtype=np.float64)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ObjectMeasurements:
    """Shape-agnostic per-image measurements of a batch (arrays with leading dim N)."""

    background: np.ndarray  # (N,) index into BACKGROUNDS
    background_rgb: np.ndarray  # (N, 3) measured border median
    object_rgb: np.ndarray  # (N, 3) median colour of the core pixels (0 if not found)
    hue: np.ndarray  # (N,) degrees, circular mean over core pixels
    value: np.ndarray  # (N,) HSV value in [0, 1], median over core pixels
    alpha: np.ndarray  # (N, H, W) fractional object coverage
    area: np.ndarray  # (N,) sum of alpha, in pixels
    centroid: np.ndarray  # (N, 2) coverage centroid (x, y), continuous pixel coordinates
    found: np.ndarray  # (N,) bool


def as_image_batch(images) -> np.ndarray:
    """Normalise PIL images / HxWx3 / NxHxWx3 arrays (or lists of them) to uint8 (N, 64, 64, 3).

    Float arrays with values in [0, 1] are scaled to [0, 255].
    """
    if isinstance(images, Image.Image):
        arr = np.asarray(images.convert("RGB"))[None]
    elif isinstance(images, np.ndarray):
        arr = images[None] if images.ndim == 3 else images
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        return np.concatenate([as_image_batch(im) for im in images])
    else:
        raise TypeError(f"expected a PIL image or a numpy array, got {type(images).__name__}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected HxWx3 or NxHxWx3 RGB images, got shape {arr.shape}")
    if arr.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected {IMAGE_SIZE}x{IMAGE_SIZE} images, got {arr.shape[1]}x{arr.shape[2]}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    return arr


def _rgb_to_hue_sat_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised RGB (0..255, last axis) -> hue in degrees, saturation and value in [0, 1]."""
    rgb = rgb / np.float32(255.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(delta > 0, hue * np.float32(60.0), np.float32(0.0))
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return hue, sat, mx


def _measure_chunk(x: np.ndarray) -> ObjectMeasurements:
    n, h, w, _ = x.shape
    x = x.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    bg_rgb = np.median(border, axis=1)  # (n, 3)
    bg_idx = np.argmin(((bg_rgb[:, None] - _BG_ARRAY[None]) ** 2).sum(-1), axis=1)

    diff = x - bg_rgb[:, None, None]
    dist = np.sqrt((diff**2).sum(-1))  # (n, h, w)
    cand = dist > CANDIDATE_DISTANCE
    found = cand.reshape(n, -1).sum(1) >= MIN_OBJECT_PIXELS

    with warnings.catch_warnings():  # all-NaN rows (no object) are expected and handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        cand_dist = np.where(cand, dist, np.nan).reshape(n, -1)
        ref = np.nanpercentile(cand_dist, 90, axis=1)
        core = cand & (dist >= CORE_FRACTION * np.nan_to_num(ref)[:, None, None])
        core_rgb = np.where(core[..., None], x, np.nan).reshape(n, -1, 3)
        obj_rgb = np.nan_to_num(np.nanmedian(core_rgb, axis=1))
        hue, sat, val = _rgb_to_hue_sat_value(x)  # float32: half the time of float64
        value = np.nan_to_num(np.nanmedian(np.where(core, val, np.nan).reshape(n, -1), axis=1))
    # Circular mean hue, weighted by saturation so greyish (mixed or noisy) pixels count less.
    wts = np.where(core, sat, 0.0)
    rad = np.deg2rad(hue)
    mean_hue = np.rad2deg(np.arctan2((wts * np.sin(rad)).sum((1, 2)), (wts * np.cos(rad)).sum((1, 2)))) % 360.0

    direction = obj_rgb - bg_rgb
    norm2 = (direction**2).sum(-1)
    alpha = (diff * direction[:, None, None]).sum(-1) / np.where(norm2 > 0, norm2, 1.0)[:, None, None]
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha = np.where((alpha >= ALPHA_FLOOR) & found[:, None, None], alpha, 0.0).astype(np.float32)
    area = alpha.sum((1, 2)).astype(np.float64)
    ys = np.arange(h, dtype=np.float64) + 0.5  # pixel i covers [i, i + 1)
    xs = np.arange(w, dtype=np.float64) + 0.5
    safe_area = np.where(area > 0, area, 1.0)
    cx = (alpha.sum(1) * xs).sum(1) / safe_area
    cy = (alpha.sum(2) * ys).sum(1) / safe_area
    found = found & (area > 0)
    return ObjectMeasurements(
        background=bg_idx,
        background_rgb=bg_rgb,
        object_rgb=obj_rgb,
        hue=mean_hue,
        value=value,
        alpha=alpha,
        area=area,
        centroid=np.stack([cx, cy], axis=1),
        found=found,
    )


def measure_objects(images) -> ObjectMeasurements:
    """Shape-agnostic measurements for a batch (chunked to bound memory)."""
    x = as_image_batch(images)
    parts = [_measure_chunk(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)]
    if not parts:
        parts = [_measure_chunk(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))]
    return ObjectMeasurements(
        **{f: np.concatenate([getattr(p, f) for p in parts]) for f in ObjectMeasurements.__dataclass_fields__}
    )


def nearest_color(hue_degrees: float) -> str:
    """The COLORS entry whose hue is circularly closest."""
    d = np.abs((hue_degrees - _HUE_ARRAY + 180.0) % 360.0 - 180.0)
    return COLORS[int(np.argmin(d))]


def radius_from_area(area: float, shape: str) -> float:
    """Invert area = k r^2 + b r for r >= 0."""
    k, b = AREA_LAW[shape]
    return (-b + math.sqrt(b * b + 4.0 * k * max(area, 0.0))) / (2.0 * k)


def _clip01(v: float) -> float:
    return float(min(1.0, max(0.0, v)))


def detect_batch(images) -> list[Detection]:
    """Detect the attributes of every image in a batch (see ``as_image_batch`` for inputs)."""
    from diffpref.world.shape_classifier import classify_shapes

    m = measure_objects(images)
    shapes = np.zeros(len(m.found), dtype=np.int64)
    if m.found.any():
        shapes[m.found] = classify_shapes(m.alpha[m.found])
    out = []
    for i in range(len(m.found)):
        background = BACKGROUNDS[int(m.background[i])]
        if not m.found[i]:
            out.append(Detection(None, None, background, 0.0, 0.0, 0.0, found=False))
            continue
        shape = SHAPES[int(shapes[i])]
        size = _clip01((radius_from_area(m.area[i], shape) - RADIUS_MIN) / (RADIUS_MAX - RADIUS_MIN))
        brightness = _clip01((m.value[i] - VALUE_MIN) / (VALUE_MAX - VALUE_MIN))
        # The render mapped centered through max_offset of the *nominal* radius; use the
        # clipped size so a slightly over-/under-sized estimate cannot blow the ratio up.
        limit = max_offset(RADIUS_MIN + size * (RADIUS_MAX - RADIUS_MIN))
        cx0, cy0 = CENTER_XY[shape]
        d = math.hypot(m.centroid[i, 0] - cx0, m.centroid[i, 1] - cy0)
        centered = 1.0 if limit < 1e-6 else _clip01(1.0 - d / limit)
        out.append(Detection(shape, nearest_color(m.hue[i]), background, size, brightness, centered))
    return out


def detect(images) -> Detection | list[Detection]:
    """One ``Detection`` for a single image (PIL or HxWx3), a list for a batch (NxHxWx3 / list)."""
    single = isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3)
    dets = detect_batch(images)
    return dets[0] if single else dets


def feature_matrix(detections: Sequence[Detection]) -> np.ndarray:
    """(N, len(FEATURE_KEYS)) matrix of detection features."""
    if not detections:
        return np.zeros((0, len(FEATURE_KEYS)))
    return np.stack([d.feature_vector() for d in detections])


def calibrate_geometry(n_per_shape: int = 200, seed: int = 12345) -> tuple[dict, dict]:
    """Re-derive ``AREA_LAW`` and ``CENTER_XY`` from renders, through this module's alpha.

    Returns ``(area_law, center_xy)``; used to produce the constants above, kept so they can
    be re-checked if the renderer changes.
    """
    from dataclasses import replace

    from diffpref.world.render import object_radius, render_batch, sample_attributes

    rng = np.random.default_rng(seed)
    area_law, center_xy = {}, {}
    for shape in SHAPES:
        # Anywhere in the frame for the area law; exactly centred for the reference centre.
        attrs = [sample_attributes(rng, shape=shape) for _ in range(n_per_shape)]
        centred = [replace(a, centered=1.0) for a in attrs]
        m = measure_objects(render_batch(attrs))
        r = np.array([object_radius(a.size) for a in attrs])
        design = np.stack([r**2, r], axis=1)
        (k, b), *_ = np.linalg.lstsq(design, m.area, rcond=None)
        area_law[shape] = (round(float(k), 4), round(float(b), 4))
        center_xy[shape] = tuple(round(float(v), 3) for v in measure_objects(render_batch(centred)).centroid.mean(0))
    return area_law, center_xy
