"""The embedded tiny open_clip model: image and text towers trained contrastively on the world.

It is a stock open_clip ``CLIP`` saved as a ``local-dir:`` folder (``open_clip_config.json`` +
``open_clip_model.safetensors``), so plain open_clip loads it::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + path)
    tokenizer = open_clip.get_tokenizer("local-dir:" + path)

Its captions also describe the continuous attributes ("a small dark red star ..."), so the image
embedding carries size and brightness too; the user encoder needs them to read a person's taste.
It is trained by the pretraining recipe (``diffpref.experiments.pretrain.train_world_clip``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORLD_CLIP_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 96, "head_width": 24, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
}
# World images are already 64 px; plain [0, 1] -> mean/std normalisation.
WORLD_CLIP_PREPROCESS_CFG = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                             "interpolation": "bicubic", "resize_mode": "shortest"}


def describe(attrs: dict, rng: np.random.Generator, p_name: float = 0.85) -> str:
    """A CLIP training caption: categorical attributes (each named with p_name) plus words for the continuous ones."""
    words = []
    if attrs["size"] < 0.33:
        words.append("small")
    elif attrs["size"] > 0.67:
        words.append("large")
    if attrs["brightness"] < 0.33:
        words.append("dark")
    elif attrs["brightness"] > 0.67:
        words.append("bright")
    if rng.random() < p_name:
        words.append(attrs["color"])
    words.append(attrs["shape"] if rng.random() < p_name else "shape")
    text = "a " + " ".join(words)
    if attrs["centered"] > 0.75:
        text += " in the center"
    elif attrs["centered"] < 0.25:
        text += " near the edge"
    if rng.random() < p_name:
        text += f" on a {attrs['background']} background"
    return text


def build_world_clip():
    import open_clip

    return open_clip.CLIP(**{k: v for k, v in WORLD_CLIP_MODEL_CFG.items()})


def images_to_clip_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> normalised float (N, 3, 64, 64), the same as the shipped preprocess."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(WORLD_CLIP_PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(WORLD_CLIP_PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def save_world_clip(model, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": WORLD_CLIP_MODEL_CFG, "preprocess_cfg": WORLD_CLIP_PREPROCESS_CFG}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    # The 49k-row token embedding dominates the size; fp16 halves it and loads back into fp32 fine.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))
    return out_dir


def load_world_clip(path: str | Path | None = None, device: str = "cpu"):
    """(model, preprocess, tokenizer) of the shipped tiny CLIP, or of any open_clip ``local-dir`` folder."""
    import open_clip

    from diffpref.paths import embedded_clip_path

    folder = Path(path) if path is not None else embedded_clip_path()
    name = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    model = model.float().eval()
    return model, preprocess, open_clip.get_tokenizer(name)
