"""The synthetic preference world, the oracle only: what is true about an image and what a user wants.

- ``render``            images from known attributes (shape, colour, background, size, brightness, position).
- ``captions``          world captions: write, sample and parse them.
- ``detector``          the exact attribute detector (``shape_classifier``: its small shape CNN).
- ``users``             simulated users: oracle rewards over detected features, Bradley-Terry choices.
- ``ceiling``           the best win rate attainable against a base model, per user.
- ``metrics``           pure arithmetic: prompt adherence of images, win rate of paired rewards.

It imports nothing else of diffpref (``tests/test_imports.py``). The drivers that run models
against it (make data, evaluate, report, pretrain, simulate) are in ``diffpref.experiments``.
"""

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
