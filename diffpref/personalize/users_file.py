"""Users for personalized generation, as people write them down.

A users file is a JSON list; each user is given by examples of their choices or by a saved embedding
(paths relative to the file)::

    [{"user_id": "alice", "examples": [{"prompt": "a star", "image_0": "a/1.png", "image_1": "a/2.png", "label": 1}]},
     {"user_id": "bob", "embedding": "bob.safetensors"}]

``label`` is 1 when image_0 was preferred and 0 when image_1 was (ties carry no preference and are
refused). ``--mix alice:0.7,bob:0.3`` interpolates between users' embeddings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from diffpref.data.images import decode_image
from diffpref.personalize.backbones import UserExample
from diffpref.personalize.encoder import load_user_embedding, mix_embeddings

_USER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _examples(entries: list, base: Path, where: str) -> list[UserExample]:
    out = []
    for j, entry in enumerate(entries):
        here = f"{where}, example {j}"
        missing = {"prompt", "image_0", "image_1", "label"} - set(entry)
        if missing:
            raise ValueError(f"{here}: missing {sorted(missing)}; each example needs prompt, image_0, image_1, label")
        label = float(entry["label"])
        if label not in (0.0, 1.0):
            raise ValueError(f"{here}: label must be 1 (image_0 preferred) or 0 (image_1 preferred), got {entry['label']}")
        images = []
        for key in ("image_0", "image_1"):
            path = Path(entry[key]) if Path(entry[key]).is_absolute() else base / entry[key]
            if not path.exists():
                raise FileNotFoundError(f"{here}: {key} file {path} does not exist")
            images.append(decode_image(path))
        preferred, rejected = images if label == 1.0 else images[::-1]
        out.append(UserExample(entry["prompt"], preferred, rejected))
    return out


def load_generation_users(path: str | Path, pipe) -> dict[str, torch.Tensor]:
    """{user_id: user tokens [K, d]} for every user in the file (examples are embedded with ``pipe``)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read users file {path}: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of users")
    users: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(entries):
        where = f"{path}, user {i}"
        user_id = str(entry.get("user_id", ""))
        if not _USER_ID.match(user_id):
            raise ValueError(f"{where}: user_id {user_id!r} must be 1-64 letters, digits, '_', '.', '-'")
        if user_id in users:
            raise ValueError(f"{where}: duplicate user_id {user_id!r}")
        if ("examples" in entry) == ("embedding" in entry):
            raise ValueError(f"{where}: give exactly one of 'examples' or 'embedding'")
        if "embedding" in entry:
            emb = Path(entry["embedding"]) if Path(entry["embedding"]).is_absolute() else path.parent / entry["embedding"]
            tokens, _ = load_user_embedding(emb)
        else:
            tokens = pipe.embed_user(_examples(entry["examples"], path.parent, where))
        users[user_id] = tokens.float().cpu()
    return users


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """'alice:0.7,bob:0.3' -> [('alice', 0.7), ('bob', 0.3)]."""
    parts = []
    for item in spec.split(","):
        name, sep, weight = item.strip().rpartition(":")
        if not sep or not name:
            raise ValueError(f"--mix entry {item!r} is not of the form user:weight (e.g. alice:0.7,bob:0.3)")
        try:
            parts.append((name, float(weight)))
        except ValueError as exc:
            raise ValueError(f"--mix entry {item!r}: weight {weight!r} is not a number") from exc
    return parts


def apply_mix(users: dict[str, torch.Tensor], spec: str) -> tuple[str, torch.Tensor]:
    parts = parse_mix(spec)
    unknown = [name for name, _ in parts if name not in users]
    if unknown:
        raise ValueError(f"--mix names unknown users {unknown}; the users file has {sorted(users)}")
    name = "mix_" + "_".join(f"{n}{w:g}" for n, w in parts)
    return name, mix_embeddings({n: (users[n], w) for n, w in parts})
