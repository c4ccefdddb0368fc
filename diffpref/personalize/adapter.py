"""A PPD adapter on disk: the user encoder's head plus the UNet's new user-attention projections.

    adapter/
      ppd_config.json              num_tokens, blocks, backbone, base model it was trained on
      user_encoder/                SetUserEncoder or EvidenceUserEncoder (diffusers ModelMixin folder)
      user_attention.safetensors   to_k_user / to_v_user of every conditioned cross-attention layer

The base model's weights are never part of an adapter: it is applied to a loaded UNet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffpref.paths import ASSETS
from diffpref.personalize.attention import (
    install_user_attention,
    load_user_attention_state_dict,
    user_attention_state_dict,
)
from diffpref.personalize.encoder import UserEncoder

CONFIG_NAME = "ppd_config.json"
ATTENTION_NAME = "user_attention.safetensors"
ENCODER_DIR = "user_encoder"
EMBEDDED_ADAPTER_NAMES = ("embedded-ppd", "embedded")


def embedded_adapter_path() -> Path:
    return ASSETS / "world-ppd"


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    path = embedded_adapter_path() if str(adapter) in EMBEDDED_ADAPTER_NAMES else Path(adapter)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} is not a PPD adapter folder (no {CONFIG_NAME}); train one with "
                                "`diffpref train --config configs/embedded_ppd.yaml` or pass 'embedded-ppd'")
    return path


def save_ppd_adapter(out_dir: str | os.PathLike, encoder: UserEncoder, unet, config: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out / ENCODER_DIR)
    state = {k: v.detach().float().contiguous().cpu() for k, v in user_attention_state_dict(unet).items()}
    save_file(state, str(out / ATTENTION_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


def read_ppd_config(adapter: str | os.PathLike) -> dict:
    return json.loads((resolve_adapter(adapter) / CONFIG_NAME).read_text())


def load_user_attention_weights(unet, adapter: str | os.PathLike) -> None:
    """The adapter's user projections into a UNet whose user attention is installed (same tokens and blocks)."""
    state = load_file(str(resolve_adapter(adapter) / ATTENTION_NAME))
    load_user_attention_state_dict(unet, {k: v.to(device=unet.device, dtype=unet.dtype) for k, v in state.items()})


def load_ppd_adapter(unet, adapter: str | os.PathLike, scale: float = 1.0) -> tuple[UserEncoder, dict]:
    """Install user attention on ``unet`` with the adapter's weights; returns (user encoder, config)."""
    path = resolve_adapter(adapter)
    config = json.loads((path / CONFIG_NAME).read_text())
    if int(unet.config.cross_attention_dim) != int(config["token_dim"]):
        raise ValueError(f"adapter {path} makes {config['token_dim']}-wide user tokens but this UNet's "
                         f"cross_attention_dim is {unet.config.cross_attention_dim}: it was trained for another model")
    install_user_attention(unet, config["num_tokens"], blocks=config["blocks"], scale=scale)
    load_user_attention_weights(unet, path)
    # UserEncoder.from_pretrained picks the head the folder was saved from (adapters saved before the
    # set/evidence split included).
    encoder = UserEncoder.from_pretrained(path / ENCODER_DIR).to(unet.device).eval()
    return encoder, config


def load_backbone(config: dict, device: str | torch.device = "cpu"):
    from diffpref.personalize.backbones import OpenClipBackbone, VLMBackbone

    name = config.get("backbone", "embedded")
    if name in ("embedded", "embedded-clip", None):
        return OpenClipBackbone.from_pretrained(None, device=str(device))
    if config.get("backbone_kind") == "vlm":
        # the settings it was trained with (image size, token budget, profile length, pooling)
        return VLMBackbone.from_pretrained(name, device=str(device), **config.get("vlm", {}))
    return OpenClipBackbone.from_pretrained(name, device=str(device))


def is_ppd_adapter(adapter: str | os.PathLike | None) -> bool:
    return adapter is not None and (str(adapter) in EMBEDDED_ADAPTER_NAMES or (Path(adapter) / CONFIG_NAME).exists())
