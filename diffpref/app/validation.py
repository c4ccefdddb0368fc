"""The rating store's input checks: every id, text, image and seed a caller hands ``RatingStore``.

Limits are generous for real use and tight enough that one request cannot bloat the database.
Each check returns the value to store (stripped text, PNG bytes) or raises ``ValueError`` naming it.
"""

from __future__ import annotations

import io
import re
from typing import Any

from PIL import Image

from diffpref.data.images import DEFAULT_MAX_PIXELS
from diffpref.data.ratings_db import CHOICES

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MAX_DISPLAY_NAME_CHARS = 80
MAX_PROMPT_CHARS = 500
MAX_MODEL_CHARS = 200
MAX_PASSWORD_HASH_CHARS = 512
MAX_PNG_BYTES = 16 * 1024 * 1024
MAX_PNG_PIXELS = DEFAULT_MAX_PIXELS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Image and pair ids are uuid4 hex strings minted by the store.
ID_PATTERN = re.compile(r"[0-9a-f]{32}")
INT64_RANGE = (-(2**63), 2**63 - 1)


def check_user_id(user_id: Any) -> str:
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id):
        raise ValueError(
            f"invalid user id {user_id!r}: use 1-64 characters from letters, digits and _ . @ -, "
            "starting with a letter or digit"
        )
    return user_id


def check_text(value: Any, what: str, max_chars: int, allow_newlines: bool = False) -> str:
    """``value`` stripped, checked to be non-empty, at most ``max_chars`` long and free of control characters."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    if len(text) > max_chars:
        raise ValueError(f"{what} is {len(text)} characters long; the limit is {max_chars}")
    allowed = "\n\t" if allow_newlines else ""
    bad = [c for c in text if not c.isprintable() and c not in allowed]
    if bad:
        raise ValueError(f"{what} contains control character(s) {sorted(set(bad))!r}")
    return text


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"malformed {what} {value!r}: expected the 32-character hex id the store returned")
    return value


def check_png(data: Any) -> bytes:
    """``data`` as bytes, checked to be a PNG within the size limits (from its header; pixels are not decoded)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"png_bytes must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_PNG_BYTES:
        raise ValueError(f"image is {len(data)} bytes; the limit is {MAX_PNG_BYTES}")
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("image is not a PNG (encode it with PIL: image.save(buffer, format='PNG'))")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:  # PIL reports corrupt headers through many exception types
        raise ValueError(f"image is not a readable PNG: {exc}") from exc
    if width * height > MAX_PNG_PIXELS or width == 0 or height == 0:
        raise ValueError(f"image is {width}x{height}; at most {MAX_PNG_PIXELS} pixels are allowed")
    return data


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not INT64_RANGE[0] <= seed <= INT64_RANGE[1]:
        raise ValueError(f"seed must be a 64-bit integer, got {seed!r}")
    return seed


def check_choice(choice: Any) -> str:
    if choice not in CHOICES:
        raise ValueError(f"unknown choice {choice!r}; valid choices are {', '.join(CHOICES)}")
    return choice
