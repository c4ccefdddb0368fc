"""The synthetic preference world: renderer, captions, attribute detector and simulated users."""

from diffpref.world.captions import caption_for, caption_vocabulary, parse_caption, sample_caption, sample_prompt
from diffpref.world.detector import (
    FEATURE_KEYS,
    Detection,
    as_image_batch,
    detect,
    detect_batch,
    feature_matrix,
    measure_objects,
)
from diffpref.world.render import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    CATEGORICAL,
    COLOR_HUES,
    COLORS,
    CONTINUOUS,
    IMAGE_SIZE,
    SHAPES,
    WorldAttributes,
    max_offset,
    object_center,
    object_radius,
    object_rgb,
    render,
    render_batch,
    sample_attributes,
)
from diffpref.world.users import (
    EXAMPLE_USERS,
    WorldUser,
    bradley_terry_choice,
    bradley_terry_probability,
    load_users,
    oracle_reward,
    random_users,
    save_users,
)

__all__ = [
    "BACKGROUNDS", "BACKGROUND_RGB", "CATEGORICAL", "COLORS", "COLOR_HUES", "CONTINUOUS", "IMAGE_SIZE", "SHAPES",
    "WorldAttributes", "max_offset", "object_center", "object_radius", "object_rgb", "render", "render_batch",
    "sample_attributes",
    "caption_for", "caption_vocabulary", "parse_caption", "sample_caption", "sample_prompt",
    "FEATURE_KEYS", "Detection", "as_image_batch", "detect", "detect_batch", "feature_matrix", "measure_objects",
    "EXAMPLE_USERS", "WorldUser", "bradley_terry_choice", "bradley_terry_probability", "load_users",
    "oracle_reward", "random_users", "save_users",
]
