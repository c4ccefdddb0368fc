"""What a person's embedding favours, read off by probing: personalized minus base images.

Both probes compare images of the same prompts and seeds, with and without the person's
tokens, so whatever differs is the personalization's doing:

- ``world_profile`` (the embedded world model): the mean difference of detected attributes
  (``feature_matrix(detect_batch(...))``, one column per ``FEATURE_KEYS`` entry). "+0.40
  color:red" means 40% more of the personalized images are red.
- ``clip_profile`` (real models): the mean difference of CLIP similarity to short text probes
  ("dark", "colorful", "minimal", ...), scored with the adapter's backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffpref.world.detector import FEATURE_KEYS, detect_batch, feature_matrix

WORLD_PROBE_PROMPTS = ("a shape",)
CLIP_PROBE_PROMPTS = ("a picture", "a portrait of a person", "a landscape", "a still life", "a city street")
CLIP_PROBES = ("dark", "bright", "colorful", "muted colors", "minimal", "detailed", "warm tones", "cool tones",
               "high contrast", "soft light", "photograph", "painting", "cartoon", "close-up", "wide shot")


def _ranked(names: Sequence[str], values: np.ndarray, top: int | None) -> list[dict]:
    order = np.argsort(-np.abs(values), kind="stable")
    rows = [{"attribute": names[i], "weight": round(float(values[i]), 4)} for i in order]
    return rows[:top] if top else rows


def _world_size(images) -> np.ndarray:
    """The detector reads 64x64 images; other models' images are resized (bilinear) to that."""
    from PIL import Image

    from diffpref.world.render import IMAGE_SIZE

    images = np.asarray(images)
    if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in images])


def world_profile(base_images: np.ndarray, personalized_images: np.ndarray, top: int | None = None) -> dict:
    """Attribute shifts (personalized - base) detected on uint8 images (N, 64, 64, 3) of the same prompts/seeds."""
    if len(base_images) != len(personalized_images) or len(base_images) == 0:
        raise ValueError(f"need equally many base and personalized images (> 0), got "
                         f"{len(base_images)} and {len(personalized_images)}")
    base_det, pers_det = detect_batch(_world_size(base_images)), detect_batch(_world_size(personalized_images))
    diff = feature_matrix(pers_det).mean(0) - feature_matrix(base_det).mean(0)
    return {
        "method": "world-attributes",
        "probes": len(base_images),
        "attributes": _ranked(FEATURE_KEYS, diff, top),
        "objects_found": {"base": float(np.mean([d.found for d in base_det])),
                          "personalized": float(np.mean([d.found for d in pers_det]))},
    }


def clip_profile(backbone, base_images: Sequence, personalized_images: Sequence, probes: Sequence[str] = CLIP_PROBES,
                 top: int | None = None) -> dict:
    """Text-probe shifts: mean cos(personalized, probe) - mean cos(base, probe), with ``backbone.embed_texts``."""
    if len(base_images) != len(personalized_images) or len(base_images) == 0:
        raise ValueError(f"need equally many base and personalized images (> 0), got "
                         f"{len(base_images)} and {len(personalized_images)}")
    text = backbone.embed_texts(list(probes)).cpu().numpy()
    base = backbone.embed_images(list(base_images)).cpu().numpy()
    pers = backbone.embed_images(list(personalized_images)).cpu().numpy()
    diff = (pers @ text.T).mean(0) - (base @ text.T).mean(0)
    return {"method": "clip-text-probes", "probes": len(base_images), "attributes": _ranked(list(probes), diff, top)}
