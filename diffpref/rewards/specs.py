"""``--rewards name=PATH,...``: which reward models to load, from which local files.

    hpsv2=CHECKPOINT[@ARCH]           HPS_v2_compressed.pt; ARCH defaults to ViT-H-14
    clip=CHECKPOINT[@ARCH]            open_clip weights; ARCH defaults to ViT-H-14 (laion2b_s32b_b79k)
    aesthetic=HEAD@BACKBONE[@ARCH]    the MLP head + OpenAI's ViT-L-14 (ARCH defaults to ViT-L-14-quickgelu)
    pickscore=MODEL_DIR[@PROCESSOR_DIR]

ARCH is an open_clip model name or a ``.json`` model config (open_clip's model_configs format). An
open_clip checkpoint may also be a ``local-dir`` folder (``open_clip_config.json`` + weights), which
names its own architecture. Every file is checked before anything is generated, and a missing one
is reported with the reward it belongs to and where to get it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffpref.rewards.base import RewardModel

REWARD_NAMES = ("hpsv2", "aesthetic", "pickscore", "clip")
# OpenAI trained ViT-L/14 with QuickGELU, and the aesthetic head was fit on its embeddings; open_clip's
# plain ViT-L-14 config would run those weights with GELU.
DEFAULT_ARCH = {"hpsv2": "ViT-H-14", "clip": "ViT-H-14", "aesthetic": "ViT-L-14-quickgelu"}
FORMAT = {
    "hpsv2": "hpsv2=CHECKPOINT[@ARCH]",
    "clip": "clip=CHECKPOINT[@ARCH]",
    "aesthetic": "aesthetic=HEAD@BACKBONE[@ARCH]",
    "pickscore": "pickscore=MODEL_DIR[@PROCESSOR_DIR]",
}
WHERE = {
    ("hpsv2", "path"): "HPS_v2_compressed.pt from the xswu/HPSv2 release (https://huggingface.co/xswu/HPSv2, "
                       "file HPS_v2_compressed.pt)",
    ("clip", "path"): "the open_clip ViT-H-14 laion2b_s32b_b79k weights (open_clip_pytorch_model.bin of "
                      "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    ("aesthetic", "path"): "sac+logos+ava1-l14-linearMSE.pth from "
                           "https://github.com/christophschuhmann/improved-aesthetic-predictor",
    ("aesthetic", "extra"): "OpenAI's CLIP ViT-L/14 in open_clip format (open_clip_pytorch_model.bin of "
                            "https://huggingface.co/timm/vit_large_patch14_clip_224.openai)",
    ("pickscore", "path"): "the yuvalkirstain/PickScore_v1 model folder "
                           "(huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir DIR)",
    ("pickscore", "extra"): "the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (huggingface-cli download "
                            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*.json' '*.txt' --local-dir DIR)",
}


@dataclass(frozen=True)
class RewardSpec:
    """One reward model: its name, its main file, an extra file (aesthetic backbone, PickScore processor), its arch."""

    name: str
    path: Path
    extra: Path | None = None
    arch: str | None = None

    def __str__(self) -> str:
        text = f"{self.name}={self.path}"
        text += f"@{self.extra}" if self.extra else ""
        return text + (f"@{self.arch}" if self.arch and self.arch != DEFAULT_ARCH.get(self.name) else "")


def parse_reward(item: str) -> RewardSpec:
    """'hpsv2=/w/HPS_v2_compressed.pt' -> RewardSpec('hpsv2', Path(...), arch='ViT-H-14')."""
    name, sep, value = item.strip().partition("=")
    name = name.strip().lower()
    if not sep or not value:
        raise ValueError(f"--rewards entry {item!r} is not name=PATH (e.g. hpsv2=/weights/HPS_v2_compressed.pt)")
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; valid rewards are {list(REWARD_NAMES)}")
    parts = value.split("@")
    if any(not p for p in parts):
        raise ValueError(f"--rewards entry {item!r} has an empty part; the form is {FORMAT[name]}")
    if name in ("hpsv2", "clip"):
        if len(parts) > 2:
            raise ValueError(f"--rewards entry {item!r}: the form is {FORMAT[name]}")
        return RewardSpec(name, Path(parts[0]), arch=parts[1] if len(parts) > 1 else DEFAULT_ARCH[name])
    if name == "aesthetic":
        if len(parts) not in (2, 3):
            raise ValueError(f"--rewards entry {item!r}: the aesthetic predictor needs its MLP head and its CLIP "
                             f"backbone, {FORMAT[name]}; the head is {WHERE['aesthetic', 'path']}, the backbone "
                             f"{WHERE['aesthetic', 'extra']}")
        return RewardSpec(name, Path(parts[0]), Path(parts[1]), parts[2] if len(parts) > 2 else DEFAULT_ARCH[name])
    if len(parts) > 2:
        raise ValueError(f"--rewards entry {item!r}: the form is {FORMAT[name]}")
    return RewardSpec(name, Path(parts[0]), Path(parts[1]) if len(parts) > 1 else None)


def parse_rewards(spec: str) -> list[RewardSpec]:
    """'hpsv2=A,clip=B@ViT-B-32' -> one RewardSpec per reward, each reward at most once."""
    specs = [parse_reward(item) for item in spec.split(",") if item.strip()]
    if not specs:
        raise ValueError(f"--rewards names no reward; give e.g. hpsv2=PATH,clip=PATH (valid: {list(REWARD_NAMES)})")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--rewards names {duplicates} more than once")
    return specs


def _missing(spec: RewardSpec, role: str, path: Path, what: str, hint: str = "") -> FileNotFoundError:
    return FileNotFoundError(f"reward {spec.name!r}: {what} {path} does not exist{hint}. "
                             f"Get {WHERE[spec.name, role]}, then pass {FORMAT[spec.name]}")


def _check_open_clip_weights(spec: RewardSpec, role: str, path: Path, what: str) -> None:
    if not path.exists():
        raise _missing(spec, role, path, what)
    if path.is_dir():
        from diffpref.rewards.openclip_rewards import CHECKPOINT_SUFFIXES

        if spec.arch != DEFAULT_ARCH[spec.name]:
            raise ValueError(f"reward {spec.name!r}: {path} is an open_clip folder, which names its own architecture; "
                             f"drop @{spec.arch}")

        if not (path / "open_clip_config.json").is_file():
            raise _missing(spec, role, path / "open_clip_config.json", f"{what} folder's config")
        if not [p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES]:
            raise _missing(spec, role, path / "open_clip_model.safetensors", f"{what} folder's weights")
    elif spec.arch and spec.arch.endswith(".json") and not Path(spec.arch).is_file():
        raise FileNotFoundError(f"reward {spec.name!r}: open_clip model config {spec.arch} does not exist")


def check_reward_files(spec: RewardSpec) -> None:
    """Raise FileNotFoundError naming the reward, the missing path and where to get it; cheap (no loading)."""
    if spec.name in ("hpsv2", "clip"):
        _check_open_clip_weights(spec, "path", spec.path, "checkpoint")
    elif spec.name == "aesthetic":
        if not spec.path.is_file():
            raise _missing(spec, "path", spec.path, "MLP head")
        _check_open_clip_weights(spec, "extra", spec.extra, "backbone")
    else:
        if not (spec.path / "config.json").is_file():
            raise _missing(spec, "path", spec.path / "config.json" if spec.path.is_dir() else spec.path, "model")
        processor = spec.extra or spec.path
        # preprocessor_config.json on the hub; transformers 5 saves processor_config.json.
        if not any((processor / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
            hint = "" if spec.extra else f" ({spec.path} holds no processor: add @PROCESSOR_DIR)"
            raise _missing(spec, "extra", processor / "preprocessor_config.json", "processor", hint)


def load_reward(spec: RewardSpec, device: str | torch.device = "cpu") -> RewardModel:
    """The reward model of ``spec``, loaded from its local files only."""
    check_reward_files(spec)
    if spec.name == "pickscore":
        from diffpref.rewards.pickscore import PickScoreReward

        return PickScoreReward.from_files(spec.path, spec.extra, device=device)
    from diffpref.rewards.openclip_rewards import AestheticReward, ClipScoreReward, HPSv2Reward

    if spec.name == "aesthetic":
        return AestheticReward.from_files(spec.extra, spec.arch, device=device, head=spec.path)
    cls = HPSv2Reward if spec.name == "hpsv2" else ClipScoreReward
    return cls.from_files(spec.path, spec.arch, device=device)

