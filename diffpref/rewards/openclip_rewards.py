"""Rewards on open_clip backbones: HPSv2, CLIP score and the LAION aesthetic predictor.

Each reward is built from a local checkpoint file plus an architecture (an open_clip model name such
as ``ViT-H-14``, or a ``.json`` model config), or from an open_clip ``local-dir`` folder
(``open_clip_config.json`` + weights) that names its own architecture. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffpref.rewards.base import RewardModel, cosine, to_pil

# The files open_clip itself looks for in a local-dir folder.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


# ----------------------------------------------------------------------------- scores
def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIPScore (Hessel et al. 2021) with w = 100 (torchmetrics' scale, not 2.5): 100 * max(cos(image, text), 0)."""
    return 100.0 * cosine(image_features, text_features).clamp(min=0)


def hps_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """HPSv2 (Wu et al. 2023): 100 * cos(image, text) of the HPSv2-tuned ViT-H-14 (the hpsv2 package returns the cosine)."""
    return 100.0 * cosine(image_features, text_features)


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP (christophschuhmann/improved-aesthetic-predictor).

    It has no activations (it was trained that way); the dropouts keep its state-dict keys
    (``layers.0.weight`` ... ``layers.7.bias``). ``input_size`` follows the backbone (768 for ViT-L-14).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def aesthetic_score(head: AestheticHead, image_features: torch.Tensor) -> torch.Tensor:
    """LAION aesthetic score (Schuhmann 2022): the MLP head on L2-normalised CLIP image embeddings, about 1-10."""
    return head(F.normalize(image_features.float(), dim=-1)).squeeze(-1)


# ----------------------------------------------------------------------------- loading
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (``{"state_dict": ...}`` and DDP's ``module.`` are unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary code
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resolve_arch(arch: str) -> str:
    """An open_clip model name; a ``.json`` model config is registered under its file stem first."""
    import open_clip

    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {path} does not exist")
        config = json.loads(path.read_text())
        if "model_cfg" in config:
            raise ValueError(f"{path} is a local-dir open_clip_config.json: pass its folder as the reward's PATH instead")
        if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{path} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg")
        _refuse_hf_text_tower(config, str(path))
        open_clip.add_model_config(path)  # the public way to add an architecture; its name is the file stem
        return path.stem
    if arch not in open_clip.list_models():
        raise ValueError(f"{arch!r} is neither an open_clip architecture (open_clip.list_models() lists them) "
                         "nor a .json model config")
    _refuse_hf_text_tower(open_clip.get_model_config(arch), arch)
    return arch


def _refuse_hf_text_tower(config: dict, name: str) -> None:
    text_cfg = config.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"open_clip architecture {name} uses a Hugging Face text tower, which open_clip would "
                         "download; use one with a CLIP text tower (ViT-H-14, ViT-L-14, ...)")


def load_open_clip(checkpoint: str | Path, arch: str | None, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) from a checkpoint file + architecture, or from a local-dir folder."""
    import open_clip

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        name = f"local-dir:{checkpoint}"
        _refuse_hf_text_tower(json.loads((checkpoint / "open_clip_config.json").read_text())["model_cfg"], name)
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    else:
        name = resolve_arch(arch)
        # A file path as `pretrained` is read with torch.load(weights_only=True) or safetensors; no download.
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint), device=device)
    return model.float().eval(), preprocess, open_clip.get_tokenizer(name)


def load_aesthetic_head(path: str | Path, input_size: int) -> AestheticHead:
    state = _read_state_dict(Path(path))
    if "layers.0.weight" not in state:
        raise ValueError(f"{path} is not an improved-aesthetic-predictor head: expected keys layers.0.weight ... "
                         f"layers.7.bias, found {sorted(state)[:6]}")
    head_input = int(state["layers.0.weight"].shape[1])
    if head_input != input_size:
        raise ValueError(f"aesthetic head {path} reads {head_input}-dim embeddings but the backbone makes "
                         f"{input_size}-dim ones: pair sac+logos+ava1-l14-linearMSE.pth with OpenAI's ViT-L-14")
    head = AestheticHead(input_size)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


# ----------------------------------------------------------------------------- rewards
class OpenClipReward(RewardModel):
    """An open_clip model with its own preprocess and tokenizer; subclasses turn features into a score."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.model, self.preprocess, self.tokenizer = model.to(self.device), preprocess, tokenizer

    @classmethod
    def from_files(cls, checkpoint: str | Path, arch: str | None = None, device: str | torch.device = "cpu", **kwargs):
        model, preprocess, tokenizer = load_open_clip(checkpoint, arch, device)
        return cls(model, preprocess, tokenizer, device=device, **kwargs)

    def image_features(self, images: np.ndarray) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in to_pil(images)]).to(self.device)
        return self.model.encode_image(pixels)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))


class ClipScoreReward(OpenClipReward):
    name = "clip"

    def score_batch(self, images, prompts):
        return clip_score(self.image_features(images), self.text_features(prompts))


class HPSv2Reward(OpenClipReward):
    name = "hpsv2"

    def score_batch(self, images, prompts):
        return hps_score(self.image_features(images), self.text_features(prompts))


class AestheticReward(OpenClipReward):
    """Scores the image alone; the prompt is not read."""

    name = "aesthetic"

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu", *,
                 head: str | Path | AestheticHead):
        super().__init__(model, preprocess, tokenizer, device)
        if not isinstance(head, AestheticHead):
            head = load_aesthetic_head(head, int(model.visual.output_dim))
        self.head = head.to(self.device).eval()

    def score_batch(self, images, prompts):
        return aesthetic_score(self.head, self.image_features(images))
