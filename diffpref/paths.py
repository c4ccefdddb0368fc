"""Where the shipped (embedded) models live inside the installed package."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_NAMES = ("embedded", "embedded-world", "world")


def embedded_model_path() -> Path:
    """The embedded StableDiffusionPipeline folder (diffusers format)."""
    return ASSETS / "world-sd"


def embedded_clip_path() -> Path:
    """The embedded tiny open_clip folder (open_clip ``local-dir`` format)."""
    return ASSETS / "world-clip"


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}. It ships with the repository; rebuild it with "
            "`python train/pretrain_world.py --config configs/pretrain_world.yaml`."
        )
    return path
