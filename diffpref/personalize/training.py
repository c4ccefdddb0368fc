"""PPD inside the shared trainer: user tokens from few-shot context, the base model as reference.

``PPDConditioner`` is the only PPD-specific piece of a training step, and the trainer knows it only
through its protocol (``setup``, ``modules``, ``bind``, ``condition``, ``without_user``, ``export``).
It appends each sample's user tokens to the text conditioning (the encoder reads k of that user's
*other* pairs, k varying per sample; some samples get no user at all), and gives the reference pass
the same conditioning with the user removed, which is exactly the frozen base model. The objective
is then plain Diffusion-DPO (Dang et al., CVPR 2025, sec. 3: DPO with eps conditioned on (c, u)).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffpref.personalize.adapter import save_ppd_adapter
from diffpref.personalize.attention import concat_user_tokens, install_user_attention
from diffpref.personalize.context import ContextBank, build_context_bank, report_skips
from diffpref.personalize.encoder import (
    EvidenceUserEncoder,
    UserEncoder,
    build_user_encoder,
)
from diffpref.training import randomness


def parse_blocks(blocks: str) -> str | list[str]:
    """``ppd_blocks`` as ``install_user_attention`` takes it: 'all' or a list of block prefixes."""
    return "all" if blocks == "all" else [b.strip() for b in blocks.split(",") if b.strip()]


def build_encoder(cfg, feature_dim: int, evidence_dim: int, token_dim: int) -> UserEncoder:
    """The user encoder head ``cfg.ppd_encoder`` names, sized by the config and the backbone."""
    if cfg.ppd_encoder == "evidence":
        return build_user_encoder("evidence", feature_dim=feature_dim, num_tokens=cfg.ppd_num_tokens,
                                  token_dim=token_dim, evidence_dim=evidence_dim)
    return build_user_encoder("set", feature_dim=feature_dim, num_tokens=cfg.ppd_num_tokens, token_dim=token_dim,
                              hidden=cfg.ppd_hidden, layers=cfg.ppd_layers, heads=cfg.ppd_heads)


def start_from_adapter(encoder: UserEncoder, unet, adapter: str, num_tokens: int) -> None:
    """Copy a trained adapter's encoder head and user projections into a freshly built ``encoder`` and ``unet``
    (``ppd_init_adapter``); the shapes must match exactly, or a clear error names what differs."""
    from diffpref.personalize.adapter import (
        ENCODER_DIR,
        load_user_attention_weights,
        read_ppd_config,
        resolve_adapter,
    )

    path = resolve_adapter(adapter)
    trained_tokens = int(read_ppd_config(path)["num_tokens"])
    if trained_tokens != num_tokens:
        raise ValueError(f"ppd_init_adapter {path} makes {trained_tokens} user tokens, this config {num_tokens} "
                         "(ppd_num_tokens): they must match")
    trained = UserEncoder.from_pretrained(path / ENCODER_DIR)
    if type(trained) is not type(encoder):
        raise ValueError(f"ppd_init_adapter {path} has a {type(trained).__name__}, this config builds a "
                         f"{type(encoder).__name__}: set ppd_encoder as the adapter was trained")
    own, theirs = encoder.state_dict(), trained.state_dict()
    differ = sorted(k for k in set(own) | set(theirs) if k not in own or k not in theirs or own[k].shape != theirs[k].shape)
    if differ:
        raise ValueError(f"ppd_init_adapter {path}: its user encoder differs from this config's in {differ[:5]} "
                         "(set ppd_hidden, ppd_layers, ppd_heads, ... as the adapter was trained)")
    encoder.load_state_dict(theirs)
    load_user_attention_weights(unet, path)


class PPDConditioner:
    """User conditioning for the trainer: ``train(cfg, conditioner=PPDConditioner())``.

    ``setup`` installs user attention on the frozen UNet and builds the encoder; ``modules`` go
    through ``accelerator.prepare`` and come back through ``bind``.
    """

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.encoder: UserEncoder | torch.nn.Module | None = None
        self.bank: ContextBank | None = None
        self.num_tokens = 0
        self.users: list[str] = []
        self.backbone_kind = "open_clip"

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [] if self.encoder is None else [self.encoder]

    def setup(self, cfg, unet, cache, accelerator, tokenizer=None) -> list[dict]:
        """Install user attention, build the encoder; returns the optimizer's parameter groups.

        Called with the base UNet frozen (and LoRA added when ``lora_rank`` > 0), so the UNet's
        trainable parameters are exactly the new user projections (plus LoRA).
        """
        from diffpref.personalize.backbones import OpenClipBackbone, backbone_kind

        self.cfg = cfg
        self.backbone_kind = backbone_kind(cfg.ppd_backbone)
        if self.backbone_kind == "vlm":
            bank = self._vlm_bank(cfg, cache, accelerator)
        else:
            backbone_path = None if cfg.ppd_backbone in ("embedded", "embedded-clip") else cfg.ppd_backbone
            with accelerator.main_process_first():
                backbone = OpenClipBackbone.from_pretrained(backbone_path, device=str(accelerator.device))
                bank = build_context_bank(cache, backbone, cfg.data_path, cfg.tie_policy, cfg.ppd_backbone,
                                          progress=accelerator.is_local_main_process)
            del backbone  # frozen and fully cached: training never runs it
        report_skips(bank, accelerator.print)  # users with < 2 base-image pairs: counted, trained without a user
        install_user_attention(unet, cfg.ppd_num_tokens, blocks=parse_blocks(cfg.ppd_blocks),
                               value_init_scale=cfg.ppd_value_init_scale)
        evidence_dim = bank.text.shape[1] if self.backbone_kind == "open_clip" else 0
        encoder = build_encoder(cfg, bank.feature_dim, evidence_dim, int(unet.config.cross_attention_dim))
        encoder = encoder.to(accelerator.device)
        if cfg.ppd_init_adapter:
            start_from_adapter(encoder, unet, cfg.ppd_init_adapter, cfg.ppd_num_tokens)
        elif isinstance(encoder, EvidenceUserEncoder):
            encoder.set_evidence_scale(bank.features(bank.context_rows))
        encoder.train()
        self.encoder, self.bank, self.num_tokens, self.users = encoder, bank, cfg.ppd_num_tokens, list(cache.users)
        return self.param_groups(cfg, unet)

    def _vlm_bank(self, cfg, cache, accelerator):
        """Precompute the VLM features of sampled context sets (every process its share of the users)."""
        from diffpref.personalize.backbones import VLMBackbone
        from diffpref.personalize.vlm_context import build_vlm_context_bank

        if cfg.ppd_encoder != "set":
            raise ValueError(f"ppd_encoder: {cfg.ppd_encoder} reads the [text, pref, rej, pref - rej] features of a CLIP "
                             f"backbone; the VLM backbone {cfg.ppd_backbone} gives one summary row per context set: "
                             "use ppd_encoder: set")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
        backbone = VLMBackbone.from_pretrained(cfg.ppd_backbone, device=str(accelerator.device), dtype=dtype,
                                               **self.vlm_settings(cfg))
        bank = build_vlm_context_bank(cache, backbone, cfg, accelerator, progress=accelerator.is_local_main_process)
        self.vlm_used = backbone.settings  # the budget resolved (0 = the model's context length)
        del backbone  # frozen and fully cached: training never runs it
        return bank

    @staticmethod
    def vlm_settings(cfg) -> dict:
        return {"max_new_tokens": cfg.ppd_vlm_max_new_tokens, "layer_pooling": cfg.ppd_vlm_pooling,
                "image_size": cfg.ppd_vlm_image_size, "max_tokens": cfg.ppd_vlm_max_tokens}

    def param_groups(self, cfg, unet) -> list[dict]:
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        head_params = [p for p in self.encoder.parameters() if p.requires_grad]
        if cfg.ppd_attention_lr is None:
            return [{"params": unet_params + head_params}]
        # The user projections start as (scaled) copies of the UNet's own; at the head's learning rate Adam
        # would move each of their small weights by more than its size within a few hundred steps.
        # Named, so that the trainer logs its rate as ``attention_lr``.
        return [{"params": unet_params, "lr": cfg.ppd_attention_lr, "name": "attention"}, {"params": head_params}]

    def bind(self, modules: list[torch.nn.Module]) -> None:
        """Take back the encoder as ``accelerator.prepare`` returned it (maybe wrapped for DDP)."""
        (self.encoder,) = modules

    @property
    def _encoder(self) -> UserEncoder:
        """The encoder itself, unwrapped from a distributed wrapper (for its own methods and parameters)."""
        return self.encoder.module if hasattr(self.encoder, "module") else self.encoder

    def condition(self, prompt_embeds: torch.Tensor, indices: torch.Tensor,
                  generators: list[torch.Generator]) -> torch.Tensor:
        """The text conditioning with each sample's user tokens appended (zero tokens for dropped users)."""
        features, mask = self.bank.sample_context(indices, generators, self.cfg.ppd_shots_min, self.cfg.ppd_shots_max)
        device = prompt_embeds.device
        tokens = self.encoder(features.to(device), mask.to(device))
        keep = randomness.per_sample_uniform(generators) >= self.cfg.ppd_user_dropout
        keep &= self.bank.has_context(indices)  # a dropped user (< 2 base-image pairs) trains without a user
        tokens = tokens * keep.to(tokens.device, tokens.dtype).view(-1, 1, 1)  # zero tokens = no user
        return concat_user_tokens(prompt_embeds, tokens.to(prompt_embeds.dtype), self.num_tokens)

    def without_user(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The same conditioning with the user removed: the reference pass is the frozen base model."""
        return concat_user_tokens(prompt_embeds[:, :-self.num_tokens], None, self.num_tokens)

    def export(self, unet, output_dir: Path) -> Path:
        config = {
            "num_tokens": self.num_tokens, "blocks": parse_blocks(self.cfg.ppd_blocks),
            "backbone": self.cfg.ppd_backbone, "backbone_kind": self.backbone_kind,
            "token_dim": int(unet.config.cross_attention_dim),
            "feature_dim": self.bank.feature_dim, "base_model": self.cfg.model,
            "shots": [self.cfg.ppd_shots_min, self.cfg.ppd_shots_max], "trained_users": self.users,
        }
        if self.backbone_kind == "vlm":  # inference reads users as training did
            config["vlm"] = self.vlm_used
        return save_ppd_adapter(output_dir, self._encoder, unet, config)
